"""Operator UI for bulk operations: progress at a glance, the prototype, drill-down to the child
operations by status, and reschedule/cancel through `bulkops.services`.

Every number shown comes from the bulk operation's own row plus the progress deltas not folded
into it yet (`bulkops.selectors`, in the same query as the rows), so the changelist costs the same
for 10 or 100,000 children and is exact on every page load. A ramp that keeps failing on a bulk
operation shows its reason in the "ramp error" column and on the change form. Writes go through the services, as the REST API's do: the change form
rehearses `bulk_operation_update` in a savepoint that is always rolled back, so a refusal (a
negative ramp, a bulk operation that completed meanwhile) is a form error and nothing is written.
Bulk operations are created by the API only, so the admin offers no "add"; the API's DELETE is a
cancel, so the admin offers the "Cancel" action instead of delete."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from bulkops.models import RUNNING_STATUSES, BulkOperation
from bulkops.selectors import bulk_operation_progress, bulk_operations_with_progress
from bulkops.serializers import (
    GENERAL_STATUSES,
    general_status,
    general_status_q,
    progress_json,
)
from bulkops.services import bulk_operation_cancel, bulk_operation_update
from devicecontrol.models import OperationStatus
from deviceplatform.api.dates import format_datetime
from deviceplatform.api.exceptions import ApiError
from deviceplatform.api.params import MAX_ID
from inventory.admin import adopt, rehearse
from inventory.models import ManagedObject

# `?refresh=<seconds>` on the changelist reloads it periodically (opt-in: a reload clears the
# row selection, which would fight an operator picking rows for an action).
REFRESH_PARAM = "refresh"
REFRESH_SECONDS = 10

# Progress segments in display order: (label in `progress()`, colour).
SEGMENTS = (
    ("successful", "#2e7d32"),
    ("failed", "#c62828"),
    ("executing", "#1565c0"),
    ("pending", "#f9a825"),
    ("not yet created", "#cfd8dc"),
)
CHILD_STATUSES = (
    OperationStatus.PENDING,
    OperationStatus.EXECUTING,
    OperationStatus.SUCCESSFUL,
    OperationStatus.FAILED,
)


def progress(bulk: BulkOperation) -> dict[str, int]:
    """The counters as the API reports them (bulkoperations.md §5), plus what is not created yet."""
    return {**progress_json(bulk, bulk_operation_progress(bulk)), "not yet created": bulk.remaining}


def progress_bar(bulk: BulkOperation) -> str:
    """An inline bar, one segment per counter proportional to `progress.all`, counts in tooltips."""
    counts = progress(bulk)
    total = counts["all"]
    summary = ", ".join(f"{label}: {counts[label]}" for label, _ in SEGMENTS)
    title = f"{summary} (all: {total})"
    if total <= 0:
        segments = format_html(
            '<span style="padding: 0 4px; color: #78909c;">{}</span>', "no targets"
        )
    else:
        segments = format_html_join(
            "",
            '<span class="bulk-progress-{}" title="{}: {}" '
            'style="display: inline-block; height: 100%; width: {}%; background: {};"></span>',
            (
                (
                    label.replace(" ", "-"),
                    label,
                    counts[label],
                    f"{100 * count / total:.3f}",
                    colour,
                )
                for label, colour in SEGMENTS
                if (count := max(counts[label], 0)) > 0
            ),
        )
    finished = counts["successful"] + counts["failed"]
    return format_html(
        '<span class="bulk-progress" title="{}" style="display: inline-flex; width: 180px; '
        "height: 12px; vertical-align: middle; overflow: hidden; border-radius: 3px; "
        'background: #eceff1; border: 1px solid #b0bec5;">{}</span> '
        '<span class="bulk-progress-text" title="{}">{}/{}</span>',
        title,
        segments,
        title,
        finished,
        total,
    )


def _object_link(pk: int | None, name: str | None = None) -> str:
    if pk is None:
        return "-"
    label = f"{name} [{pk}]" if name else str(pk)
    return format_html(
        '<a href="{}">{}</a>', reverse("admin:inventory_managedobject_change", args=[pk]), label
    )


def _bulk_link(pk: int | None) -> str:
    if pk is None:
        return "-"
    return format_html(
        '<a href="{}">{}</a>', reverse("admin:bulkops_bulkoperation_change", args=[pk]), pk
    )


def children_url(bulk_id: int, status: str | None = None) -> str:
    """The Operation changelist showing the child operations of `bulk_id` (with `status`)."""
    params = {"bulk_operation_id__exact": bulk_id}
    if status is not None:
        params["status__exact"] = status
    return f"{reverse('admin:devicecontrol_operation_changelist')}?{urlencode(params)}"


def _json(value: Any) -> str:
    return format_html(
        '<pre style="margin: 0; white-space: pre-wrap;">{}</pre>',
        json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True),
    )


# --- filters ---------------------------------------------------------------------------------


class GeneralStatusFilter(admin.SimpleListFilter):
    """generalStatus is derived (bulkoperations.md §6); the same derivation as SQL filters it."""

    title = "general status"
    parameter_name = "general_status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(value, value) for value in GENERAL_STATUSES]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[BulkOperation]
    ) -> QuerySet[BulkOperation]:
        value = self.value()
        if value is None:
            return queryset
        if value not in GENERAL_STATUSES:
            return queryset.none()
        return queryset.filter(general_status_q(value))


class RampErrorFilter(admin.SimpleListFilter):
    """Bulk operations whose ramp failed on its last attempt (`c8y_RampError`)."""

    title = "ramp error"
    parameter_name = "ramp_error"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "failing"), ("no", "none")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[BulkOperation]
    ) -> QuerySet[BulkOperation]:
        if self.value() == "yes":
            return queryset.filter(ramp_error_count__gt=0)
        if self.value() == "no":
            return queryset.filter(ramp_error_count=0)
        return queryset


# --- change form -----------------------------------------------------------------------------


class BulkOperationForm(forms.ModelForm):
    """Start date and creation ramp, the schedule an operator may change while the bulk operation
    runs; `bulk_operation_update` decides (and reschedules what is left from a new start)."""

    class Meta:
        model = BulkOperation
        fields = ["start_date", "creation_ramp"]
        help_texts = {
            "start_date": "Saving reschedules the targets not yet created from max(start, now).",
            "creation_ramp": "Seconds between two child operations (fractions allowed; 0 = all "
            "at once).",
        }

    def update_body(self) -> dict[str, Any]:
        """The PUT body for `bulk_operation_update`."""
        return {
            "startDate": format_datetime(self.cleaned_data["start_date"]),
            "creationRamp": self.cleaned_data["creation_ramp"],
        }

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.errors or not self.has_changed() or self.instance.pk is None:
            return
        if not {"start_date", "creation_ramp"} <= set(self.cleaned_data):
            return  # read-only (no longer running): nothing to send
        body = self.update_body()
        pk = self.instance.pk
        try:
            rehearse(lambda: bulk_operation_update(bulk_operation_id=pk, data=body))
        except ValidationError as exc:
            field = "creation_ramp" if "creationRamp" in str(exc.messages) else None
            if field is None and "startDate" in str(exc.messages):
                field = "start_date"
            self.add_error(field, exc)


# --- model admin -----------------------------------------------------------------------------


@admin.register(BulkOperation)
class BulkOperationAdmin(admin.ModelAdmin):
    form = BulkOperationForm
    list_display = [
        "id",
        "group_link",
        "failed_parent_link",
        "start_date",
        "creation_ramp",
        "status",
        "general_status_display",
        "progress_display",
        "ramp_error_display",
    ]
    list_display_links = ["id"]
    list_filter = ["status", GeneralStatusFilter, RampErrorFilter]
    # Searched by get_search_results (IDs only); listed here so the search box shows.
    search_fields = ["id", "group_id", "failed_parent_id"]
    search_help_text = "Bulk operation ID, group ID or failed-parent bulk operation ID."
    ordering = ["-id"]
    actions = ["cancel", "reschedule_now"]
    readonly_fields = [
        "group_link",
        "failed_parent_link",
        "status",
        "general_status_display",
        "progress_display",
        "counters",
        "child_links",
        "prototype_json",
        "fragments_json",
        "creation_time",
        "last_updated",
        "effective_start",
        "next_due_at",
        "ramp_error_display",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("group_link", "failed_parent_link"),
                    ("status", "general_status_display"),
                ]
            },
        ),
        (
            "Schedule",
            {
                "fields": [
                    "start_date",
                    "creation_ramp",
                    ("effective_start", "next_due_at"),
                    "ramp_error_display",
                ]
            },
        ),
        ("Progress", {"fields": ["progress_display", "counters", "child_links"]}),
        ("Operation prototype", {"fields": ["prototype_json", "fragments_json"]}),
        ("History", {"fields": [("creation_time", "last_updated")]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[BulkOperation]:
        # The group's name in the same query as the rows (no query per row).
        # The group's name and the exact progress in the same query as the rows.
        names = ManagedObject.objects.filter(pk=OuterRef("group_id")).values("name")[:1]
        queryset = bulk_operations_with_progress(super().get_queryset(request))
        return queryset.annotate(group_name=Subquery(names))

    def get_readonly_fields(self, request: HttpRequest, obj: BulkOperation | None = None) -> Any:
        if obj is not None and obj.status not in RUNNING_STATUSES:
            return [*self.readonly_fields, "start_date", "creation_ramp"]
        return self.readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # bulk operations are created through the API

    def has_delete_permission(self, request: HttpRequest, obj: BulkOperation | None = None) -> bool:
        return False  # the API's DELETE is a cancel: use the "Cancel" action

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # `?refresh=N` is ours, not a field lookup: take it out before the ChangeList sees it.
        refresh = None
        if REFRESH_PARAM in request.GET:
            query = request.GET.copy()
            value = query.pop(REFRESH_PARAM)[-1]
            refresh = int(value) if value.isdigit() and 1 <= int(value) <= 3600 else None
            request.GET = query
        context = {
            **(extra_context or {}),
            "refresh_seconds": refresh,
            "refresh_param": REFRESH_PARAM,
            "refresh_default": REFRESH_SECONDS,
        }
        return super().changelist_view(request, extra_context=context)

    # --- columns and read-only fields ---

    @admin.display(description="group", ordering="group_id")
    def group_link(self, obj: BulkOperation) -> str:
        return _object_link(obj.group_id, getattr(obj, "group_name", None))

    @admin.display(description="failed parent", ordering="failed_parent_id")
    def failed_parent_link(self, obj: BulkOperation) -> str:
        return _bulk_link(obj.failed_parent_id)

    @admin.display(description="general status")
    def general_status_display(self, obj: BulkOperation) -> str:
        return general_status(obj)

    @admin.display(description="ramp error", ordering="ramp_error_count")
    def ramp_error_display(self, obj: BulkOperation) -> str:
        if not obj.ramp_error_count:
            return "-"
        when = format_datetime(obj.ramp_error_at) if obj.ramp_error_at else "?"
        return format_html(
            '<span class="bulk-ramp-error" style="color: #c62828;" title="{}">{} '
            "(failed {} time(s) in a row, last at {}; retried at {})</span>",
            obj.ramp_error,
            obj.ramp_error,
            obj.ramp_error_count,
            when,
            format_datetime(obj.next_due_at) if obj.next_due_at else "-",
        )

    @admin.display(description="progress")
    def progress_display(self, obj: BulkOperation) -> str:
        return progress_bar(obj)

    @admin.display(description="counters")
    def counters(self, obj: BulkOperation) -> str:
        counts = progress(obj)
        rows = [(label, counts[label]) for label, _ in SEGMENTS]
        rows += [("all", counts["all"]), ("targets", obj.target_count), ("dropped", obj.dropped)]
        return format_html(
            '<table class="bulk-counters"><tbody>{}</tbody></table>',
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        )

    @admin.display(description="child operations by status")
    def child_links(self, obj: BulkOperation) -> str:
        # The counts are target devices by their latest attempt; the linked lists show every
        # attempt (retries included).
        counts = bulk_operation_progress(obj)
        links = [
            (children_url(obj.pk, status), status, counts[status.lower()])
            for status in CHILD_STATUSES
        ]
        links.append((children_url(obj.pk), "all", sum(counts.values())))
        return format_html_join(" · ", '<a href="{}">{} ({})</a>', links)

    @admin.display(description="operation prototype")
    def prototype_json(self, obj: BulkOperation) -> str:
        return _json(obj.operation_prototype)

    @admin.display(description="other fragments")
    def fragments_json(self, obj: BulkOperation) -> str:
        return _json(obj.fragments) if obj.fragments else "-"

    # --- search ---

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[BulkOperation], search_term: str
    ) -> tuple[QuerySet[BulkOperation], bool]:
        terms = search_term.split()
        if not terms:
            return queryset, False
        matches = Q()
        for term in terms:
            if not term.isdigit() or int(term) > MAX_ID:
                return queryset.none(), False
            number = int(term)
            matches |= Q(pk=number) | Q(group_id=number) | Q(failed_parent_id=number)
        return queryset.filter(matches), False

    # --- writes, all through the services ---

    def save_model(
        self, request: HttpRequest, obj: BulkOperation, form: forms.ModelForm, change: bool
    ) -> None:
        if not form.has_changed() or not isinstance(form, BulkOperationForm):
            return
        if not {"start_date", "creation_ramp"} <= set(form.cleaned_data):
            return
        try:
            saved = bulk_operation_update(bulk_operation_id=obj.pk, data=form.update_body())
        except ApiError as exc:  # it finished or was cancelled between the form check and now
            messages.error(request, f"Not rescheduled: {exc.message}")
            return
        adopt(obj, saved)

    def _each_running(
        self,
        request: HttpRequest,
        queryset: QuerySet[BulkOperation],
        apply: Any,
        done: str,
    ) -> None:
        """Apply `apply(pk)` to each selected bulk operation; the service's lock and status check
        decide, so one that completed meanwhile is skipped, not changed."""
        applied: list[int] = []
        skipped: list[str] = []
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                apply(pk)
            except ApiError as exc:
                skipped.append(f"{pk} ({exc.message})")
            else:
                applied.append(pk)
        if applied:
            ids = ", ".join(map(str, applied))
            messages.success(request, f"{done} {len(applied)} bulk operation(s): {ids}.")
        if skipped:
            messages.warning(
                request,
                f"Skipped {len(skipped)} bulk operation(s): {'; '.join(skipped)}.",
            )

    @admin.action(description="Cancel (create no further child operations)", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[BulkOperation]) -> None:
        self._each_running(
            request,
            queryset,
            lambda pk: bulk_operation_cancel(bulk_operation_id=pk),
            "Cancelled",
        )

    @admin.action(description="Reschedule now (start date = now)", permissions=["change"])
    def reschedule_now(self, request: HttpRequest, queryset: QuerySet[BulkOperation]) -> None:
        def apply(pk: int) -> None:
            now = timezone.now()
            bulk_operation_update(
                bulk_operation_id=pk, data={"startDate": format_datetime(now)}, now=now
            )

        self._each_running(request, queryset, apply, "Rescheduled")
