"""The inventory query language (spec inventory.md §5) evaluated against the real database: the
same answers on PostgreSQL and SQLite."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from deviceplatform.api.exceptions import InvalidQuery
from inventory.models import ManagedObject, Relation
from inventory.query import ParsedQuery, parse_query
from inventory.services import managed_object_add_children, managed_object_create


@dataclass
class World:
    dev1: int
    dev2: int
    dev3: int
    group: int
    subgroup: int
    obrien: int
    bare: int


def at(month: int) -> datetime:
    return datetime(2024, month, 1, tzinfo=UTC)


@pytest.fixture
def world(db: None) -> World:
    def create(owner: str, month: int, **data: object) -> ManagedObject:
        return managed_object_create(owner=owner, data=data, now=at(month))

    dev1 = create(
        "admin",
        1,
        name="Dev-1",
        type="c8y_Linux",
        c8y_IsDevice={},
        c8y_Hardware={"model": "RPi", "serialNumber": "123"},
        tags=["red", "blue"],
        customers=[{"id": "123", "name": "ACME"}, {"id": "7"}],
        level=5,
        ratio=12.5,
        active=True,
        label="a.b(c)",
    )
    dev2 = create(
        "bob",
        2,
        name="Dev.2 (beta)",
        type="c8y_Linux",
        c8y_IsDevice={},
        c8y_Hardware={"model": "RPi4"},
        tags=["green"],
        level=10,
        ratio=3.25,
        active=False,
        note="it's here",
        label="axb(c)",
    )
    dev3 = create(
        "admin",
        3,
        name="Sensor",
        type="c8y_Firmware",
        c8y_IsDevice={},
        customers=[{"id": "9"}],
        level=7,
        nested={"deep": {"value": "x"}},
        label='say "hi" \\ there',
    )
    group = create(
        "admin", 4, name="Group A", type="c8y_DeviceGroup", c8y_IsDeviceGroup={}, level="high"
    )
    subgroup = create("admin", 5, name="Sub", type="c8y_DeviceSubgroup", c8y_IsDeviceGroup={})
    obrien = create("carol", 6, name="O'Brien", type="person", level="5")
    bare = create("carol", 7)
    # `now=` keeps the parents' lastUpdated where the date tests expect it.
    managed_object_add_children(
        parent=group, relation=Relation.ASSET, children=[dev1, subgroup], now=at(4)
    )
    managed_object_add_children(
        parent=subgroup, relation=Relation.ASSET, children=[dev2], now=at(5)
    )
    return World(dev1.pk, dev2.pk, dev3.pk, group.pk, subgroup.pk, obrien.pk, bare.pk)


def ids(text: str) -> list[int]:
    parsed = parse_query(text)
    queryset = ManagedObject.objects.filter(parsed.filter)
    if parsed.order_by:  # order_by() with no arguments would drop the default ordering by id
        queryset = queryset.order_by(*parsed.order_by)
    return list(queryset.values_list("id", flat=True))


def everyone(w: World) -> list[int]:
    return [w.dev1, w.dev2, w.dev3, w.group, w.subgroup, w.obrien, w.bare]


def test_no_orderby_means_default_order_and_filter_only_means_empty_order() -> None:
    parsed = parse_query("name eq 'x'")
    assert isinstance(parsed, ParsedQuery)
    assert parsed.order_by == ()


def test_orderby_only_has_empty_filter_and_id_tie_breaker() -> None:
    parsed = parse_query("$orderby=owner desc")
    assert len(parsed.filter) == 0
    assert parsed.order_by == ("-owner", "id")
    assert parse_query("$orderby=id desc").order_by == ("-id",)


# --- Columns ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_string_column_operators(world: World) -> None:
    w = world
    assert ids("type eq c8y_Linux") == [w.dev1, w.dev2]
    assert ids("type eq 'c8y_Linux'") == [w.dev1, w.dev2]
    assert ids("type eq c8y_linux") == []  # case-sensitive
    # ne is NOT(eq): the object without a type matches too
    assert ids("type ne c8y_Linux") == [w.dev3, w.group, w.subgroup, w.obrien, w.bare]
    assert ids("owner eq admin") == [w.dev1, w.dev3, w.group, w.subgroup]
    assert ids("owner gt admin") == [w.dev2, w.obrien, w.bare]
    assert ids("owner ge bob") == [w.dev2, w.obrien, w.bare]
    assert ids("owner lt bob") == [w.dev1, w.dev3, w.group, w.subgroup]
    assert ids("owner le bob") == [w.dev1, w.dev2, w.dev3, w.group, w.subgroup]
    assert ids("name eq 'Sensor'") == [w.dev3]


@pytest.mark.django_db
def test_id_compares_numerically_quoted_or_not(world: World) -> None:
    w = world
    assert ids(f"id eq {w.dev2}") == [w.dev2]
    assert ids(f"id eq '{w.dev2}'") == [w.dev2]
    assert ids(f"id ne {w.dev2}") == [i for i in everyone(w) if i != w.dev2]
    assert ids(f"id gt {w.subgroup}") == [w.obrien, w.bare]
    assert ids(f"id ge {w.subgroup}") == [w.subgroup, w.obrien, w.bare]
    assert ids(f"id lt {w.dev2}") == [w.dev1]
    assert ids(f"id le {w.dev2}") == [w.dev1, w.dev2]
    assert ids("id eq 99999999999999999999") == []


@pytest.mark.django_db
def test_dates_compare_as_datetimes(world: World) -> None:
    w = world
    assert ids("creationTime eq '2024-02-01T00:00:00.000Z'") == [w.dev2]
    assert ids("creationTime gt '2024-05-01T00:00:00Z'") == [w.obrien, w.bare]
    assert ids("creationTime ge '2024-05-01T00:00:00Z'") == [w.subgroup, w.obrien, w.bare]
    assert ids("creationTime.date lt '2024-02-01T01:00:00+01:00'") == [w.dev1]
    assert ids("creationTime le '2024-02-01'") == [w.dev1, w.dev2]
    assert ids("lastUpdated.date ne '2024-01-01T00:00:00Z'") == everyone(w)[1:]
    assert ids("lastUpdated lt 2024-02-01T00:00:00Z") == [w.dev1]  # a bare word works too


# --- Wildcards and quoting ---------------------------------------------------------------------


@pytest.mark.django_db
def test_column_wildcards(world: World) -> None:
    w = world
    assert ids("name eq 'Dev*'") == [w.dev1, w.dev2]  # prefix
    assert ids("name eq Dev*") == [w.dev1, w.dev2]  # bare words too
    assert ids("name eq '*sor'") == [w.dev3]  # suffix
    assert ids("name eq 'D*1'") == [w.dev1]  # middle
    assert ids("name eq '*e*'") == [w.dev1, w.dev2, w.dev3, w.obrien]
    assert ids("name eq 'dev*'") == []  # case-sensitive
    assert ids("name ne 'Dev*'") == [w.dev3, w.group, w.subgroup, w.obrien, w.bare]


@pytest.mark.django_db
def test_wildcard_pattern_characters_are_literal(world: World) -> None:
    w = world
    # '.' would match the '-' of "Dev-1" if it reached the regex unescaped
    assert ids("name eq 'Dev.*'") == [w.dev2]
    assert ids("name eq '*(beta)'") == [w.dev2]
    assert ids("name eq 'Dev.2 (beta*'") == [w.dev2]
    assert ids("label eq 'a.b(*'") == [w.dev1]
    assert ids("label eq '*\"hi\" \\ *'") == [w.dev3]
    assert ids("label eq 'a?b*'") == []
    assert ids("name eq '[D]*'") == []


@pytest.mark.django_db
def test_quotes_escape_by_doubling(world: World) -> None:
    w = world
    assert ids("name eq 'O''Brien'") == [w.obrien]
    assert ids("name eq 'O''*'") == [w.obrien]
    assert ids("note eq 'it''s here'") == [w.dev2]
    assert ids("label eq 'say \"hi\" \\ there'") == [w.dev3]  # jsonpath specials are data
    assert ids("note eq ''") == []


# --- Fragment paths ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_fragment_string_comparisons(world: World) -> None:
    w = world
    assert ids("c8y_Hardware.model eq 'RPi'") == [w.dev1]
    assert ids("c8y_Hardware.model eq RPi*") == [w.dev1, w.dev2]
    assert ids("c8y_Hardware.model ne 'RPi'") == [i for i in everyone(w) if i != w.dev1]
    assert ids("c8y_Hardware.model gt 'RPi'") == [w.dev2]
    assert ids("c8y_Hardware.model ge 'RPi'") == [w.dev1, w.dev2]
    assert ids("c8y_Hardware.model lt 'RPi4'") == [w.dev1]
    assert ids("c8y_Hardware.model le 'RPi4'") == [w.dev1, w.dev2]
    assert ids("nested.deep.value eq x") == [w.dev3]
    assert ids("nested.deep eq x") == []


@pytest.mark.django_db
def test_fragment_numbers_compare_numerically(world: World) -> None:
    w = world
    assert ids("level eq 5") == [w.dev1]  # the string "5" of O'Brien is not the number 5
    assert ids("level eq '5'") == [w.obrien]
    assert ids("level gt 5") == [w.dev2, w.dev3]  # 10 > 5 numerically, strings never match
    assert ids("level ge 7") == [w.dev2, w.dev3]
    assert ids("level lt 7") == [w.dev1]
    assert ids("level le 7.0") == [w.dev1, w.dev3]
    assert ids("level ne 5") == [i for i in everyone(w) if i != w.dev1]
    assert ids("ratio eq 12.5d") == [w.dev1]
    assert ids("ratio eq 12.5") == [w.dev1]
    assert ids("ratio gt 3.25f") == [w.dev1]
    assert ids("ratio le 3.25D") == [w.dev2]
    assert ids("level eq 5d") == [w.dev1]
    assert ids("ratio lt -1") == []


@pytest.mark.django_db
def test_fragment_booleans(world: World) -> None:
    w = world
    assert ids("active eq true") == [w.dev1]
    assert ids("active eq FALSE") == [w.dev2]
    assert ids("active eq 'true'") == []  # a string is not a boolean
    assert ids("active ne true") == [i for i in everyone(w) if i != w.dev1]


@pytest.mark.django_db
def test_array_values_match_any_element(world: World) -> None:
    w = world
    assert ids("tags eq 'blue'") == [w.dev1]
    assert ids("tags eq red") == [w.dev1]
    assert ids("tags eq 'gr*'") == [w.dev2]
    assert ids("tags ne 'blue'") == [i for i in everyone(w) if i != w.dev1]


@pytest.mark.django_db
def test_path_through_array_of_objects(world: World) -> None:
    w = world
    assert ids("customers.id eq '123'") == [w.dev1]
    assert ids("customers.id eq '7'") == [w.dev1]
    assert ids("customers.id eq '9'") == [w.dev3]
    assert ids("customers.name eq 'AC*'") == [w.dev1]
    assert ids("customers.id eq 123") == []  # stored as strings


# --- Functions -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_has_and_hasany(world: World) -> None:
    w = world
    assert ids("has(c8y_IsDevice)") == [w.dev1, w.dev2, w.dev3]
    assert ids("HAS(c8y_IsDeviceGroup)") == [w.group, w.subgroup]
    assert ids("has(c8y_isdevice)") == []
    assert ids("hasany(c8y_IsDeviceGroup, note)") == [w.dev2, w.group, w.subgroup]
    assert ids("hasany(c8y_IsDeviceGroup,note,nested)") == [w.dev2, w.dev3, w.group, w.subgroup]
    assert ids("hasany(nothing)") == []
    assert ids("not has(level)") == [w.subgroup, w.bare]


@pytest.mark.django_db
def test_bygroupid_matches_direct_child_assets_only(world: World) -> None:
    w = world
    assert ids(f"bygroupid({w.group})") == [w.dev1, w.subgroup]  # not dev2, a grandchild
    assert ids(f"bygroupid({w.subgroup})") == [w.dev2]
    assert ids(f"bygroupid({w.group}, {w.subgroup})") == [w.dev1, w.dev2, w.subgroup]
    assert ids(f"bygroupid('{w.subgroup}')") == [w.dev2]
    assert ids(f"bygroupid({w.dev1})") == []
    assert ids("bygroupid(99999999999999999999)") == []
    assert ids(f"bygroupid(99999999999999999999, {w.subgroup})") == [w.dev2]
    assert ids("not bygroupid(99999999999999999999)") == everyone(w)
    assert ids(f"$filter=bygroupid({w.group}) and has(c8y_IsDevice)") == [w.dev1]


@pytest.mark.django_db
def test_text_pseudo_property(world: World) -> None:
    w = world
    assert ids("text eq 'sens'") == [w.dev3]
    assert ids("text eq dev") == [w.dev1, w.dev2]
    assert ids("text eq 'dev*'") == [w.dev1, w.dev2]
    assert ids("text eq 'O''B'") == [w.obrien]
    assert ids("text ne 'dev' and has(c8y_IsDevice)") == [w.dev3]


# --- Boolean structure ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_and_binds_tighter_than_or(world: World) -> None:
    w = world
    assert ids("has(c8y_IsDevice) and owner eq bob or name eq 'Sub'") == [w.dev2, w.subgroup]
    assert ids("name eq 'Sub' or has(c8y_IsDevice) and owner eq bob") == [w.dev2, w.subgroup]
    assert ids("has(c8y_IsDevice) and (owner eq bob or name eq 'Sub')") == [w.dev2]
    assert ids("(name eq 'Sub' or has(c8y_IsDevice)) and owner eq bob") == [w.dev2]


@pytest.mark.django_db
def test_not_binds_to_the_next_term(world: World) -> None:
    w = world
    assert ids("not owner eq admin and has(c8y_IsDevice)") == [w.dev2]
    assert ids("not (owner eq admin and has(c8y_IsDevice))") == [
        w.dev2,
        w.group,
        w.subgroup,
        w.obrien,
        w.bare,
    ]
    assert ids("NOT (has(c8y_IsDevice) OR has(c8y_IsDeviceGroup))") == [w.obrien, w.bare]
    assert ids("not not has(c8y_IsDeviceGroup)") == [w.group, w.subgroup]
    assert ids("((has(c8y_IsDevice)))") == [w.dev1, w.dev2, w.dev3]


# --- Ordering ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_orderby(world: World) -> None:
    w = world
    devices = "has(c8y_IsDevice) $orderby="
    assert ids(devices + "name") == [w.dev1, w.dev2, w.dev3]
    assert ids(devices + "name desc") == [w.dev3, w.dev2, w.dev1]
    assert ids(devices + "name ASC") == [w.dev1, w.dev2, w.dev3]
    assert ids("$orderby=id desc") == everyone(w)[::-1]
    assert ids("$orderby=id") == everyone(w)
    # objects without the property come last in both directions, then by id
    assert ids("$orderby=name desc") == [
        w.subgroup,
        w.dev3,
        w.obrien,
        w.group,
        w.dev2,
        w.dev1,
        w.bare,
    ]
    # owner ties break on ascending id
    assert ids("$orderby=owner desc") == [
        w.obrien,
        w.bare,
        w.dev2,
        w.dev1,
        w.dev3,
        w.group,
        w.subgroup,
    ]
    assert ids("$orderby=type desc, id desc") == [
        w.obrien,
        w.dev2,
        w.dev1,
        w.dev3,
        w.subgroup,
        w.group,
        w.bare,
    ]
    assert ids("$orderby=creationTime desc") == everyone(w)[::-1]
    assert ids("$orderby=lastUpdated.date") == everyone(w)


@pytest.mark.django_db
def test_orderby_fragment_path_uses_json_values(world: World) -> None:
    w = world
    assert ids("has(c8y_IsDevice) $orderby=level desc") == [w.dev2, w.dev3, w.dev1]
    assert ids("has(c8y_IsDevice) $orderby=level") == [w.dev1, w.dev3, w.dev2]  # 5 < 7 < 10
    assert ids("$orderby=c8y_Hardware.model desc") == [
        w.dev2,
        w.dev1,
        w.dev3,
        w.group,
        w.subgroup,
        w.obrien,
        w.bare,
    ]


@pytest.mark.django_db
def test_orderby_fragment_path_orders_types_like_jsonb(world: World) -> None:
    """Strings before numbers, whatever the database (jsonb's order); missing values last."""
    w = world
    # "5" (O'Brien) < "high" (group) < 5 < 7 < 10, then the objects without a level
    assert ids("$orderby=level") == [w.obrien, w.group, w.dev1, w.dev3, w.dev2, w.subgroup, w.bare]
    assert ids("$orderby=level desc") == [
        w.dev2,
        w.dev3,
        w.dev1,
        w.group,
        w.obrien,
        w.subgroup,
        w.bare,
    ]


# --- The corners of lax jsonpath, the same on every database -----------------------------------


@dataclass
class Corners:
    two: int
    three: int
    nested: int
    listed: int
    lines: int


@pytest.fixture
def corners(db: None) -> Corners:
    def create(**data: object) -> int:
        return managed_object_create(owner="admin", data=data).pk

    return Corners(
        two=create(
            name="two",
            deep=[["x"]],
            flag=True,
            nothing=None,
            num=5.0,
            odd="a?b[c]",
            multi="line\nbreak",
            **{"é": "ü", "a\\b": 1},
        ),
        three=create(name="three", deep=[[["x"]]], flag=False, num=5, odd="axb"),
        nested=create(name="nested", deep=[[{"k": "x"}]], num=12345678901234567890),
        listed=create(name="listed", deep=[{"k": ["x"]}], num="5"),
        lines=create(name="end\n", multi="line\n"),
    )


@pytest.mark.django_db
def test_arrays_unwrap_twice_at_the_end_and_once_per_member_step(corners: Corners) -> None:
    c = corners
    assert ids("deep eq x") == [c.two]  # [["x"]] yes, [[["x"]]] no
    assert ids("deep eq 'x*'") == [c.two]
    assert ids("deep.k eq x") == [c.listed]  # not through [[{...}]]


@pytest.mark.django_db
def test_booleans_order_false_before_true_and_null_matches_nothing(corners: Corners) -> None:
    c = corners
    assert ids("flag gt false") == [c.two]
    assert ids("flag lt true") == [c.three]
    assert ids("flag ge false") == [c.two, c.three]
    assert ids("nothing eq 'null'") == []
    assert ids("nothing le 'z'") == []
    assert c.two in ids("nothing ne 'x'")


@pytest.mark.django_db
def test_numbers_compare_as_numbers_whatever_their_form(corners: Corners) -> None:
    c = corners
    assert ids("num eq 5") == [c.two, c.three]  # 5.0 and 5, not the string "5"
    assert ids("num eq 5.0") == [c.two, c.three]
    assert ids("num gt 99999999999999999999") == []  # beyond 64 bits
    assert ids("num gt 9999999999999999999") == [c.nested]
    assert ids("num lt -99999999999999999999") == []


@pytest.mark.django_db
def test_keys_beyond_ascii_and_with_backslashes(corners: Corners) -> None:
    c = corners
    assert ids("é eq 'ü'") == [c.two]
    assert ids("é eq ü*") == [c.two]
    assert ids("a\\b eq 1") == [c.two]


@pytest.mark.django_db
def test_wildcards_span_newlines_and_match_the_whole_value(corners: Corners) -> None:
    c = corners
    assert ids("multi eq 'line*break'") == [c.two]
    assert ids("multi eq 'line*'") == [c.two, c.lines]
    assert ids("multi eq '*e'") == []  # "line\n" ends with a newline, not with "e"
    assert ids("name eq 'end*'") == [c.lines]
    assert ids("name eq 'e*d'") == []
    assert ids("name ne 'e*d'") == [c.two, c.three, c.nested, c.listed, c.lines]
    # GLOB's and regexes' own special characters are literal
    assert ids("odd eq 'a?b*'") == [c.two]
    assert ids("odd eq 'a[?]*'") == []
    assert ids("odd eq '*[c]'") == [c.two]
    assert ids("name eq '[t]*'") == []


# --- Shapes real clients send --------------------------------------------------------------------


@pytest.mark.django_db
def test_c8y_api_shapes(world: World) -> None:
    w = world
    assert ids("$filter=(has(c8y_IsDevice) and name eq 'Dev*')+$orderby=name desc") == [
        w.dev2,
        w.dev1,
    ]
    assert ids("$filter=(type eq c8y_Linux and owner eq admin)") == [w.dev1]
    assert ids(f"bygroupid({w.subgroup})") == [w.dev2]
    assert ids("$filter=(name eq 'Sensor') $orderby=name") == [w.dev3]
    assert ids("$filter=has(c8y_IsDevice)++ +$orderby=name desc") == [w.dev3, w.dev2, w.dev1]
    assert ids("$FILTER=name EQ 'Sensor' $ORDERBY=name DESC") == [w.dev3]
    assert ids("  $filter=  name eq 'Sensor'  ") == [w.dev3]
    assert ids("$filter=has(c8y_IsDevice)+and+owner+eq+bob") == [w.dev2]


# --- Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "$filter=",
        "$filter=+$orderby=name",
        "$orderby=",
        "$orderby=name,",
        "$orderby=name sideways",
        "$orderby=name desc asc",
        "$orderby=text",
        "$orderby=childDevices",
        "$orderby=name $filter=name eq 'x'",
        "$filter=$filter=name eq 'x'",
        "$top=5",
        "name eq 'abc",
        "name eq 'it''s",
        "name eq",
        "name 'x'",
        "name like 'x'",
        "name eq (x)",
        'name eq "x"',
        "name eq 'x' garbage",
        "name eq 'x' and",
        "and name eq 'x'",
        "name eq 'x' or or name eq 'y'",
        "name eq 'x' name eq 'y'",
        "not",
        "(name eq 'x'",
        "name eq 'x')",
        "()",
        "foo(bar)",
        "has()",
        "has(a, b)",
        "has(c8y_IsDevice",
        "hasany()",
        "hasany(a,,b)",
        "has(name)",
        "has(id)",
        "has(creationTime)",
        "has(self)",
        "hasany(c8y_IsDevice, childAssets)",
        "has(c8y_Hardware.model)",
        "bygroupid()",
        "bygroupid(abc)",
        "bygroupid(-5)",
        "id eq 'abc'",
        "id eq 1.5",
        "id eq '1*'",
        "creationTime gt 'yesterday'",
        "creationTime gt 5",
        "lastUpdated eq '2024-13-01T00:00:00Z'",
        "creationTime.foo eq '2024-01-01'",
        "name.first eq 'x'",
        "childDevices.id eq 1",
        "self eq x",
        "text gt 'a'",
        "a..b eq 1",
        ".a eq 1",
        "a* eq 1",
        "name eq 'a\x00b'",
    ],
)
def test_invalid_queries_raise_invalid_query(text: str) -> None:
    with pytest.raises(InvalidQuery):
        parse_query(text)


def test_error_messages_point_at_the_problem() -> None:
    with pytest.raises(InvalidQuery, match="unterminated string starting at position 9"):
        parse_query("name eq 'abc")
    with pytest.raises(InvalidQuery, match="unknown function 'foo'"):
        parse_query("foo(bar)")
    with pytest.raises(InvalidQuery, match="standard property"):
        parse_query("has(name)")
    with pytest.raises(InvalidQuery, match="'garbage' at position 14"):
        parse_query("name eq 'x'  garbage")


def test_invalid_query_is_a_422() -> None:
    with pytest.raises(InvalidQuery) as caught:
        parse_query("name eq")
    assert caught.value.status_code == 422
    assert caught.value.message.startswith("Invalid data! A query could not be understood:")
