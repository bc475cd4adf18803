"""Operator UI for bulk operations: create one (a group or a failed bulk operation's failures, a
template or JSON prototype, start and ramp, previewed before it is confirmed), progress that moves
while the operator watches, the prototype, drill-down to the child operations by status, and
reschedule/cancel through `bulkops.services`.

Every number shown comes from the bulk operation's own row plus the progress deltas not folded
into it yet (`bulkops.selectors`, in the same query as the rows), so the changelist costs the same
for 10 or 100,000 children and is exact on every page load. The list and the change page poll a small JSON endpoint (`live/`,
one query for the bulk operations shown) through `deviceplatform/live.js`, which swaps in the
same cells the page rendered: counters, bar and status move without a reload. A ramp that keeps failing on a bulk
operation shows its reason under the list's status and on the change form. Writes go through the services, as the REST API's do: the change form
rehearses `bulk_operation_update` in a savepoint that is always rolled back, so a refusal (a
negative ramp, a bulk operation that completed meanwhile) is a form error and nothing is written.
The add page builds the body of `POST /bulkoperations` and hands it to `bulk_operation_preview`
(the same validation, targets counted, nothing written) and, once confirmed, to
`bulk_operation_create`. The API's DELETE is a cancel, so the admin offers the "Cancel" action
instead of delete. Every change (create, reschedule, cancel) writes an admin history entry naming
the operator and what changed. The rollout (issue 14) shows its state, wave, current rate and
reason as a live cell; the change page's Pause / Resume / Abort buttons (and the list's actions)
call `bulk_operation_pause`, `bulk_operation_resume` and `bulk_operation_cancel`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.views.decorators.http import require_POST

from bulkops.models import RUNNING_STATUSES, BulkOperation, RolloutState
from bulkops.rollout import READ_ONLY_KEY, current_rate_per_minute, rollout_json, rollout_state
from bulkops.selectors import (
    CURRENT,
    bulk_operation_progress,
    bulk_operations_with_progress,
)
from bulkops.serializers import (
    GENERAL_STATUSES,
    general_status,
    general_status_q,
    progress_json,
)
from bulkops.services import (
    bulk_operation_cancel,
    bulk_operation_create,
    bulk_operation_pause,
    bulk_operation_preview,
    bulk_operation_resume,
    bulk_operation_update,
)
from devicecontrol.models import OperationStatus
from deviceplatform.admin_lists import FleetListMixin
from deviceplatform.api.dates import format_datetime, parse_datetime
from deviceplatform.api.exceptions import ApiError, ValidationFailed, error_body
from deviceplatform.api.params import MAX_ID
from deviceplatform.formats import admin_time
from inventory.admin import adopt, rehearse
from inventory.models import ManagedObject

# The live endpoint answers for at most this many bulk operations (a changelist page shows 100).
LIVE_MAX_IDS = 200
# Seconds between two polls of the live endpoint.
LIVE_INTERVAL_SECONDS = 3

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


# --- what moves: the cells the live endpoint refreshes ----------------------------------------


def status_html(bulk: BulkOperation) -> str:
    return format_html("{}", bulk.status)


def general_status_html(bulk: BulkOperation) -> str:
    return format_html("{}", general_status(bulk))


def ramp_error_html(bulk: BulkOperation) -> str:
    if not bulk.ramp_error_count:
        # Marked, so the list's status cell (bulkops.css) can hide it.
        return format_html('<span class="bulk-no-ramp-error">{}</span>', "-")
    text = (
        f"{bulk.ramp_error} (failed {bulk.ramp_error_count} time(s) in a row, last at "
        f"{admin_time(bulk.ramp_error_at, '?')}; retried at {admin_time(bulk.next_due_at)})"
    )
    # The whole text is the tooltip too: the list shows its first lines only (bulkops.css).
    return format_html(
        '<span class="bulk-ramp-error" style="color: #c62828;" title="{}">{}</span>', text, text
    )


def counters_html(bulk: BulkOperation) -> str:
    counts = progress(bulk)
    rows = [(label, counts[label]) for label, _ in SEGMENTS]
    rows += [("all", counts["all"]), ("targets", bulk.target_count), ("dropped", bulk.dropped)]
    return format_html(
        '<table class="bulk-counters"><tbody>{}</tbody></table>',
        format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
    )


def child_links_html(bulk: BulkOperation) -> str:
    # The counts are target devices by their latest attempt; the linked lists show every
    # attempt (retries included).
    counts = bulk_operation_progress(bulk)
    links = [
        (children_url(bulk.pk, status), status, counts[status.lower()]) for status in CHILD_STATUSES
    ]
    links.append((children_url(bulk.pk), "all", sum(counts.values())))
    return format_html_join(" · ", '<a href="{}">{} ({})</a>', links)


def next_due_html(bulk: BulkOperation) -> str:
    return format_html("{}", admin_time(bulk.next_due_at))


def rollout_html(bulk: BulkOperation) -> str:
    """The rollout's state, its wave (of how many), the rate the schedule runs at and the reason
    it is paused or aborted, as the API's read-only `rollout` reports them."""
    state = rollout_state(bulk)
    parts = [format_html('<strong class="bulk-rollout-state">{}</strong>', state)]
    if bulk.waves:
        wave = min(bulk.wave, len(bulk.waves) - 1) + 1
        parts.append(format_html("wave {} of {}", wave, len(bulk.waves)))
    rate = current_rate_per_minute(bulk)
    if state == RolloutState.RUNNING and rate is not None:
        parts.append(format_html("{}/min", f"{rate:.4g}"))
    # The same reason as the API's `rollout.reason`: an abort's message (abortReason is an
    # object), "Cancelled" for a cancel, the pause's reason while paused.
    reason = rollout_json(bulk).get(READ_ONLY_KEY, {}).get("reason")
    if reason:
        parts.append(format_html('<span class="bulk-rollout-reason">{}</span>', reason))
    return format_html_join(" · ", "{}", ((part,) for part in parts))


# Live key -> the cell's content. A page marks each cell `data-live-key="<key>-<id>"`.
LIVE_CELLS: dict[str, Callable[[BulkOperation], str]] = {
    "status": status_html,
    "general": general_status_html,
    "progress": progress_bar,
    "counters": counters_html,
    "children": child_links_html,
    "due": next_due_html,
    "ramp-error": ramp_error_html,
    "rollout": rollout_html,
}


def live_cell(key: str, bulk: BulkOperation) -> str:
    return format_html('<span data-live-key="{}-{}">{}</span>', key, bulk.pk, LIVE_CELLS[key](bulk))


def finished(bulk: BulkOperation) -> bool:
    """Nothing about it can change any more: no children left to create or to move."""
    counts = bulk_operation_progress(bulk)
    return (
        bulk.status not in RUNNING_STATUSES and counts["pending"] == 0 and counts["executing"] == 0
    )


def live_values(bulks: list[BulkOperation]) -> dict[str, Any]:
    """The live endpoint's answer for `bulks` (read through `bulk_operations_with_progress`)."""
    values = {
        f"{key}-{bulk.pk}": {"html": str(render(bulk))}
        for bulk in bulks
        for key, render in LIVE_CELLS.items()
    }
    return {"values": values, "done": all(finished(bulk) for bulk in bulks)}


# --- creating a bulk operation ---------------------------------------------------------------

# (value, label, default description) of the prototype templates the add page offers.
TEMPLATES = (
    ("c8y_Restart", "Restart (c8y_Restart)", "Restart"),
    ("c8y_Firmware", "Firmware update (c8y_Firmware)", "Update firmware to {name} {version}"),
    ("c8y_SoftwareUpdate", "Software update (c8y_SoftwareUpdate)", "Update software"),
    ("c8y_Configuration", "Configuration (c8y_Configuration)", "Send configuration"),
    ("c8y_Command", "Shell command (c8y_Command)", "Execute shell command"),
    ("json", "JSON prototype", ""),
    ("copy", "The prototype of the failed bulk operation", ""),
)
# Which form rows belong to which choice (the page's script shows only those of the choice made).
SHOWN_WHEN = {
    "group": "target=group",
    "failed_parent": "target=failed",
    "firmware_name": "template=c8y_Firmware",
    "firmware_version": "template=c8y_Firmware",
    "firmware_url": "template=c8y_Firmware",
    "software": "template=c8y_SoftwareUpdate",
    "configuration": "template=c8y_Configuration",
    "command": "template=c8y_Command",
    "prototype": "template=json",
}
CREATE_FIELDSETS = (
    ("Targets", ("target", "group", "failed_parent")),
    (
        "Operation",
        (
            "template",
            "description",
            "firmware_name",
            "firmware_version",
            "firmware_url",
            "software",
            "configuration",
            "command",
            "prototype",
        ),
    ),
    ("Schedule", ("start_date", "creation_ramp")),
)
# The datalists that let an operator pick a group or bulk operation by name.
PICK_LIST_SIZE = 500
PICK_NAME_MATCHES = 5  # group IDs named when a typed name matches several groups
SOFTWARE_EXAMPLE = (
    '[{"name": "agent", "version": "2.1.0", "url": "https://example.com/agent.deb", '
    '"action": "install"}]'
)


def _text_area(rows: int = 4) -> forms.Textarea:
    return forms.Textarea(
        attrs={"rows": rows, "cols": 80, "spellcheck": "false", "style": "font-family: monospace;"}
    )


def _parse_json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationError({field: f"Enter valid JSON: {exc}."}) from None


def target_groups() -> QuerySet[ManagedObject]:
    """What a bulk operation may target: groups and smart groups (bulkops.services decides the
    same for a groupId)."""
    return ManagedObject.objects.filter(
        Q(is_group=True) | Q(fragments__has_key="c8y_IsDynamicGroup")
    )


class BulkCreateForm(forms.Form):
    """What the operator chooses on the add page; `body()` turns it into the REST create body, so
    `bulk_operation_create` (and its preview) decide exactly as for `POST /bulkoperations`."""

    target = forms.ChoiceField(
        choices=[
            ("group", "The devices of a group"),
            ("failed", "The devices that failed in a bulk operation (re-run its failures)"),
        ],
        initial="group",
        widget=forms.RadioSelect,
    )
    group = forms.CharField(
        required=False,
        max_length=1024,
        label="Group",
        widget=forms.TextInput(attrs={"list": "bulk-groups", "size": 30}),
        help_text="A group or smart group: its ID, or its exact name (type to pick one; digits alone are an ID).",
    )
    failed_parent = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        label="Bulk operation ID",
        widget=forms.TextInput(attrs={"list": "bulk-failed", "size": 20}),
        help_text="Its devices whose latest attempt failed are targeted again.",
    )
    template = forms.ChoiceField(
        choices=[(value, label) for value, label, _ in TEMPLATES], initial="c8y_Restart"
    )
    description = forms.CharField(
        required=False,
        max_length=1000,
        widget=forms.TextInput(attrs={"size": 60}),
        help_text="Shown to operators and agents; blank for the template's own.",
    )
    firmware_name = forms.CharField(required=False, max_length=1000, label="Firmware name")
    firmware_version = forms.CharField(required=False, max_length=1000, label="Firmware version")
    firmware_url = forms.CharField(
        required=False,
        max_length=2000,
        label="Firmware URL",
        widget=forms.TextInput(attrs={"size": 60}),
    )
    software = forms.CharField(
        required=False,
        label="Software list",
        widget=_text_area(),
        help_text=f"A JSON list of packages, e.g. {SOFTWARE_EXAMPLE}.",
    )
    configuration = forms.CharField(
        required=False, label="Configuration", widget=_text_area(6), strip=False
    )
    command = forms.CharField(
        required=False, label="Command", widget=forms.TextInput(attrs={"size": 60})
    )
    prototype = forms.CharField(
        required=False,
        label="Operation prototype",
        widget=_text_area(10),
        help_text='A JSON object of fragments, e.g. {"c8y_Restart": {}}.',
    )
    start_date = forms.CharField(
        required=False,
        label="Start",
        widget=forms.TextInput(attrs={"size": 30, "placeholder": "now"}),
        help_text="ISO 8601 with its zone, e.g. 2030-01-31T22:00:00Z; blank starts now.",
    )
    creation_ramp = forms.FloatField(
        min_value=0,
        max_value=10**7,
        initial=1,
        label="Creation ramp",
        help_text="Seconds between two devices' operations (fractions allowed; 0 = all at once).",
    )
    previewed = forms.CharField(required=False, widget=forms.HiddenInput)

    def clean_start_date(self) -> str:
        value = self.cleaned_data["start_date"].strip()
        if value:
            try:
                parse_datetime(value, field="start")
            except ApiError as exc:
                raise ValidationError(exc.message) from None
        return value

    def clean_group(self) -> int | None:
        """A group's ID, or the exact name of one group or smart group (as the pick list shows
        them): an operator types "Simulated fleet" as readily as 9."""
        value = self.cleaned_data.get("group", "").strip()
        if not value:
            return None
        if value.isascii() and value.isdigit():  # "²" is a digit to str.isdigit, not to int()
            if not 1 <= int(value) <= MAX_ID:
                raise ValidationError(f"A group ID is a whole number from 1 to {MAX_ID}.")
            return int(value)
        found = list(
            target_groups()
            .filter(name=value)
            .order_by("pk")
            .values_list("pk", flat=True)[: PICK_NAME_MATCHES + 1]
        )
        if not found:
            raise ValidationError(f"No group or smart group is named “{value}”: type its ID.")
        if len(found) > 1:
            shown = ", ".join(str(pk) for pk in found[:PICK_NAME_MATCHES])
            more = ", ..." if len(found) > PICK_NAME_MATCHES else ""
            raise ValidationError(
                f"Several groups are named “{value}” (IDs {shown}{more}): type the ID of one."
            )
        return found[0]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        target = data.get("target")
        if target == "group" and data.get("group") is None and "group" not in self.errors:
            self.add_error("group", "Pick the group whose devices get the operation.")
        parent = data.get("failed_parent")
        if target == "failed" and parent is None and "failed_parent" not in self.errors:
            self.add_error("failed_parent", "Pick the bulk operation whose failures to re-run.")
        if data.get("template") == "copy" and target != "failed":
            self.add_error("template", "Only a re-run of failures can copy a prototype.")
        if data.get("template") and not self.has_error("template"):
            try:
                data["operation_prototype"] = self._prototype(data)
            except ValidationError as exc:
                self.add_error(None, exc)
        return data

    def _prototype(self, data: dict[str, Any]) -> dict[str, Any]:
        template = data["template"]
        if template == "json":
            value = _parse_json(data.get("prototype") or "", "prototype")
            if not isinstance(value, dict) or not value:
                raise ValidationError({"prototype": "Enter a JSON object with fragments."})
            prototype = value
        elif template == "copy":
            parent = BulkOperation.objects.filter(pk=data.get("failed_parent")).first()
            if parent is None:
                raise ValidationError({"failed_parent": "No bulk operation has this ID."})
            prototype = dict(parent.operation_prototype)
        elif template == "c8y_Firmware":
            name, version = data.get("firmware_name"), data.get("firmware_version")
            missing = {
                field: "Required for a firmware update."
                for field, value in (("firmware_name", name), ("firmware_version", version))
                if not value
            }
            if missing:
                raise ValidationError(missing)
            firmware = {"name": name, "version": version}
            if data.get("firmware_url"):
                firmware["url"] = data["firmware_url"]
            prototype = {"c8y_Firmware": firmware}
        elif template == "c8y_SoftwareUpdate":
            packages = _parse_json(data.get("software") or "", "software")
            if not isinstance(packages, list) or not packages:
                raise ValidationError({"software": "Enter a JSON list of packages."})
            if not all(isinstance(item, dict) and item.get("name") for item in packages):
                raise ValidationError({"software": "Each package is an object with a name."})
            prototype = {"c8y_SoftwareUpdate": packages}
        elif template == "c8y_Configuration":
            if not data.get("configuration"):
                raise ValidationError({"configuration": "Enter the configuration to send."})
            prototype = {"c8y_Configuration": {"config": data["configuration"]}}
        elif template == "c8y_Command":
            if not data.get("command"):
                raise ValidationError({"command": "Enter the command to execute."})
            prototype = {"c8y_Command": {"text": data["command"]}}
        else:
            prototype = {"c8y_Restart": {}}
        description = data.get("description") or ""
        default = next(text for value, _, text in TEMPLATES if value == template)
        if description:
            prototype["description"] = description
        elif default and "description" not in prototype:
            prototype["description"] = default.format(
                name=data.get("firmware_name"), version=data.get("firmware_version")
            )
        return prototype

    def body(self, now: datetime) -> dict[str, Any]:
        """The REST create body; a blank start is `now`."""
        data = self.cleaned_data
        body: dict[str, Any] = {
            "startDate": data["start_date"] or format_datetime(now),
            "creationRamp": data["creation_ramp"],
            "operationPrototype": data["operation_prototype"],
        }
        if data["target"] == "group":
            body["groupId"] = str(data["group"])
        else:
            body["failedParentId"] = str(data["failed_parent"])
        return body

    def digest(self) -> str:
        """Names what was previewed: a confirm with other values previews again instead."""
        data = self.cleaned_data
        chosen = {
            "target": data["target"],
            "group": data.get("group") if data["target"] == "group" else None,
            "failed_parent": data.get("failed_parent") if data["target"] == "failed" else None,
            "start": data["start_date"],
            "ramp": data["creation_ramp"],
            "prototype": data["operation_prototype"],
        }
        text = json.dumps(chosen, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def add_service_error(self, exc: ApiError) -> None:
        """A refusal of the service on the field it is about."""
        keys = {
            "groupId": "group",
            "failedParentId": "failed_parent",
            "startDate": "start_date",
            "creationRamp": "creation_ramp",
        }
        field = next((name for key, name in keys.items() if key in exc.message), None)
        if field is None and exc.message.startswith("Bulk operation"):
            field = "failed_parent"
        if field is None and self.cleaned_data.get("template") == "json":
            field = "prototype"
        if field is None and "group" in exc.message.lower():
            field = "group"
        self.add_error(field, exc.message)


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:g} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    return " ".join(f"{value} {unit}" for value, unit in parts if value)


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
class BulkOperationAdmin(FleetListMixin, admin.ModelAdmin):
    form = BulkOperationForm
    # Narrow enough for a 1280-px screen with the navigation and filter sidebars open (bulkops.css
    # and tests/browser/test_admin_layout.py): the target, the schedule and the status with its
    # general status and ramp error each share one column; the change page shows them apart.
    list_display = [
        "id",
        "target_display",
        "schedule_display",
        "status_summary",
        "progress_display",
        "rollout_display",
    ]
    list_display_links = ["id"]
    list_filter = ["status", GeneralStatusFilter, RampErrorFilter]
    # Searched by get_search_results (IDs only); listed here so the search box shows.
    search_fields = ["id", "group_id", "failed_parent_id"]
    search_help_text = "Bulk operation ID, group ID or failed-parent bulk operation ID."
    ordering = ["-id"]
    actions = ["cancel", "reschedule_now", "pause", "resume"]
    readonly_fields = [
        "group_link",
        "failed_parent_link",
        "status_display",
        "general_status_display",
        "progress_display",
        "counters",
        "child_links",
        "prototype_json",
        "fragments_json",
        "creation_time",
        "last_updated",
        "effective_start",
        "next_due_display",
        "ramp_error_display",
        "rollout_display",
        "rollout_config_json",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("group_link", "failed_parent_link"),
                    ("status_display", "general_status_display"),
                ]
            },
        ),
        (
            "Schedule",
            {
                "fields": [
                    "start_date",
                    "creation_ramp",
                    ("effective_start", "next_due_display"),
                    "ramp_error_display",
                ]
            },
        ),
        ("Rollout", {"fields": ["rollout_display", "rollout_config_json"]}),
        ("Progress", {"fields": ["progress_display", "counters", "child_links"]}),
        ("Operation prototype", {"fields": ["prototype_json", "fragments_json"]}),
        ("History", {"fields": [("creation_time", "last_updated")]}),
    ]

    class Media:
        css = {"all": ["bulkops/bulkops.css"]}

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

    def has_delete_permission(self, request: HttpRequest, obj: BulkOperation | None = None) -> bool:
        return False  # the API's DELETE is a cancel: use the "Cancel" action

    def get_urls(self) -> list[URLPattern]:
        live = path(
            "live/",
            self.admin_site.admin_view(self.live_view),
            name="bulkops_bulkoperation_live",
        )
        buttons = [
            path(
                f"<path:object_id>/{action}/",
                self.admin_site.admin_view(self.rollout_button_view),
                {"action": action},
                name=f"bulkops_bulkoperation_{action}",
            )
            for action in ROLLOUT_BUTTONS
        ]
        return [live, *buttons, *super().get_urls()]

    @method_decorator(require_POST)
    def rollout_button_view(
        self, request: HttpRequest, object_id: str, action: str
    ) -> HttpResponse:
        """The change page's Pause / Resume / Abort buttons: POST only, through the services, a
        history entry for what changed and a message for what was refused."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        pk = int(object_id) if object_id.isdigit() and int(object_id) <= MAX_ID else None
        if pk is None or not BulkOperation.objects.filter(pk=pk).exists():
            raise Http404(f"No bulk operation with ID {object_id}")
        verb, apply = ROLLOUT_BUTTONS[action]
        try:
            bulk = apply(pk, request.user.get_username())
        except ApiError as exc:
            messages.error(request, f"Not {verb}: {exc.message}")
        else:
            self.log_change(request, bulk, f"{verb.capitalize()} by {request.user.get_username()}.")
            messages.success(request, f"Bulk operation {pk} {verb}.")
        return HttpResponseRedirect(reverse("admin:bulkops_bulkoperation_change", args=[pk]))

    def live_view(self, request: HttpRequest) -> HttpResponse:
        """`live/?ids=1,2`: the live cells of those bulk operations, one query (live.js)."""
        if not self.has_view_permission(request):
            return JsonResponse(
                error_body(403, "security/Forbidden", "No permission to view bulk operations"),
                status=403,
            )
        raw = [part for part in request.GET.get("ids", "").split(",") if part.strip()]
        ids = [int(part) for part in raw if part.strip().isdigit() and int(part) <= MAX_ID]
        if len(ids) != len(raw) or len(ids) > LIVE_MAX_IDS:
            message = f"ids must be up to {LIVE_MAX_IDS} bulk operation IDs separated by commas"
            return JsonResponse(error_body(422, "bulkops/Invalid Data", message), status=422)
        bulks = list(self.get_queryset(request).filter(pk__in=ids).order_by("pk"))
        return JsonResponse(live_values(bulks))  # admin_view: never cached

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {**(extra_context or {}), "live_interval": LIVE_INTERVAL_SECONDS}
        return super().changelist_view(request, extra_context=context)

    def _live_context(self, ids: list[int]) -> dict[str, Any]:
        url = reverse("admin:bulkops_bulkoperation_live")
        return {
            "live_url": f"{url}?{urlencode({'ids': ','.join(map(str, ids))})}",
            "live_interval": LIVE_INTERVAL_SECONDS,
        }

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = {**(extra_context or {}), "show_save_and_add_another": False}
        if object_id.isdigit() and int(object_id) <= MAX_ID:
            context.update(self._live_context([int(object_id)]))
            bulk = BulkOperation.objects.filter(pk=int(object_id)).first()
            if bulk is not None and self.has_change_permission(request, bulk):
                context["rollout_buttons"] = rollout_buttons(bulk)
        return super().change_view(request, object_id, form_url, extra_context=context)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: BulkOperation | None = None,
    ) -> HttpResponse:
        if obj is not None and bulk_operation_progress(obj)["failed"] > 0:
            query = urlencode({"target": "failed", "failed_parent": obj.pk, "template": "copy"})
            context["rerun_url"] = f"{reverse('admin:bulkops_bulkoperation_add')}?{query}"
        return super().render_change_form(request, context, add, change, form_url, obj)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Choose, preview (targets counted, ramp duration), confirm: then create through the
        service with the operator named in the history."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        initial = {
            key: value for key, value in request.GET.items() if key in BulkCreateForm.base_fields
        }
        form = BulkCreateForm(request.POST if request.method == "POST" else None, initial=initial)
        preview = None
        if request.method == "POST" and form.is_valid():
            now = timezone.now()
            body = form.body(now)
            digest = form.digest()
            try:
                if "_confirm" in request.POST and form.cleaned_data["previewed"] == digest:
                    bulk = bulk_operation_create(data=body, now=now)
                    self.log_addition(request, bulk, self._created_message(request, bulk))
                    messages.success(
                        request,
                        f"Created bulk operation {bulk.pk} for {bulk.target_count} device(s).",
                    )
                    return HttpResponseRedirect(
                        reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk])
                    )
                if "_confirm" in request.POST:
                    messages.warning(
                        request, "The choices changed since the preview: check them and confirm."
                    )
                preview = bulk_operation_preview(data=body, now=now)
            except ApiError as exc:
                form.add_service_error(exc)
            else:
                data = form.data.copy()
                data["previewed"] = digest
                form.data = data  # the confirm button carries what was previewed
        return TemplateResponse(
            request,
            "admin/bulkops/bulkoperation/add_form.html",
            {
                **self.admin_site.each_context(request),
                **(extra_context or {}),
                "title": "Add bulk operation",
                "opts": self.opts,
                "form": form,
                "fieldsets": [
                    (title, [(form[name], SHOWN_WHEN.get(name, "")) for name in names])
                    for title, names in CREATE_FIELDSETS
                ],
                "preview": preview,
                "preview_duration": _duration(preview.duration) if preview else "",
                "prototype_json": (
                    json.dumps(form.cleaned_data["operation_prototype"], indent=2)
                    if preview
                    else ""
                ),
                "groups": target_groups()
                .order_by("name", "pk")
                .values("pk", "name")[:PICK_LIST_SIZE],
                "failed_bulks": bulk_operations_with_progress()
                .filter(**{CURRENT["failed"] + "__gt": 0})
                .order_by("-pk")
                .values("pk", CURRENT["failed"], "operation_prototype__description")[
                    :PICK_LIST_SIZE
                ],
            },
        )

    @staticmethod
    def _created_message(request: HttpRequest, bulk: BulkOperation) -> str:
        if bulk.group_id is not None:
            target = f"group {bulk.group_id}"
        else:
            target = f"the failures of bulk operation {bulk.failed_parent_id}"
        fragments = ", ".join(sorted(bulk.operation_prototype))
        return (
            f"Created by {request.user.get_username()}: {fragments} to {target}, "
            f"{bulk.target_count} device(s), start {format_datetime(bulk.start_date)}, "
            f"ramp {bulk.creation_ramp:g} s."
        )

    # --- columns and read-only fields ---

    @admin.display(description="target", ordering="group_id")
    def target_display(self, obj: BulkOperation) -> str:
        """The group, or the bulk operation whose failures are re-run."""
        if obj.failed_parent_id is not None:
            return format_html("failures of {}", _bulk_link(obj.failed_parent_id))
        return _object_link(obj.group_id, getattr(obj, "group_name", None))

    @admin.display(description="start, ramp", ordering="start_date")
    def schedule_display(self, obj: BulkOperation) -> str:
        """The start date (in the admin's format, which dates.js shows in the browser's zone) over
        the creation ramp, or "rollout rate" when `rolloutConfig` sets the pace."""
        start = admin_time(obj.start_date)
        pace = "rollout rate" if obj.rollout_config else f"ramp {obj.creation_ramp:g} s"
        return format_html(
            '<div class="bulk-start">{}</div><div class="bulk-ramp">{}</div>', start, pace
        )

    @admin.display(description="status", ordering="status")
    def status_summary(self, obj: BulkOperation) -> str:
        """Status over general status, and the ramp error when there is one: three live cells."""
        return format_html(
            '<div>{}</div><div class="bulk-general" title="general status">{}</div>'
            '<div class="bulk-ramp-error-line">{}</div>',
            live_cell("status", obj),
            live_cell("general", obj),
            live_cell("ramp-error", obj),
        )

    @admin.display(description="group", ordering="group_id")
    def group_link(self, obj: BulkOperation) -> str:
        return _object_link(obj.group_id, getattr(obj, "group_name", None))

    @admin.display(description="failed parent", ordering="failed_parent_id")
    def failed_parent_link(self, obj: BulkOperation) -> str:
        return _bulk_link(obj.failed_parent_id)

    @admin.display(description="status", ordering="status")
    def status_display(self, obj: BulkOperation) -> str:
        return live_cell("status", obj)

    @admin.display(description="general status")
    def general_status_display(self, obj: BulkOperation) -> str:
        return live_cell("general", obj)

    @admin.display(description="ramp error", ordering="ramp_error_count")
    def ramp_error_display(self, obj: BulkOperation) -> str:
        return live_cell("ramp-error", obj)

    @admin.display(description="progress")
    def progress_display(self, obj: BulkOperation) -> str:
        return live_cell("progress", obj)

    @admin.display(description="counters")
    def counters(self, obj: BulkOperation) -> str:
        return live_cell("counters", obj)

    @admin.display(description="child operations by status")
    def child_links(self, obj: BulkOperation) -> str:
        return live_cell("children", obj)

    @admin.display(description="next due at")
    def next_due_display(self, obj: BulkOperation) -> str:
        return live_cell("due", obj)

    @admin.display(description="rollout")
    def rollout_display(self, obj: BulkOperation) -> str:
        return live_cell("rollout", obj)

    @admin.display(description="rates and waves")
    def rollout_config_json(self, obj: BulkOperation) -> str:
        given = {"rolloutConfig": obj.rollout_config, "waves": obj.waves}
        given = {key: value for key, value in given.items() if value is not None}
        return _json(given) if given else "- (creationRamp)"

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

    # --- writes, all through the services, each with a history entry ---

    def save_model(
        self, request: HttpRequest, obj: BulkOperation, form: forms.ModelForm, change: bool
    ) -> None:
        request._bulk_saved = False  # type: ignore[attr-defined]
        if not form.has_changed() or not isinstance(form, BulkOperationForm):
            return
        if not {"start_date", "creation_ramp"} <= set(form.cleaned_data):
            return
        before = BulkOperation.objects.filter(pk=obj.pk).values("start_date", "creation_ramp")[0]
        try:
            saved = bulk_operation_update(bulk_operation_id=obj.pk, data=form.update_body())
        except ApiError as exc:  # it finished or was cancelled between the form check and now
            messages.error(request, f"Not rescheduled: {exc.message}")
            return
        request._bulk_saved = True  # type: ignore[attr-defined]
        request._bulk_change_message = (  # type: ignore[attr-defined]
            f"Rescheduled by {request.user.get_username()}: start "
            f"{format_datetime(before['start_date'])} -> {format_datetime(saved.start_date)}, "
            f"ramp {before['creation_ramp']:g} s -> {saved.creation_ramp:g} s."
        )
        adopt(obj, saved)

    def construct_change_message(
        self, request: HttpRequest, form: forms.Form, formsets: Any, add: bool = False
    ) -> Any:
        message = getattr(request, "_bulk_change_message", None)
        return message or super().construct_change_message(request, form, formsets, add)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        # The change form logs after save_model: nothing saved (unchanged, or refused) is no change.
        if getattr(request, "_bulk_saved", True) is False:
            return None
        return super().log_change(request, obj, message)

    def _each_running(
        self,
        request: HttpRequest,
        queryset: QuerySet[BulkOperation],
        apply: Callable[[int], tuple[BulkOperation, str]],
        done: str,
    ) -> None:
        """Apply `apply(pk)` to each selected bulk operation and log what it says it changed; the
        service's lock and status check decide, so one that completed meanwhile is skipped."""
        applied: list[int] = []
        skipped: list[str] = []
        for pk in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                bulk, message = apply(pk)
            except ApiError as exc:
                skipped.append(f"{pk} ({exc.message})")
            else:
                applied.append(pk)
                self.log_change(request, bulk, message)
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
        def apply(pk: int) -> tuple[BulkOperation, str]:
            bulk = bulk_operation_cancel(bulk_operation_id=pk)
            left = bulk.target_count - bulk.next_index
            return bulk, (
                f"Cancelled by {request.user.get_username()}: status DELETED, "
                f"{left} device(s) not yet created will get no operation."
            )

        self._each_running(request, queryset, apply, "Cancelled")

    @admin.action(description="Reschedule now (start date = now)", permissions=["change"])
    def reschedule_now(self, request: HttpRequest, queryset: QuerySet[BulkOperation]) -> None:
        def apply(pk: int) -> tuple[BulkOperation, str]:
            now = timezone.now()
            before = (
                BulkOperation.objects.filter(pk=pk).values_list("start_date", flat=True).first()
            )
            bulk = bulk_operation_update(
                bulk_operation_id=pk, data={"startDate": format_datetime(now)}, now=now
            )
            old = format_datetime(before) if before else "?"
            return bulk, (
                f"Rescheduled by {request.user.get_username()}: start {old} -> "
                f"{format_datetime(bulk.start_date)} (reschedule now)."
            )

        self._each_running(request, queryset, apply, "Rescheduled")

    @admin.action(description="Pause (create nothing until resumed)", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet[BulkOperation]) -> None:
        def apply(pk: int) -> tuple[BulkOperation, str]:
            bulk = bulk_operation_pause(bulk_operation_id=pk, by=request.user.get_username())
            return bulk, f"Paused by {request.user.get_username()}."

        self._each_running(request, queryset, apply, "Paused")

    @admin.action(description="Resume (a paused one)", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[BulkOperation]) -> None:
        def apply(pk: int) -> tuple[BulkOperation, str]:
            bulk = bulk_operation_resume(bulk_operation_id=pk, by=request.user.get_username())
            return bulk, f"Resumed by {request.user.get_username()}."

        self._each_running(request, queryset, apply, "Resumed")


# action -> (past tense, service call) of the change page's rollout buttons.
ROLLOUT_BUTTONS: dict[str, tuple[str, Callable[[int, str], BulkOperation]]] = {
    "pause": ("paused", lambda pk, by: bulk_operation_pause(bulk_operation_id=pk, by=by)),
    "resume": ("resumed", lambda pk, by: bulk_operation_resume(bulk_operation_id=pk, by=by)),
    # Abort: no further children, and its PENDING children are cancelled ("Cancelled by <by>").
    "abort": ("aborted", lambda pk, by: _abort(pk, by)),
}


def _running(bulk: BulkOperation) -> None:
    """Under the cancel's row lock: a second press (or a stale page) of Abort on a bulk operation
    that completed or was cancelled meanwhile is refused, not logged as another abort."""
    if bulk.status not in RUNNING_STATUSES:
        raise ValidationFailed(
            f"Only ACTIVE or IN_PROGRESS bulk operations can be aborted; {bulk.pk} is {bulk.status}",
            error="devicecontrol/Invalid Data",
        )


def _abort(pk: int, by: str) -> BulkOperation:
    return bulk_operation_cancel(
        bulk_operation_id=pk,
        cancel_pending=True,
        by=by,
        precondition=_running,
        inline_seconds=settings.BULK_PENDING_FAIL_INLINE_SECONDS,
    )


def rollout_buttons(bulk: BulkOperation) -> list[tuple[str, str]]:
    """(label, URL) of the buttons that apply to `bulk` now: Pause or Resume, and Abort, while it
    runs; none once it completed or was cancelled."""
    if bulk.status not in RUNNING_STATUSES:
        return []
    toggle = "resume" if bulk.rollout_state == RolloutState.PAUSED else "pause"
    return [
        (action.capitalize(), reverse(f"admin:bulkops_bulkoperation_{action}", args=[bulk.pk]))
        for action in (toggle, "abort")
    ]
