"""The inventory query language (spec inventory.md §5): `$filter=`/`$orderby=` text to Q and order."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

from django.db import NotSupportedError
from django.db.models import (
    BooleanField,
    CharField,
    Exists,
    F,
    Func,
    Lookup,
    OrderBy,
    OuterRef,
    Q,
)
from django.db.models.fields.json import KeyTransform, compile_json_path
from django.db.models.lookups import Regex

from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import InvalidQuery, ValidationFailed
from deviceplatform.api.params import MAX_ID, parse_id
from inventory.models import ManagedObjectReference, Relation
from inventory.selectors import has_parent_q, text_search_q

# Properties that are columns, not fragments. `has()` on any of these, or on the read-only
# collections, is a 422 (§5): they are never stored in `fragments`, so a silent "no match" would
# hide the client's mistake.
STRING_COLUMNS = {"name": "name", "type": "type", "owner": "owner"}
DATE_COLUMNS = {"creationTime": "creation_time", "lastUpdated": "last_updated"}
STANDARD_PROPERTIES = frozenset(
    {
        "id",
        *STRING_COLUMNS,
        *DATE_COLUMNS,
        "self",
        "childDevices",
        "childAssets",
        "childAdditions",
        "deviceParents",
        "assetParents",
        "additionParents",
    }
)
TEXT_PSEUDO_PROPERTY = "text"

OPERATORS = ("eq", "ne", "gt", "ge", "lt", "le")
_RANGE_LOOKUPS = {"gt": "gt", "ge": "gte", "lt": "lt", "le": "lte"}
_JSONPATH_OPERATORS = {"eq": "==", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SQL_OPERATORS = {"eq": "=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_FUNCTIONS = ("has", "hasany", "bygroupid")

# A bare word ends at whitespace, `+` (the c8y-api clause separator), parentheses, commas, quotes
# and `$` (so that `...)$orderby=` still splits).
_WORD = re.compile(r"[^\s+(),'\"$]+")
# ASCII digits only: Python's \d and Decimal() accept other scripts' digits, jsonpath does not.
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)[fFdD]?")
_PATH = re.compile(r"[^.*=<>!]+(?:\.[^.*=<>!]+)*")
# Characters with a meaning in PostgreSQL AREs and Python regexes; everything else is literal.
_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")

# Bounds on a query's size, checked before (and while) it is parsed so that a hostile query fails
# fast with a 422 instead of exhausting the parser's recursion, the SQL compiler or the database:
# every legitimate query is far below them (docs/api/query-language.md, "Limits").
MAX_QUERY_LENGTH = 10_000  # characters, after URL decoding
MAX_NESTING = 32  # parentheses and `not` around a condition, together
MAX_CONDITIONS = 100  # comparisons and function calls in $filter=
MAX_ARGUMENTS = 1_000  # arguments of one function call (group IDs, fragment names)
MAX_PATH_SEGMENTS = 32  # dot-separated names in one property path (SQLite joins one table each)
MAX_ORDER_PROPERTIES = 10  # properties in $orderby=
MAX_WILDCARDS = 10  # `*` in one value compared with eq/ne


@dataclass(frozen=True)
class ParsedQuery:
    """A parsed query. Apply `order_by` only when non-empty: `order_by()` with no arguments would
    drop the model's default ordering by ascending id."""

    filter: Q  # Q() when there is no $filter
    order_by: tuple[Any, ...]  # Django order_by() arguments; () = default (ascending id)


def parse_query(text: str) -> ParsedQuery:
    """Parse the value of the `query` / `q` parameter (already URL-decoded). Raises InvalidQuery."""
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidQuery(
            f"the query is {len(text)} characters long; at most {MAX_QUERY_LENGTH} are allowed"
        )
    if "\x00" in text:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in the driver.
        raise InvalidQuery("the query contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidQuery("the query is not valid Unicode text") from None
    return _Parser(_tokenize(text)).parse()


# --- Tokens ---------------------------------------------------------------------------------


class _Kind(Enum):
    LPAREN = "'('"
    RPAREN = "')'"
    COMMA = "','"
    STRING = "quoted string"
    WORD = "word"
    FILTER = "'$filter='"
    ORDERBY = "'$orderby='"
    END = "end of query"


@dataclass(frozen=True)
class _Token:
    kind: _Kind
    text: str  # quotes removed and '' unescaped for STRING
    position: int  # 1-based, for error messages

    def is_word(self, *words: str) -> bool:
        return self.kind is _Kind.WORD and self.text.lower() in words

    def describe(self) -> str:
        if self.kind is _Kind.END:
            return "end of query"
        if self.kind is _Kind.STRING:
            return f"'{self.text}' at position {self.position}"
        if self.kind is _Kind.WORD:
            return f"{self.text!r} at position {self.position}"
        return f"{self.kind.value} at position {self.position}"


_PUNCTUATION = {"(": _Kind.LPAREN, ")": _Kind.RPAREN, ",": _Kind.COMMA}
_OPTIONS = (("$filter=", _Kind.FILTER), ("$orderby=", _Kind.ORDERBY))


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        # `+` is whitespace outside quotes: c8y-api joins clauses with a literal `+`
        # (`$filter=(...)+$orderby=name`), which arrives undecoded when it was sent as %2B.
        if char.isspace() or char == "+":
            index += 1
        elif char in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[char], char, index + 1))
            index += 1
        elif char == "'":
            value, end = _read_string(text, index)
            tokens.append(_Token(_Kind.STRING, value, index + 1))
            index = end
        elif char == '"':
            raise InvalidQuery(
                f"double quote at position {index + 1}: quote strings with single quotes"
            )
        elif char == "$":
            for option, kind in _OPTIONS:
                if text[index : index + len(option)].lower() == option:
                    tokens.append(_Token(kind, option, index + 1))
                    index += len(option)
                    break
            else:
                word = _WORD.match(text, index + 1)
                shown = "$" + (word.group() if word else "")
                raise InvalidQuery(
                    f"unsupported option {shown!r} at position {index + 1}: "
                    "only $filter= and $orderby= are understood"
                )
        else:
            word = _WORD.match(text, index)
            assert word is not None  # every character not handled above starts a word
            tokens.append(_Token(_Kind.WORD, word.group(), index + 1))
            index = word.end()
    tokens.append(_Token(_Kind.END, "", length + 1))
    return tokens


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The quoted string opening at `start` (`''` is one quote) and the index after it."""
    parts: list[str] = []
    index = start + 1
    while True:
        end = text.find("'", index)
        if end < 0:
            raise InvalidQuery(f"unterminated string starting at position {start + 1}")
        parts.append(text[index:end])
        if text.startswith("''", end):
            parts.append("'")
            index = end + 2
        else:
            return "".join(parts), end + 1


# --- Literals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Literal:
    text: str  # as written, unquoted: what string columns and date-times compare against
    value: str | int | Decimal | bool  # typed per §5: what fragment values compare against
    position: int

    @property
    def has_wildcard(self) -> bool:
        return isinstance(self.value, str) and "*" in self.value


def _literal(token: _Token) -> _Literal:
    if token.kind is _Kind.STRING:
        return _Literal(token.text, token.text, token.position)
    if token.kind is not _Kind.WORD:
        raise InvalidQuery(f"expected a value, got {token.describe()}")
    text = token.text
    value: str | int | Decimal | bool
    if text.lower() in ("true", "false"):
        value = text.lower() == "true"
    elif _INTEGER.fullmatch(text):
        value = int(text)
    elif _DECIMAL.fullmatch(text):
        # `12.5d` / `12.5f`: the Java-style suffix only says "floating point".
        value = Decimal(text.rstrip("fFdD"))
    else:
        value = text
    return _Literal(text, value, token.position)


# --- Fragment conditions --------------------------------------------------------------------


def _jsonpath_string(text: str) -> str:
    # JSON string escapes are a subset of jsonpath's, so json.dumps gives a safe literal.
    return json.dumps(text, ensure_ascii=False)


def _jsonpath_literal(value: str | int | Decimal | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return format(value, "f")  # plain digits, never an exponent
    return _jsonpath_string(value)


def _regex_escape(text: str) -> str:
    return "".join("\\" + char if char in _REGEX_SPECIAL else char for char in text)


def wildcard_regex(pattern: str) -> str:
    """`Dev*` → `^Dev.*$`: `*` matches any run of characters, everything else is literal."""
    return "^" + ".*".join(_regex_escape(part) for part in pattern.split("*")) + "$"


def wildcard_glob(pattern: str) -> str:
    """`Dev*` as an SQLite GLOB pattern: `*` stays, `?` and `[` are made literal. GLOB is
    case-sensitive, compares code points and its `*` crosses newlines, like the PostgreSQL regex
    (SQLite's REGEXP is Python's `re.search`, where `.` stops at a newline and `$` matches before
    a final one)."""
    return pattern.replace("[", "[[]").replace("?", "[?]")


@CharField.register_lookup
class Wildcard(Lookup):
    """`name__wildcard='Dev*'`: the whole value matches the pattern, `*` matching any run of
    characters. A lookup (not an expression) so that `ne` (`~Q(...)`) keeps Django's NULL
    handling: an object without a name is not 'Dev*'."""

    lookup_name = "wildcard"

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        # PostgreSQL: exactly the `__regex` lookup.
        return compiler.compile(Regex(self.lhs, wildcard_regex(self.rhs)))

    def as_sqlite(self, compiler: Any, connection: Any) -> Any:
        lhs_sql, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs_sql} GLOB %s", (*lhs_params, wildcard_glob(self.rhs))


class FragmentCondition(Func):
    """A comparison on a path into `fragments`, true if any value the path reaches matches.

    On PostgreSQL this is `fragments @? '<jsonpath>'`. Lax-mode jsonpath unwraps arrays: a member
    step on an array takes the member of each object element (`customers.id eq '123'`), and the
    filter unwraps the value it reaches and then each element of that (so `tags eq 'x'` matches
    `["x"]` and `[["x"]]`, not `[[["x"]]]`). Values of another JSON type never match; strings
    compare by code point. The `@?` operator (unlike `jsonb_path_exists()`) can use the GIN index
    on `fragments`, so the value is written into the jsonpath as an escaped literal and the whole
    jsonpath travels as one query parameter.

    On SQLite the same walk is an EXISTS over `json_each`, one per step (see `as_sqlite`)."""

    def __init__(
        self, path: tuple[str, ...], operator: str, value: str | int | Decimal | bool
    ) -> None:
        super().__init__(F("fragments"), output_field=BooleanField())
        self.path = path
        self.operator = operator  # a key of _JSONPATH_OPERATORS, or "wildcard" (value = pattern)
        self.value = value

    def jsonpath(self) -> str:
        target = "$" + "".join("." + _jsonpath_string(key) for key in self.path)
        if self.operator == "wildcard":
            # flag "s": `*` must also match across newlines, as it does on columns.
            assert isinstance(self.value, str)
            regex = wildcard_regex(self.value)
            condition = f'@ like_regex {_jsonpath_string(regex)} flag "s"'
        else:
            condition = f"@ {_JSONPATH_OPERATORS[self.operator]} {_jsonpath_literal(self.value)}"
        return f"{target} ? ({condition})"

    def as_postgresql(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        column_sql, params = compiler.compile(self.get_source_expressions()[0])
        return f"({column_sql} @? %s::jsonpath)", (*params, self.jsonpath())

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        """Lax jsonpath in SQLite's JSON functions. With unwrap(x) = `x` when it is an array,
        else `[x]`, `json_each(unwrap(x))` lists the items lax mode takes from `x`. For `a.b`:

            EXISTS (SELECT 1 FROM
              json_each(unwrap(fragments -> '$."a"')) AS qj_0,     -- member b of the objects
              json_each(unwrap(qj_0.value -> '$."b"')) AS qj_1,     -- the filter's items
              json_each(CASE WHEN qj_1.type = 'array' THEN qj_1.value
                        ELSE json_array(qj_1.value) END) AS qj_operand  -- the operand's
            WHERE qj_0.type = 'object' AND <the operand's JSON type and value compare>)

        Keys go into paths as Django writes them (`json.dumps`), which is how Django stored them:
        SQLite compares a path label with the stored, escaped text of a key."""
        column_sql, params = compiler.compile(self.get_source_expressions()[0])
        sources: list[str] = []
        conditions: list[str] = []
        values: list[Any] = []
        item, item_params = column_sql, list(params)
        alias = ""
        for depth, key in enumerate(self.path):
            if alias:
                conditions.append(f"{alias}.type = 'object'")  # a member step reads objects
            step = f"{item} -> %s"
            step_params = [*item_params, "$." + json.dumps(key)]
            alias = f"qj_{depth}"
            sources.append(
                f"json_each(CASE json_type({step}) WHEN 'array' THEN {step} "
                f"ELSE json_array(json({step})) END) AS {alias}"
            )
            values.extend(step_params * 3)
            item, item_params = f"{alias}.value", []
        # `alias` lists the filter's unwrapped values: unwrap an array once more, as the comparison
        # does with its operand. json_array() of any other value keeps its SQL value (atom); its
        # JSON type is taken from the value itself (true/false would have become 1/0).
        sources.append(
            f"json_each(CASE WHEN {alias}.type = 'array' THEN {alias}.value "
            f"ELSE json_array({alias}.value) END) AS qj_operand"
        )
        value_type = (
            f"(CASE WHEN {alias}.type = 'array' THEN qj_operand.type ELSE {alias}.type END)"
        )
        condition, condition_params = self._sqlite_comparison(value_type, "qj_operand.atom")
        conditions.append(condition)
        values.extend(condition_params)
        # Only our own SQL is formatted in; keys and values are parameters.
        sql = f"EXISTS (SELECT 1 FROM {', '.join(sources)} WHERE {' AND '.join(conditions)})"  # noqa: S608
        return sql, tuple(values)

    def _sqlite_comparison(self, value_type: str, atom: str) -> tuple[str, list[Any]]:
        value = self.value
        if self.operator == "wildcard":
            assert isinstance(value, str)
            return f"{value_type} = 'text' AND {atom} GLOB %s", [wildcard_glob(value)]
        operator = _SQL_OPERATORS[self.operator]
        if isinstance(value, bool):  # jsonpath orders false < true
            return (
                f"{value_type} IN ('true', 'false') AND ({value_type} = 'true') {operator} %s",
                [int(value)],
            )
        if isinstance(value, str):
            return f"{value_type} = 'text' AND {atom} {operator} %s", [value]
        # SQLite binds 64-bit integers; beyond them (and for decimals) a float compares the same.
        in_range = isinstance(value, int) and -MAX_ID <= value <= MAX_ID
        number: int | float = value if in_range else float(value)
        return f"{value_type} IN ('integer', 'real') AND {atom} {operator} %s", [number]

    def as_sql(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        raise NotSupportedError(f"fragment conditions have no SQL for {connection.vendor}")


class FragmentOrderBy(OrderBy):
    """Order by the value at a fragment path, objects without it last in both directions.

    PostgreSQL orders jsonb values by type first (null < strings < numbers < booleans < arrays
    < objects), then by value. SQLite's JSON_EXTRACT gives plain SQL values, which order
    numbers before strings and booleans as 0/1 among the numbers, so there the type's rank comes
    first. Two arrays or two objects compare by their JSON text on SQLite (by size, then
    content, on PostgreSQL)."""

    _RANKS = (
        ("null", 0),
        ("text", 1),
        ("integer", 2),
        ("real", 2),
        ("false", 3),
        ("true", 3),
        ("array", 4),
        ("object", 5),
    )

    def __init__(self, keys: list[str], *, descending: bool) -> None:
        expression: Any = F("fragments")
        for key in keys:
            expression = KeyTransform(key, expression)
        super().__init__(expression, descending=descending, nulls_last=True)
        self.keys = keys

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        column = self.expression
        while isinstance(column, KeyTransform):
            column = column.lhs
        column_sql, params = compiler.compile(column)
        path = compile_json_path(self.keys)  # as KeyTransform writes it
        ranks = " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in self._RANKS)
        direction = "DESC" if self.descending else "ASC"
        nulls = "NULLS FIRST" if self.nulls_first else "NULLS LAST"  # reversed querysets
        sql = (
            f"CASE json_type({column_sql}, %s) {ranks} END {direction} {nulls}, "
            f"json_extract({column_sql}, %s) {direction}"
        )
        return sql, (*params, path, *params, path)


# --- Parser ---------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the §5 grammar; each rule returns a Q."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0
        self.nesting = 0  # parentheses and `not` open around the current term
        self.conditions = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind is not _Kind.END:
            self.index += 1
        return token

    def expect(self, kind: _Kind, context: str) -> _Token:
        token = self.advance()
        if token.kind is not kind:
            raise InvalidQuery(f"expected {kind.value} {context}, got {token.describe()}")
        return token

    def parse(self) -> ParsedQuery:
        condition: Q | None = None
        order_by: tuple[Any, ...] = ()
        if self.peek().kind is _Kind.FILTER:
            self.advance()
            if self.peek().kind in (_Kind.ORDERBY, _Kind.END):
                raise InvalidQuery("$filter= is empty")
        if self.peek().kind not in (_Kind.ORDERBY, _Kind.END):
            condition = self.expression()
        if self.peek().kind is _Kind.ORDERBY:
            self.advance()
            order_by = self.order()
        elif condition is None:
            raise InvalidQuery("the query is empty")
        token = self.peek()
        if token.kind is not _Kind.END:
            raise InvalidQuery(
                f"unexpected {token.describe()}; conditions are joined with 'and' / 'or' "
                "and $orderby= comes last"
            )
        return ParsedQuery(filter=condition if condition is not None else Q(), order_by=order_by)

    # expr := and_expr { "or" and_expr }: `and` binds tighter than `or`.
    def expression(self) -> Q:
        condition = self.conjunction()
        while self.peek().is_word("or"):
            self.advance()
            condition = condition | self.conjunction()
        return condition

    def conjunction(self) -> Q:
        condition = self.term()
        while self.peek().is_word("and"):
            self.advance()
            condition = condition & self.term()
        return condition

    def term(self) -> Q:
        token = self.peek()
        if token.is_word("not") or token.kind is _Kind.LPAREN:
            # Bounded before descending: the recursion never goes deeper than MAX_NESTING.
            if self.nesting >= MAX_NESTING:
                raise InvalidQuery(
                    f"{token.describe()} nests deeper than {MAX_NESTING} levels of "
                    "parentheses and 'not'"
                )
            self.nesting += 1
            self.advance()
            if token.kind is _Kind.LPAREN:
                condition = self.expression()
                self.expect(_Kind.RPAREN, f"to close the '(' at position {token.position}")
            else:
                condition = ~self.term()
            self.nesting -= 1
            return condition
        if token.kind is not _Kind.WORD or token.is_word("and", "or"):
            raise InvalidQuery(f"expected a condition, got {token.describe()}")
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise InvalidQuery(
                f"{token.describe()} is condition {self.conditions}; "
                f"at most {MAX_CONDITIONS} are allowed"
            )
        self.advance()
        if self.peek().kind is _Kind.LPAREN:
            return self.function(token)
        return self.comparison(token)

    def function(self, name: _Token) -> Q:
        function = name.text.lower()
        if function not in _FUNCTIONS:
            raise InvalidQuery(
                f"unknown function {name.text!r} at position {name.position}; "
                f"supported: {', '.join(f + '()' for f in _FUNCTIONS)}"
            )
        self.advance()  # "("
        arguments = [self.argument(function)]
        while self.peek().kind is _Kind.COMMA:
            if len(arguments) >= MAX_ARGUMENTS:
                raise InvalidQuery(
                    f"{function}() at position {name.position} has more than {MAX_ARGUMENTS} "
                    "arguments"
                )
            self.advance()
            arguments.append(self.argument(function))
        self.expect(_Kind.RPAREN, f"to close {function}()")
        if function == "bygroupid":
            # Direct childAssets only (§5, unverified): a membership test per group, ORed.
            group_ids = [parse_id(argument.text, field="bygroupid()") for argument in arguments]
            # A larger one names no group; keep it out of the SQL.
            known = list(dict.fromkeys(group_id for group_id in group_ids if group_id <= MAX_ID))
            if not known:
                return Q(pk__in=[])
            if len(known) == 1:
                return has_parent_q(Relation.ASSET, known[0])
            # One membership test for all the groups (one EXISTS per group took seconds at 3,000).
            return Q(
                Exists(
                    ManagedObjectReference.objects.filter(
                        parent_id__in=known, relation=Relation.ASSET, child=OuterRef("pk")
                    )
                )
            )
        names = [self.fragment_name(argument, function) for argument in arguments]
        if function == "has":
            if len(names) != 1:
                raise InvalidQuery("has() takes exactly one fragment name; use hasany() for more")
            return Q(fragments__has_key=names[0])
        return Q(fragments__has_any_keys=names)

    def argument(self, function: str) -> _Token:
        token = self.advance()
        if token.kind not in (_Kind.WORD, _Kind.STRING) or not token.text:
            raise InvalidQuery(f"expected an argument of {function}(), got {token.describe()}")
        return token

    @staticmethod
    def fragment_name(token: _Token, function: str) -> str:
        name = token.text
        if name in STANDARD_PROPERTIES:
            raise InvalidQuery(
                f"{function}() tests custom fragments; {name!r} is a standard property"
            )
        if "." in name or "*" in name:
            raise InvalidQuery(f"{function}() takes top-level fragment names, not {name!r}")
        return name

    def comparison(self, path_token: _Token) -> Q:
        path = _path(path_token)
        operator_token = self.advance()
        operator = operator_token.text.lower() if operator_token.kind is _Kind.WORD else ""
        if operator not in OPERATORS:
            raise InvalidQuery(
                f"expected an operator ({', '.join(OPERATORS)}) after {path!r}, "
                f"got {operator_token.describe()}"
            )
        literal = _literal(self.advance())
        if operator in ("eq", "ne") and literal.text.count("*") > MAX_WILDCARDS:
            # Each `*` is a `.*` in a regex (PostgreSQL) or a backtracking GLOB star (SQLite).
            raise InvalidQuery(
                f"the value at position {literal.position} has {literal.text.count('*')} "
                f"wildcards; at most {MAX_WILDCARDS} are allowed"
            )
        return _comparison_q(path, operator, literal)

    # order := path [asc|desc] { "," path [asc|desc] }
    def order(self) -> tuple[Any, ...]:
        items: list[Any] = []
        by_id = False
        while True:
            if len(items) >= MAX_ORDER_PROPERTIES:
                raise InvalidQuery(f"$orderby= takes at most {MAX_ORDER_PROPERTIES} properties")
            token = self.expect(_Kind.WORD, "(a property to order by)")
            descending = False
            if self.peek().is_word("asc", "desc"):
                descending = self.advance().text.lower() == "desc"
            path = _path(token)
            by_id = by_id or path == "id"
            items.append(_order_item(path, descending))
            if self.peek().kind is not _Kind.COMMA:
                break
            self.advance()
        if not by_id:
            # Equal sort keys would otherwise come back in any order and pages would overlap.
            items.append("id")
        return tuple(items)


def _path(token: _Token) -> str:
    # Counted before the pattern is matched, which would otherwise scan a very long path first.
    if token.text.count(".") >= MAX_PATH_SEGMENTS:
        raise InvalidQuery(
            f"the property path at position {token.position} has more than "
            f"{MAX_PATH_SEGMENTS} segments"
        )
    if not _PATH.fullmatch(token.text):
        raise InvalidQuery(f"invalid property name {token.text!r} at position {token.position}")
    return token.text


def _comparison_q(path: str, operator: str, literal: _Literal) -> Q:
    if operator == "ne":
        # `ne` is NOT(eq): objects without the property match too, on columns as on fragments.
        return ~_comparison_q(path, "eq", literal)
    keys = tuple(path.split("."))
    head = keys[0]
    if path == TEXT_PSEUDO_PROPERTY:
        if operator != "eq":
            raise InvalidQuery("the text pseudo-property supports only eq and ne")
        # text is already a prefix search; a trailing `*` (as UIs write it) adds nothing.
        return text_search_q(literal.text.rstrip("*"))
    if path == "id":
        return _id_q(operator, literal)
    if path in STRING_COLUMNS:
        return _string_column_q(STRING_COLUMNS[path], operator, literal)
    if head in DATE_COLUMNS and keys[1:] in ((), ("date",)):
        when = _datetime(path, literal)
        lookup = DATE_COLUMNS[head] + ("" if operator == "eq" else "__" + _RANGE_LOOKUPS[operator])
        return Q(**{lookup: when})
    if head in STANDARD_PROPERTIES:
        raise InvalidQuery(f"{path!r} cannot be queried")
    if operator == "eq" and literal.has_wildcard:
        assert isinstance(literal.value, str)
        return Q(FragmentCondition(keys, "wildcard", literal.value))
    return Q(FragmentCondition(keys, operator, literal.value))


def _id_q(operator: str, literal: _Literal) -> Q:
    # IDs are strings on the wire, so `id eq '42'` is as good as `id eq 42`.
    if not _INTEGER.fullmatch(literal.text):
        raise InvalidQuery(f"id must be compared with an integer, not {literal.text!r}")
    number = int(literal.text)
    if operator == "eq":
        return Q(pk=number)
    return Q(**{"pk__" + _RANGE_LOOKUPS[operator]: number})


def _string_column_q(column: str, operator: str, literal: _Literal) -> Q:
    # Columns compare the value as written: `name eq 123` means the name "123".
    if operator == "eq":
        if literal.has_wildcard:
            return Q(**{column + "__wildcard": literal.text})
        return Q(**{column: literal.text})
    return Q(**{column + "__" + _RANGE_LOOKUPS[operator]: literal.text})


def _datetime(path: str, literal: _Literal) -> Any:
    try:
        return parse_datetime(literal.text, field=path)
    except ValidationFailed as exc:
        raise InvalidQuery(exc.message) from None


def _order_item(path: str, descending: bool) -> Any:
    keys = path.split(".")
    head = keys[0]
    if path == "id":
        return "-id" if descending else "id"
    if path == "owner":
        return "-owner" if descending else "owner"
    if head in DATE_COLUMNS and keys[1:] in ([], ["date"]):
        column = DATE_COLUMNS[head]
        return "-" + column if descending else column
    # Objects without the property sort last either way, on every database (a descending list
    # that opens with unnamed objects helps nobody).
    if path in STRING_COLUMNS:
        return OrderBy(F(STRING_COLUMNS[path]), descending=descending, nulls_last=True)
    if head in STANDARD_PROPERTIES or path == TEXT_PSEUDO_PROPERTY:
        raise InvalidQuery(f"cannot order by {path!r}")
    return FragmentOrderBy(keys, descending=descending)
