"""Operator UI for managed objects, their child references and external IDs.

Every write goes through `inventory.services`, as the REST API's do: the admin only validates
forms and maps a service's refusal onto a form error. Inline changes are rehearsed with the real
services inside a savepoint that is always rolled back, so a refused edit (a childDevices cycle,
an identity bound elsewhere) is shown on the form and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection, models, transaction
from django.db.models import Count, Exists, Min, OuterRef, Q, QuerySet
from django.db.models.functions import Upper
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import smart_split, unescape_string_literal

from deviceplatform.admin import DeviceUserAdminBase
from deviceplatform.admin_lists import EstimatedCountPaginator, FleetListMixin, IdInputFilter
from deviceplatform.api.exceptions import ApiError
from deviceplatform.api.params import MAX_ID
from deviceplatform.api.parsers import json_document_problem
from deviceplatform.models import DeviceUser
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from inventory.selectors import has_parent_q
from inventory.services import (
    COLUMN_KEYS,
    FORBIDDEN_NAME_CHARS,
    READ_ONLY_KEYS,
    external_id_create,
    external_id_delete,
    managed_object_add_children,
    managed_object_create,
    managed_object_delete,
    managed_object_remove_children,
    managed_object_update,
)


class _Rehearsal(Exception):
    """Raised inside a rehearsal to roll its savepoint back."""


def rehearse(apply: Callable[[], Any]) -> None:
    """Run service calls in a savepoint that is always rolled back; a refusal becomes a form error.

    The admin's change view validates every form before it saves anything, so this is how a
    service's own rules (not a copy of them) decide whether an edit is valid."""
    try:
        with transaction.atomic():
            apply()
            raise _Rehearsal
    except _Rehearsal:
        pass
    except ApiError as exc:
        raise ValidationError(exc.message) from exc


def adopt(target: models.Model, source: models.Model) -> None:
    """Make the admin's in-memory object mirror the row a service saved (primary key included),
    so the admin's inlines, log entry and redirect all see what was written."""
    for model_field in source._meta.concrete_fields:
        setattr(target, model_field.attname, getattr(source, model_field.attname))
    target._state.adding = False
    target._state.db = source._state.db


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


JSON_KINDS = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


class FragmentsField(forms.JSONField):
    """The fragments document as indented JSON in a textarea. It must be a JSON object whose keys
    are fragment names; blank means no fragments."""

    default_error_messages = {
        "invalid": "Enter valid JSON: %(reason)s.",
        "not_object": "Fragments must be a JSON object ({ ... }), not %(kind)s.",
        "unstorable": "Fragments cannot be stored: %(reason)s.",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault(
            "widget",
            forms.Textarea(
                attrs={
                    "rows": 24,
                    "cols": 100,
                    "spellcheck": "false",
                    "class": "vLargeTextField",
                    "style": "font-family: monospace; width: 95%;",
                }
            ),
        )
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> Any:
        if self.disabled:
            return value
        if value is None or (isinstance(value, str) and not value.strip()):
            return {}
        if isinstance(value, str):
            try:
                # NaN/Infinity are not JSON and PostgreSQL's jsonb refuses them.
                value = json.loads(value, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise ValidationError(
                    self.error_messages["invalid"],
                    code="invalid",
                    params={"reason": f"{exc.msg} (line {exc.lineno}, column {exc.colno})"},
                ) from None
            except (ValueError, RecursionError) as exc:  # deeper than Python's json reads
                raise ValidationError(
                    self.error_messages["invalid"],
                    code="invalid",
                    params={"reason": str(exc) or "nested too deeply"},
                ) from None
        if not isinstance(value, dict):
            raise ValidationError(
                self.error_messages["not_object"],
                code="not_object",
                params={"kind": JSON_KINDS.get(type(value), "null")},
            )
        # The API's own rule (NUL, nesting depth, number range), so no path stores what it refuses.
        problem = json_document_problem(value)
        if problem is not None:
            raise ValidationError(
                self.error_messages["unstorable"], code="unstorable", params={"reason": problem}
            )
        return value

    def bound_data(self, data: Any, initial: Any) -> Any:
        if self.disabled or data is None:
            return super().bound_data(data, initial)
        try:
            return self.to_python(data)
        except ValidationError:
            return forms.fields.InvalidJSONInput(data)  # redisplayed exactly as typed

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value  # the operator's text, unchanged, so it can be corrected
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)


class ManagedObjectForm(forms.ModelForm):
    fragments = FragmentsField(
        help_text=(
            "Every top-level key is a fragment (c8y_IsDevice makes a device, "
            "com_cumulocity_model_Agent an agent, c8y_IsDeviceGroup a group). "
            "Removing a key removes the fragment."
        )
    )

    class Meta:
        model = ManagedObject
        fields = ["name", "type", "owner", "fragments"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "owner" in self.fields:
            self.fields["owner"].required = False
            self.fields["owner"].help_text = (
                "Blank: you when adding, unchanged when editing."
                if self.instance.pk is None
                else "Blank keeps the current owner."
            )

    def clean_fragments(self) -> dict[str, Any]:
        fragments = self.cleaned_data["fragments"]
        errors = []
        for key in fragments:
            if key in COLUMN_KEYS:
                errors.append(f"{key!r} is a standard property: use its field above.")
            elif key in READ_ONLY_KEYS:
                errors.append(f"{key!r} is read-only and cannot be a fragment.")
            elif not key or FORBIDDEN_NAME_CHARS & set(key):
                errors.append(
                    f"Invalid fragment name {key!r}: names may not contain '.', '$' or whitespace."
                )
        if errors:
            raise ValidationError(errors)
        return fragments


# --- inlines ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What an inline formset asks for. An edited row is removed (its initial values) and added
    again (its new values), so the services see only the operations they offer."""

    deleted: list[forms.ModelForm] = field(default_factory=list)
    changed: list[forms.ModelForm] = field(default_factory=list)
    new: list[forms.ModelForm] = field(default_factory=list)

    @property
    def removals(self) -> list[forms.ModelForm]:
        return self.deleted + self.changed

    @property
    def additions(self) -> list[forms.ModelForm]:
        return self.changed + self.new


class ServiceInlineFormSet(forms.BaseInlineFormSet):
    """An inline formset that writes through services: `apply` makes the calls (returning the
    added rows in `plan.additions` order), `clean` rehearses them, `save_through_services` does
    them for real."""

    def plan(self) -> _Plan:
        plan = _Plan()
        for form in self.initial_forms:
            if self.can_delete and self._should_delete_form(form):
                plan.deleted.append(form)
            elif form.has_changed():
                plan.changed.append(form)
        for form in self.extra_forms:
            if form.has_changed() and not self._should_delete_form(form):
                plan.new.append(form)
        return plan

    def apply(self, parent: ManagedObject, plan: _Plan) -> list[models.Model]:
        raise NotImplementedError

    def clean(self) -> None:
        super().clean()
        if any(self.errors) or self.instance.pk is None:
            # A new parent has no references or identities yet: nothing a service could refuse.
            return
        plan = self.plan()
        if plan.removals or plan.additions:
            parent = ManagedObject.objects.get(pk=self.instance.pk)
            rehearse(lambda: self.apply(parent, plan))

    def save_through_services(self) -> None:
        """Apply the plan and fill in what the admin's change message reads from a formset."""
        plan = self.plan()
        added = self.apply(self.instance, plan)
        edited = len(plan.changed)
        self.changed_objects = [
            (obj, form.changed_data) for form, obj in zip(plan.changed, added[:edited], strict=True)
        ]
        self.new_objects = added[edited:]
        self.deleted_objects = [form.instance for form in plan.deleted]


class ExternalIdTypeForm(forms.ModelForm):
    def clean_type(self) -> str:
        value = self.cleaned_data["type"]
        if "/" in value:
            raise ValidationError("An external ID type may not contain '/'.")
        return value


class ExternalIdFormSet(ServiceInlineFormSet):
    def apply(self, parent: ManagedObject, plan: _Plan) -> list[models.Model]:
        for form in plan.removals:
            current = ExternalId.objects.filter(pk=form.instance.pk).first()
            if current is not None:
                external_id_delete(external_id=current)
        added: list[models.Model] = []
        for form in plan.additions:
            external_id, _ = external_id_create(
                managed_object=parent,
                type=form.cleaned_data["type"],
                external_id=form.cleaned_data["external_id"],
            )
            added.append(external_id)
        return added


class ExternalIdInline(admin.TabularInline):
    model = ExternalId
    form = ExternalIdTypeForm
    formset = ExternalIdFormSet
    fields = ["type", "external_id"]
    extra = 1


# --- fleet-scale device list -----------------------------------------------------------------

SERIAL_TYPE = "c8y_Serial"
CHILDREN_PER_PAGE = 50
FOUND_LIMIT = 20
MAX_ADDED_CHILDREN = 1_000
AGENT_IDS_LIMIT = 10_000
KINDS = [("agent", "is_agent"), ("device", "is_device"), ("group", "is_group")]


def _object_label(pk: int) -> str:
    found = ManagedObject.objects.filter(pk=pk).values_list("name", flat=True).first()
    return f"#{pk} {found}" if found else f"#{pk}"


class AgentFilter(IdInputFilter):
    """The agent itself and the devices under it (childDevices, two levels), as its queue sees
    them. Each level is one indexed EXISTS."""

    title = "agent"
    parameter_name = "agent"

    def label(self, pk: int) -> str:
        return _object_label(pk)

    def filter(self, queryset: QuerySet[ManagedObject], pk: int) -> QuerySet[ManagedObject]:
        # The two levels' IDs through the reference index (two queries), so the list reads only
        # those rows; an agent with more devices than that is filtered by EXISTS instead.
        edges = ManagedObjectReference.objects.filter(relation=Relation.DEVICE).order_by()
        children = list(
            edges.filter(parent_id=pk).values_list("child_id", flat=True)[: AGENT_IDS_LIMIT + 1]
        )
        grandchildren = list(
            edges.filter(parent_id__in=children).values_list("child_id", flat=True)[
                : AGENT_IDS_LIMIT + 1
            ]
        )
        if len(children) + len(grandchildren) <= AGENT_IDS_LIMIT:
            return queryset.filter(pk__in={pk, *children, *grandchildren})
        below = edges.filter(parent_id=pk).values("child_id")
        return queryset.filter(
            Q(pk=pk)
            | has_parent_q(Relation.DEVICE, pk)
            | Q(Exists(edges.filter(child=OuterRef("pk"), parent_id__in=below)))
        )


class GroupFilter(IdInputFilter):
    """The group's members (its childAssets), as a bulk operation over the group targets them."""

    title = "group"
    parameter_name = "group"

    def label(self, pk: int) -> str:
        return _object_label(pk)

    def filter(self, queryset: QuerySet[ManagedObject], pk: int) -> QuerySet[ManagedObject]:
        return queryset.filter(has_parent_q(Relation.ASSET, pk))


FIRST_TYPES_SQL = """
WITH RECURSIVE types(type) AS (
    SELECT * FROM (SELECT type FROM inventory_managedobject WHERE type > ''
                   ORDER BY type LIMIT 1) AS first_type
    UNION ALL
    SELECT (SELECT m.type FROM inventory_managedobject m WHERE m.type > types.type
            ORDER BY m.type LIMIT 1)
    FROM types WHERE types.type IS NOT NULL
)
SELECT type FROM types WHERE type IS NOT NULL LIMIT %s
"""


class TypeFilter(admin.SimpleListFilter):
    """The first 30 types in alphabetical order, read by skipping through the type index (one
    index probe per type, however many objects share it), not by grouping every row."""

    title = "type"
    parameter_name = "type__exact"
    limit = 30

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        with connection.cursor() as cursor:
            cursor.execute(FIRST_TYPES_SQL, [self.limit])
            return [(row[0], row[0]) for row in cursor.fetchall()]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[ManagedObject]
    ) -> QuerySet[ManagedObject]:
        value = self.value()
        return queryset.filter(type=value) if value else queryset


class ManagedObjectChangeList(ChangeList):
    """Looks up the page's parents and serials in one query each, whatever the page size."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows = list(self.result_list)
        ids = [row.pk for row in rows]
        parents: dict[int, tuple[int, str | None, bool]] = {}
        for child_id, parent_id, name, is_agent in (
            ManagedObjectReference.objects.filter(child_id__in=ids, relation=Relation.DEVICE)
            .order_by("-id")
            .values_list("child_id", "parent_id", "parent__name", "parent__is_agent")
        ):
            parents[child_id] = (parent_id, name, is_agent)  # the oldest edge wins
        serials: dict[int, str] = {}
        for managed_object_id, value in (
            ExternalId.objects.filter(managed_object_id__in=ids, type=SERIAL_TYPE)
            .order_by("-id")
            .values_list("managed_object_id", "external_id")
        ):
            serials[managed_object_id] = value
        for row in rows:
            row.device_parent = parents.get(row.pk)
            row.serial = serials.get(row.pk)
        self.result_list = rows


SEARCH_CANDIDATES_LIMIT = 10_000
MAX_SEARCH_WORDS = 5
SEARCH_FIELDS = ("name", "type", "owner")


def search_candidates(term: str) -> set[int] | None:
    """IDs that contain every word of `term` in a search field that is rare enough to look up
    (at most SEARCH_CANDIDATES_LIMIT objects per word and field): a superset of the matches
    for the admin's search to check. None when every word is common. Three indexed queries per
    word, whatever the fleet's size."""
    candidates: set[int] | None = None
    words = [
        unescape_string_literal(bit) if bit[:1] in {'"', "'"} and bit[-1:] == bit[:1] else bit
        for bit in smart_split(term)
    ]
    for word in words[:MAX_SEARCH_WORDS]:
        ids: set[int] = set()
        for name in SEARCH_FIELDS:
            found = list(
                ManagedObject.objects.filter(**{f"{name}__icontains": word})
                .order_by()
                .values_list("pk", flat=True)[: SEARCH_CANDIDATES_LIMIT + 1]
            )
            if len(found) > SEARCH_CANDIDATES_LIMIT:
                break
            ids.update(found)
        else:
            candidates = ids if candidates is None else candidates & ids
    return candidates


def firmware_of(fragments: dict[str, Any]) -> str | None:
    firmware = fragments.get("c8y_Firmware")
    if not isinstance(firmware, dict):
        return None
    name, version = firmware.get("name"), firmware.get("version")
    parts = [str(part) for part in (name, version) if part not in (None, "")]
    return " ".join(parts) or None


# --- model admins ----------------------------------------------------------------------------


@admin.register(ManagedObject)
class ManagedObjectAdmin(FleetListMixin, admin.ModelAdmin):
    form = ManagedObjectForm
    inlines = [ExternalIdInline]
    list_display = [
        "id",
        "name",
        "type",
        "agent_or_parent",
        "serial",
        "firmware",
        "owner",
        "kind",
        "last_updated",
    ]
    list_display_links = ["id", "name"]
    # No filter lists every owner or agent: a fleet has one owner per device and thousands of
    # agents. Agent and group take an ID; owner is found through the search box.
    list_filter = ["is_device", "is_agent", "is_group", TypeFilter, AgentFilter, GroupFilter]
    search_fields = ["name", "type", "owner"]
    search_help_text = "ID, or part of a name, type, owner or external ID value."
    ordering = ["-id"]
    readonly_fields = [
        "is_device",
        "is_agent",
        "is_group",
        "creation_time",
        "last_updated",
        "parents",
    ]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return ManagedObjectChangeList

    @admin.display(description="agent / parent")
    def agent_or_parent(self, obj: ManagedObject) -> str:
        parent = getattr(obj, "device_parent", None)
        if parent is None:
            return "-"
        pk, name, is_agent = parent
        return format_html(
            '<a href="{}">{}</a>{}',
            reverse("admin:inventory_managedobject_change", args=[pk]),
            name or f"#{pk}",
            " (agent)" if is_agent else "",
        )

    @admin.display(description="kind")
    def kind(self, obj: ManagedObject) -> str:
        kinds = [name for name, flag in KINDS if getattr(obj, flag)]
        return ", ".join(kinds) or "-"

    @admin.display(description="serial")
    def serial(self, obj: ManagedObject) -> str:
        return getattr(obj, "serial", None) or "-"

    @admin.display(description="firmware")
    def firmware(self, obj: ManagedObject) -> str:
        return firmware_of(obj.fragments) or "-"

    # --- children: a paged, read-only list with add and remove by ID or search ---------------

    def get_urls(self) -> list[Any]:
        return [
            path(
                "<path:object_id>/children/",
                self.admin_site.admin_view(self.children_view),
                name="inventory_managedobject_children",
            ),
            *super().get_urls(),
        ]

    def children_context(self, request: HttpRequest, parent: ManagedObject) -> dict[str, Any]:
        """One page of the parent's child references (newest first) and, when the operator
        searched, the objects found to add. A fixed number of queries whatever the count."""
        relation = request.GET.get("children_relation", "")
        refs = parent.child_refs.select_related("child").order_by("-id")
        if relation in Relation.values:
            refs = refs.filter(relation=relation)
        else:
            relation = ""
        paginator = EstimatedCountPaginator(
            refs.only(
                "id",
                "parent",
                "relation",
                "child",
                "child__name",
                "child__type",
                "child__is_agent",
                "child__is_device",
                "child__is_group",
                "child__last_updated",
            ),
            CHILDREN_PER_PAGE,
        )
        page = paginator.get_page(request.GET.get("children_page"))
        find = request.GET.get("find", "").strip()[:200]
        found: list[ManagedObject] = []
        if find:
            candidates = ManagedObject.objects.exclude(pk=parent.pk)
            term = Q(name__icontains=find) | Q(
                Exists(
                    ExternalId.objects.filter(
                        managed_object=OuterRef("pk"), external_id__icontains=find
                    )
                )
            )
            if find.isdigit() and int(find) <= MAX_ID:
                term |= Q(pk=int(find))
            found = list(candidates.filter(term).order_by("-id")[:FOUND_LIMIT])

        def link(**params: Any) -> str:
            query = request.GET.copy()
            for key, value in params.items():
                query[key] = value
            return "?" + query.urlencode() + "#children"

        return {
            "children_page": page,
            "children_relation": relation,
            "children_relations": Relation.choices,
            "children_previous": link(children_page=page.number - 1) if page.number > 1 else None,
            "children_next": link(children_page=page.number + 1)
            if len(page.object_list) == CHILDREN_PER_PAGE
            else None,
            "children_url": reverse("admin:inventory_managedobject_children", args=[parent.pk]),
            "children_find": find,
            "children_found": found,
            "children_found_limit": FOUND_LIMIT,
        }

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra_context = dict(extra_context or {})
        parent = self.get_object(request, object_id)
        if parent is not None and request.method == "GET":
            extra_context.update(self.children_context(request, parent))
        return super().change_view(request, object_id, form_url, extra_context)

    def children_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: add the given IDs as children in one relation, or remove the chosen references;
        both through inventory.services, each with a history entry naming the operator."""
        parent = self.get_object(request, unquote(object_id))
        if parent is None:
            raise Http404("No such managed object")
        if not self.has_change_permission(request, parent):
            raise PermissionDenied
        back = reverse("admin:inventory_managedobject_change", args=[parent.pk]) + "#children"
        if request.method != "POST":
            return HttpResponseRedirect(back)
        try:
            if "remove" in request.POST:
                message = self._remove_children(request, parent)
            else:
                message = self._add_children(request, parent)
        except ValidationError as exc:
            self.message_user(request, " ".join(exc.messages), messages.ERROR)
        except ApiError as exc:
            self.message_user(request, exc.message, messages.ERROR)
        else:
            if message:
                self.log_change(request, parent, message)
                self.message_user(request, message, messages.SUCCESS)
        return HttpResponseRedirect(back)

    def _add_children(self, request: HttpRequest, parent: ManagedObject) -> str:
        relation = request.POST.get("relation", "")
        if relation not in Relation.values:
            raise ValidationError(f"Choose a relation ({', '.join(Relation.values)}).")
        tokens = [
            *request.POST.get("ids", "").replace(",", " ").split(),
            *request.POST.getlist("child"),
        ]
        if not tokens:
            raise ValidationError("Give the IDs of the objects to add, or tick found objects.")
        wrong = [token for token in tokens if not token.isdigit() or not 0 < int(token) <= MAX_ID]
        if wrong:
            raise ValidationError(f"Not IDs: {', '.join(wrong[:10])}.")
        if len(tokens) > MAX_ADDED_CHILDREN:
            raise ValidationError(f"Add at most {MAX_ADDED_CHILDREN:,} children at a time.")
        ids = list(dict.fromkeys(int(token) for token in tokens))
        children = ManagedObject.objects.in_bulk(ids)
        missing = [str(pk) for pk in ids if pk not in children]
        if missing:
            raise ValidationError(f"No managed object with ID {', '.join(missing[:10])}.")
        managed_object_add_children(
            parent=parent, relation=Relation(relation), children=[children[pk] for pk in ids]
        )
        segment = Relation(relation).children_segment
        return f"Added {segment}: {', '.join(map(str, ids))}."

    def _remove_children(self, request: HttpRequest, parent: ManagedObject) -> str:
        chosen = [value for value in request.POST.getlist("reference") if value.isdigit()]
        if not chosen:
            raise ValidationError("Tick the children to remove.")
        refs = list(
            parent.child_refs.filter(pk__in=[int(value) for value in chosen[:MAX_ADDED_CHILDREN]])
            .order_by("id")
            .values_list("relation", "child_id")
        )
        by_relation: dict[str, list[int]] = {}
        for relation, child_id in refs:
            by_relation.setdefault(relation, []).append(child_id)
        parts = []
        with transaction.atomic():
            for relation, child_ids in by_relation.items():
                managed_object_remove_children(
                    parent=parent, relation=Relation(relation), child_ids=child_ids
                )
                parts.append(
                    f"{Relation(relation).children_segment}: {', '.join(map(str, child_ids))}"
                )
        if not parts:
            raise ValidationError("The ticked children are no longer children of this object.")
        return f"Removed {'; '.join(parts)}."

    def get_fieldsets(self, request: HttpRequest, obj: ManagedObject | None = None) -> Any:
        fieldsets: list[tuple[str | None, dict[str, Any]]] = [
            (None, {"fields": ["name", "type", "owner"]}),
            ("Fragments", {"fields": ["fragments"]}),
        ]
        if obj is not None:
            fieldsets += [
                (
                    "Derived",
                    {
                        "fields": [
                            ("is_device", "is_agent", "is_group"),
                            ("creation_time", "last_updated"),
                            "parents",
                        ]
                    },
                ),
            ]
        return fieldsets

    @admin.display(description="parents")
    def parents(self, obj: ManagedObject) -> str:
        if obj.pk is None:
            return "-"
        refs = obj.parent_refs.select_related("parent").order_by("relation", "id")
        if not refs:
            return "-"
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "",
                '<li>{}: <a href="{}">{}</a></li>',
                (
                    (
                        Relation(ref.relation).parents_segment,
                        reverse("admin:inventory_managedobject_change", args=[ref.parent_id]),
                        str(ref.parent),
                    )
                    for ref in refs
                ),
            ),
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ManagedObject], search_term: str
    ) -> tuple[QuerySet[ManagedObject], bool]:
        """Django's word-by-word search over name, type and owner, or the whole term in an
        external ID, or the ID itself. Words that few objects contain are first looked up through
        the trigram indexes (migration 0004), so the search reads a few candidate rows instead
        of the whole fleet; a word most objects contain is left to the plain search, which finds
        a page of matches early."""
        term = search_term.strip()
        if not term:
            return queryset, False
        candidates = search_candidates(term)
        narrowed = queryset if candidates is None else queryset.filter(pk__in=candidates)
        found, may_have_duplicates = super().get_search_results(request, narrowed, search_term)
        if len(term) > 1024:  # longer than any external ID: nothing more to find
            return found, may_have_duplicates
        by_identity = list(
            ExternalId.objects.filter(external_id__icontains=term)
            .order_by()
            .values_list("managed_object_id", flat=True)[: SEARCH_CANDIDATES_LIMIT + 1]
        )
        if len(by_identity) <= SEARCH_CANDIDATES_LIMIT:
            extra = Q(pk__in=by_identity)
        else:
            extra = Q(
                Exists(
                    ExternalId.objects.filter(
                        managed_object=OuterRef("pk"), external_id__icontains=term
                    )
                )
            )
        if term.isdigit() and int(term) <= MAX_ID:
            extra |= Q(pk=int(term))
        return found | queryset.filter(extra), may_have_duplicates

    def save_model(
        self, request: HttpRequest, obj: ManagedObject, form: forms.ModelForm, change: bool
    ) -> None:
        data = {
            "name": form.cleaned_data.get("name"),
            "type": form.cleaned_data.get("type"),
            "owner": form.cleaned_data.get("owner") or None,
            **form.cleaned_data["fragments"],
        }
        if not change:
            saved = managed_object_create(
                owner=request.user.get_username(), data=data, allow_owner=True
            )
        else:
            current = ManagedObject.objects.select_for_update(no_key=True).get(pk=obj.pk)
            # The service merges fragments key by key; a key the operator removed is sent as
            # null so that the edited document is what gets stored.
            for key in current.fragments.keys() - form.cleaned_data["fragments"].keys():
                data[key] = None
            saved = managed_object_update(managed_object_id=current.pk, data=data, allow_owner=True)
        adopt(obj, saved)

    def save_formset(
        self, request: HttpRequest, form: forms.ModelForm, formset: Any, change: bool
    ) -> None:
        if isinstance(formset, ServiceInlineFormSet):
            formset.save_through_services()
        else:
            super().save_formset(request, form, formset, change)

    def delete_model(self, request: HttpRequest, obj: ManagedObject) -> None:
        deleted = managed_object_delete(managed_object=obj)
        also = [pk for pk in deleted if pk != obj.pk]
        if also:
            messages.info(request, f"Also deleted subgroups: {', '.join(map(str, also))}.")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ManagedObject]) -> None:
        for pk in list(queryset.values_list("pk", flat=True)):
            # An earlier deletion in this batch may already have taken it (a group's subgroups).
            managed_object = ManagedObject.objects.filter(pk=pk).first()
            if managed_object is not None:
                managed_object_delete(managed_object=managed_object)


class ExternalIdForm(ExternalIdTypeForm):
    class Meta:
        model = ExternalId
        fields = ["type", "external_id", "managed_object"]

    def _post_clean(self) -> None:
        # After Django's own checks (uniqueness included), let the service have the last word.
        super()._post_clean()
        if self.errors or not self.has_changed():
            return
        pk = self.instance.pk
        data = self.cleaned_data

        def apply() -> None:
            current = ExternalId.objects.filter(pk=pk).first() if pk else None
            if current is not None:
                external_id_delete(external_id=current)
            external_id_create(
                managed_object=data["managed_object"],
                type=data["type"],
                external_id=data["external_id"],
            )

        try:
            rehearse(apply)
        except ValidationError as exc:
            self.add_error(None, exc)


@admin.register(ExternalId)
class ExternalIdAdmin(FleetListMixin, admin.ModelAdmin):
    form = ExternalIdForm
    list_display = ["type", "external_id", "managed_object_link"]
    list_display_links = ["type", "external_id"]
    list_select_related = ["managed_object"]
    list_filter = ["type"]
    search_fields = ["type", "external_id", "=managed_object__id"]
    search_help_text = "Part of a type or external ID, or a managed object's ID."
    autocomplete_fields = ["managed_object"]
    ordering = ["type", "external_id"]

    @admin.display(description="managed object", ordering="managed_object_id")
    def managed_object_link(self, obj: ExternalId) -> str:
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:inventory_managedobject_change", args=[obj.managed_object_id]),
            str(obj.managed_object),
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ExternalId], search_term: str
    ) -> tuple[QuerySet[ExternalId], bool]:
        term = search_term.strip()
        if term.isdigit() and int(term) > MAX_ID:
            # Django would compare the too-large number with a bigint column and fail.
            return queryset.filter(Q(type__icontains=term) | Q(external_id__icontains=term)), False
        return super().get_search_results(request, queryset, search_term)

    def save_model(
        self, request: HttpRequest, obj: ExternalId, form: forms.ModelForm, change: bool
    ) -> None:
        if change:
            if not form.has_changed():
                return
            current = ExternalId.objects.filter(pk=obj.pk).first()
            if current is not None:
                external_id_delete(external_id=current)
        saved, _ = external_id_create(
            managed_object=obj.managed_object, type=obj.type, external_id=obj.external_id
        )
        adopt(obj, saved)

    def delete_model(self, request: HttpRequest, obj: ExternalId) -> None:
        external_id_delete(external_id=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ExternalId]) -> None:
        for external_id in queryset:
            external_id_delete(external_id=external_id)


# --- device users with the devices they own --------------------------------------------------


@dataclass(frozen=True)
class OwnedObjects:
    """What a device user owns: the object to show (its agent, else its first device, else its
    first managed object) and how many managed objects it owns in all."""

    shown: ManagedObject
    count: int


def owned_objects(users: list[DeviceUser]) -> dict[int, OwnedObjects]:
    """The managed objects the given users own (owner matched case-insensitively, as ownership
    is), in two queries whatever the number of users: one aggregate over the owner index, one
    for the objects shown. Users need the `username_key` annotation (`Upper("username")`), so
    both sides are upper-cased by the database's own function."""
    keys = {user.username_key: user.pk for user in users}  # type: ignore[attr-defined]
    if not keys:
        return {}
    rows = list(
        ManagedObject.objects.annotate(owner_key=Upper("owner"))
        .filter(owner_key__in=list(keys))
        .values("owner_key")
        .annotate(
            count=Count("id"),
            agent=Min("id", filter=Q(is_agent=True)),
            device=Min("id", filter=Q(is_device=True)),
            first=Min("id"),
        )
        .order_by()
    )
    chosen = {row["owner_key"]: row["agent"] or row["device"] or row["first"] for row in rows}
    shown = ManagedObject.objects.only("id", "name", "is_agent").in_bulk(chosen.values())
    return {
        keys[row["owner_key"]]: OwnedObjects(shown[chosen[row["owner_key"]]], row["count"])
        for row in rows
        if row["owner_key"] in keys and chosen[row["owner_key"]] in shown
    }


class DeviceUserChangeList(ChangeList):
    """Looks up the devices of the page's users once per page, not once per row."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        owned = owned_objects(list(self.result_list))
        for user in self.result_list:
            user.owned = owned.get(user.pk)


@admin.register(DeviceUser)
class DeviceUserAdmin(DeviceUserAdminBase):
    """Device users (deviceplatform/admin.py) with the managed objects they own."""

    list_display = [
        "username",
        "devices",
        "is_active",
        "last_request_at",
        "last_login",
        "date_joined",
    ]
    readonly_fields = [*DeviceUserAdminBase.readonly_fields, "devices"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeviceUser]:
        return super().get_queryset(request).annotate(username_key=Upper("username"))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DeviceUserChangeList

    def get_fieldsets(self, request: HttpRequest, obj: DeviceUser | None = None) -> Any:
        fieldsets = list(super().get_fieldsets(request, obj))
        return [fieldsets[0], ("Devices", {"fields": ["devices"]}), *fieldsets[1:]]

    @admin.display(description="devices")
    def devices(self, obj: DeviceUser) -> str:
        if not hasattr(obj, "owned"):  # the change page: one user, looked up here
            obj.owned = owned_objects([obj]).get(obj.pk)  # type: ignore[attr-defined]
        owned: OwnedObjects | None = obj.owned  # type: ignore[attr-defined]
        if owned is None:
            return "-"
        link = format_html(
            '<a href="{}">{}</a>{}',
            reverse("admin:inventory_managedobject_change", args=[owned.shown.pk]),
            str(owned.shown),
            " (agent)" if owned.shown.is_agent else "",
        )
        if owned.count == 1:
            return link
        everything = reverse("admin:inventory_managedobject_changelist")
        return format_html(
            '{} + <a href="{}?{}">{} more</a>',
            link,
            everything,
            urlencode({"owner__exact": obj.username}),
            owned.count - 1,
        )
