"""Operator UI for operations: list, filter, change the status and failure reason, cancel, retry;
and for new device requests: register, accept, reject (at the end).

Every write goes through `devicecontrol.services`, as the REST API's do, so the status rules apply
and each change sends its realtime event on commit. A status change is rehearsed with the real
service in a savepoint that is always rolled back: a refusal (a failure reason without FAILED) is
shown on the form and nothing is written. "Add" is the send-operation form: it creates the
operation through `operation_create`, as `POST /devicecontrol/operations` does; a device's page
(the ManagedObject admin, re-registered here with an operations panel) sends the same way. Every
change an operator makes here is written to the admin history under the operator's name."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count, Exists, Max, OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from devicecontrol.models import (
    FINAL_STATUSES,
    NewDeviceRequest,
    NewDeviceRequestStatus,
    Operation,
    OperationStatus,
)
from devicecontrol.serializers import MAX_SECURITY_TOKEN_LENGTH
from devicecontrol.services import (
    CANCEL_REQUESTED,
    new_device_request_accept,
    new_device_request_create,
    new_device_request_delete,
    operation_cancel,
    operation_create,
    operation_retry,
    operation_update,
    operations_delete,
)
from deviceplatform.admin_lists import FleetListMixin
from deviceplatform.api.exceptions import ApiError
from deviceplatform.api.params import MAX_ID
from deviceplatform.formats import admin_time
from inventory.admin import FragmentsField, ManagedObjectAdmin, adopt, rehearse
from inventory.models import ManagedObject
from inventory.selectors import device_agent_id

# The filters offer what the most recent operations use: reading a bounded sample keeps the
# changelist fast on a table of millions of rows. Any value still works in the URL.
FILTER_SAMPLE = 500
FILTER_CHOICES = 30


def _object_link(pk: int, label: str) -> str:
    return format_html(
        '<a href="{}">{}</a>', reverse("admin:inventory_managedobject_change", args=[pk]), label
    )


def _operation_link(pk: int) -> str:
    return format_html(
        '<a href="{}">{}</a>', reverse("admin:devicecontrol_operation_change", args=[pk]), pk
    )


def _status_badge(status: str) -> str:
    return format_html('<span class="operation-status status-{}">{}</span>', status.lower(), status)


MAX_LIVE_IDS = 200


def live_keys(pk: int) -> dict[str, str]:
    """The `data-live-key`s of one operation's live cells (deviceplatform/live.js)."""
    return {name: f"operation-{pk}-{name}" for name in ("status", "failure", "changed", "actions")}


def live_url(ids: list[int]) -> str | None:
    """Where a page showing these operations polls their status; None when there is nothing to
    watch."""
    ids = ids[:MAX_LIVE_IDS]
    if not ids:
        return None
    return reverse("admin:devicecontrol_operation_live") + "?ids=" + ",".join(map(str, ids))


def _time(value: Any) -> str:
    if value is None:
        return "-"
    return format_html(
        '<time datetime="{}">{}</time>', value.isoformat(), value.strftime("%Y-%m-%d %H:%M:%S %Z")
    )


def _safe_next(request: HttpRequest, fallback: str) -> str:
    target = request.POST.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return fallback


def attach_latest_retries(operations: list[Operation]) -> None:
    """Set `latest_retry` (the newest retry's ID, or None) on each of a page's operations: one
    query on the `retry_of` index, for the page's rows only. (An annotation would be computed for
    every row an OFFSET skips too: 170 ms at page 500 of a million operations.)"""
    latest = (
        dict(
            Operation.objects.filter(retry_of_id__in=[op.pk for op in operations])
            .values("retry_of_id")
            .annotate(latest=Max("id"))
            .values_list("retry_of_id", "latest")
        )
        if operations
        else {}
    )
    for operation in operations:
        operation.latest_retry = latest.get(operation.pk)  # type: ignore[attr-defined]


def _as_id(value: str | None) -> int | None:
    value = (value or "").strip()
    if value.isdigit() and int(value) <= MAX_ID:
        return int(value)
    return None


# --- filters ---------------------------------------------------------------------------------


class AgentFilter(admin.SimpleListFilter):
    """The agents that received the most recent operations; `?agent=<id>` takes any agent."""

    title = "agent"
    parameter_name = "agent"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        recent = Operation.objects.order_by("-id").values_list("agent_id", flat=True)
        ids = [pk for pk, _ in Counter(recent[:FILTER_SAMPLE]).most_common(FILTER_CHOICES)]
        chosen = _as_id(self.value())
        if chosen is not None and chosen not in ids:
            ids.append(chosen)
        if not ids:
            return []
        names = dict(ManagedObject.objects.filter(pk__in=ids).values_list("pk", "name"))
        labels = {pk: f"{names.get(pk) or '(unnamed)'} [{pk}]" for pk in ids}
        return sorted(((str(pk), label) for pk, label in labels.items()), key=lambda c: c[1])

    def queryset(self, request: HttpRequest, queryset: QuerySet[Operation]) -> QuerySet[Operation]:
        if self.value() is None:
            return queryset
        agent_id = _as_id(self.value())
        return queryset.none() if agent_id is None else queryset.filter(agent_id=agent_id)


class FragmentFilter(admin.SimpleListFilter):
    """Fragment names the most recent operations carry; `?fragment=<name>` takes any name."""

    title = "fragment"
    parameter_name = "fragment"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        recent = Operation.objects.order_by("-id").values_list("fragments", flat=True)
        counts: Counter[str] = Counter()
        for fragments in recent[:FILTER_SAMPLE]:
            counts.update(fragments.keys())
        names = [name for name, _ in counts.most_common(FILTER_CHOICES)]
        chosen = self.value()
        if chosen and chosen not in names:
            names.append(chosen)
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Operation]) -> QuerySet[Operation]:
        if not self.value():
            return queryset
        return queryset.filter(fragments__has_key=self.value())


# --- change form -----------------------------------------------------------------------------


class OperationForm(forms.ModelForm):
    """Status and failure reason, the two things an operator may change; the service decides."""

    class Meta:
        model = Operation
        fields = ["status", "failure_reason"]
        widgets = {"failure_reason": forms.Textarea(attrs={"rows": 3, "cols": 80})}
        help_texts = {
            "failure_reason": (
                "Only with status FAILED; removed when the status leaves FAILED. "
                "Blank keeps the current reason of a FAILED operation."
            )
        }

    def update_body(self) -> dict[str, Any]:
        """The PUT body for `operation_update`. The reason is sent only when the operator edited
        it, so moving a FAILED operation on (to PENDING, say) drops its old reason, as the API
        does, instead of being refused for carrying it."""
        body: dict[str, Any] = {"status": self.cleaned_data["status"]}
        if "failure_reason" in self.changed_data:
            body["failureReason"] = (self.cleaned_data.get("failure_reason") or "").strip() or None
        return body

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.errors or not self.has_changed() or self.instance.pk is None:
            return
        body = self.update_body()
        pk = self.instance.pk
        try:
            rehearse(lambda: operation_update(operation_id=pk, data=body, notify=False))
        except ValidationError as exc:
            self.add_error("failure_reason" if "failureReason" in body else None, exc)


# --- sending operations ----------------------------------------------------------------------

OPEN_STATUSES = [OperationStatus.PENDING, OperationStatus.EXECUTING]
RAW_JSON = "json"
# The common Cumulocity commands, each with fields of its own. Any other fragment the device lists
# in c8y_SupportedOperations is offered too and sent empty (`{"c8y_LogfileRequest": {}}`); the
# JSON form sends anything the API takes.
TEMPLATES = {
    "c8y_Restart": "restart the device",
    "c8y_Firmware": "install firmware: name, version, URL",
    "c8y_SoftwareUpdate": "install or remove software packages",
    "c8y_Configuration": "send a configuration text",
    "c8y_Command": "run a shell command",
}
DEFAULT_DESCRIPTIONS = {
    "c8y_Restart": "Restart device",
    "c8y_Firmware": "Update firmware to: {name} ({version})",
    "c8y_SoftwareUpdate": "Apply software changes",
    "c8y_Configuration": "Send configuration",
    "c8y_Command": "Execute shell command",
}
SOFTWARE_ACTIONS = ("install", "delete")
# Which fields belong to which choice (the page shows only the chosen one's, when JavaScript runs).
SEND_FIELD_GROUPS = [
    ("", ["device", "template", "description"]),
    ("c8y_Firmware", ["firmware_name", "firmware_version", "firmware_url"]),
    ("c8y_SoftwareUpdate", ["software"]),
    ("c8y_Configuration", ["configuration"]),
    ("c8y_Command", ["command"]),
    (RAW_JSON, ["body"]),
]
LOGGED_BODY_CHARS = 2000


def supported_operations(device: ManagedObject) -> list[str]:
    """The fragment names in the device's `c8y_SupportedOperations`, in its order, once each."""
    value = device.fragments.get("c8y_SupportedOperations")
    if not isinstance(value, list):
        return []
    return list(
        dict.fromkeys(name.strip() for name in value if isinstance(name, str) and name.strip())
    )


def _text_area(rows: int) -> forms.Textarea:
    return forms.Textarea(attrs={"rows": rows, "cols": 80, "spellcheck": "false"})


class SendOperationForm(forms.Form):
    """One operation for one device, from a template or as JSON. The body it builds is what a REST
    client would POST (without `deviceId`); the service validates and routes it."""

    device = forms.IntegerField(
        label="device ID",
        min_value=1,
        max_value=MAX_ID,
        help_text="The managed object that should run the operation; its agent receives it.",
    )
    template = forms.ChoiceField(label="operation", widget=forms.RadioSelect)
    description = forms.CharField(
        required=False,
        max_length=1000,
        widget=forms.TextInput(attrs={"size": 80}),
        help_text="Optional; a template fills in its own when left blank.",
    )
    firmware_name = forms.CharField(label="firmware name", required=False, max_length=1000)
    firmware_version = forms.CharField(label="firmware version", required=False, max_length=1000)
    firmware_url = forms.CharField(
        label="firmware URL",
        required=False,
        max_length=2000,
        widget=forms.TextInput(attrs={"size": 80}),
        help_text="Where the device downloads the image (optional).",
    )
    software = forms.CharField(
        label="packages",
        required=False,
        widget=_text_area(5),
        help_text=(
            "One package a line: name, version, URL, action, separated by commas. "
            "URL may be left empty; action is install (when left out) or delete."
        ),
    )
    configuration = forms.CharField(
        label="configuration", required=False, strip=False, widget=_text_area(8)
    )
    command = forms.CharField(label="command", required=False, widget=_text_area(3))
    body = FragmentsField(
        label="operation JSON",
        help_text=(
            "The operation as POST /devicecontrol/operations takes it, without deviceId: "
            'fragments and a description, e.g. {"c8y_Restart": {}, "description": "Restart"}.'
        ),
    )
    body.widget.attrs["rows"] = 10

    def __init__(self, *args: Any, device: ManagedObject | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target = device
        self.supported = supported_operations(device) if device is not None else []
        if device is not None:
            del self.fields["device"]
        choices = [
            (name, f"{name}: {TEMPLATES.get(name, 'sent as an empty fragment')} (supported)")
            for name in self.supported
        ]
        choices += [
            (name, f"{name}: {label}")
            for name, label in TEMPLATES.items()
            if name not in self.supported
        ]
        choices.append((RAW_JSON, "JSON: any operation"))
        self.fields["template"].choices = choices
        self.fields["template"].initial = choices[0][0]
        self.fields["body"].initial = {}
        self.operation_body: dict[str, Any] = {}

    def field_groups(self) -> list[tuple[str, list[forms.BoundField]]]:
        return [
            (name, [self[field] for field in fields if field in self.fields])
            for name, fields in SEND_FIELD_GROUPS
        ]

    def clean_device(self) -> ManagedObject:
        pk = self.cleaned_data["device"]
        device = ManagedObject.objects.filter(pk=pk).first()
        if device is None:
            raise ValidationError(f"There is no managed object with ID {pk}.")
        return device

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        template = data.get("template")
        if template is not None:
            # Only the chosen operation's fields count: the others may hold anything.
            chosen = RAW_JSON if template == RAW_JSON else template
            for group, fields in SEND_FIELD_GROUPS:
                if group and group != chosen:
                    for name in fields:
                        self.errors.pop(name, None)
        if self.target is None:
            self.target = data.get("device")
        if template is None:
            return data
        body = self._body(template, data)
        if body is None:
            return data
        description = (data.get("description") or "").strip()
        if description:
            body["description"] = description
        elif "description" not in body and template in DEFAULT_DESCRIPTIONS:
            fields = body[template] if isinstance(body.get(template), dict) else {}
            body["description"] = DEFAULT_DESCRIPTIONS[template].format(**fields)
        self.operation_body = body
        return data

    def _required(self, data: dict[str, Any], *names: str) -> bool:
        missing = [name for name in names if not (data.get(name) or "").strip()]
        for name in missing:
            self.add_error(name, "Required for this operation.")
        return not missing

    def _body(self, template: str, data: dict[str, Any]) -> dict[str, Any] | None:
        if template == RAW_JSON:
            if "body" not in data:
                return None  # the field's own error is shown
            if not data["body"]:
                self.add_error("body", "Enter the operation as a JSON object.")
                return None
            return dict(data["body"])
        if template == "c8y_Firmware":
            if not self._required(data, "firmware_name", "firmware_version"):
                return None
            firmware = {
                "name": data["firmware_name"].strip(),
                "version": data["firmware_version"].strip(),
            }
            if data.get("firmware_url", "").strip():
                firmware["url"] = data["firmware_url"].strip()
            return {"c8y_Firmware": firmware}
        if template == "c8y_SoftwareUpdate":
            packages = self._packages(data.get("software") or "")
            return None if packages is None else {"c8y_SoftwareUpdate": packages}
        if template == "c8y_Configuration":
            if not self._required(data, "configuration"):
                return None
            return {"c8y_Configuration": {"config": data["configuration"]}}
        if template == "c8y_Command":
            if not self._required(data, "command"):
                return None
            return {"c8y_Command": {"text": data["command"].strip()}}
        return {template: {}}  # c8y_Restart, or a supported fragment without a template

    def _packages(self, text: str) -> list[dict[str, str]] | None:
        packages, problems = [], []
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for number, line in enumerate(lines, start=1):
            parts = [part.strip() for part in line.split(",")]
            name, version, url, action = (parts + ["", "", "", ""])[:4]
            action = action or "install"
            if len(parts) > 4 or not name or not version or action not in SOFTWARE_ACTIONS:
                problems.append(
                    f"Line {number} ({line!r}): expected name, version, URL, action "
                    f"(install or delete)."
                )
                continue
            package = {"name": name, "version": version, "action": action}
            if url:
                package["url"] = url
            packages.append(package)
        if not lines:
            problems.append("Enter at least one package.")
        for problem in problems:
            self.add_error("software", problem)
        return None if problems else packages


# --- model admin -----------------------------------------------------------------------------


@admin.register(Operation)
class OperationAdmin(FleetListMixin, admin.ModelAdmin):
    form = OperationForm
    # Narrow enough for a 1280-px screen with the navigation and filter sidebars open
    # (operations.css, tests/browser/test_admin_layout.py): the agent under the device; the
    # description, bulk operation and retries under the fragment names; the change page shows each
    # apart.
    list_display = [
        "id",
        "device_agent",
        "status_label",
        "operation_summary",
        "failure_reason_short",
        "created",
    ]
    list_display_links = ["id"]
    list_select_related = ["device"]
    list_filter = [
        "status",
        ("creation_time", admin.DateFieldListFilter),
        AgentFilter,
        FragmentFilter,
    ]
    search_fields = ["device__name"]
    search_help_text = "Operation, device or agent ID, part of a device name, or a fragment name."
    ordering = ["-id"]
    # A second COUNT over the whole table is not worth it on millions of operations.
    show_full_result_count = False
    actions = ["mark_failed", "retry_failed"]
    readonly_fields = [
        "device_link",
        "agent_link",
        "creation_time",
        "status_changed_at",
        "executing_since",
        "expires_at",
        "execution_timeout",
        "bulk_operation_id",
        "retry_links",
        "attempt",
        "retry_at",
        "fragments_json",
    ]
    fieldsets = [
        (None, {"fields": ["status", "failure_reason"]}),
        ("Fragments", {"fields": ["fragments_json"]}),
        (
            "Routing and history",
            {
                "fields": [
                    ("device_link", "agent_link"),
                    ("creation_time", "status_changed_at"),
                    ("executing_since", "expires_at", "execution_timeout"),
                    "bulk_operation_id",
                    "retry_links",
                    ("attempt", "retry_at"),
                ]
            },
        ),
    ]

    class Media:
        css = {"all": ["devicecontrol/operations.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Operation]:
        # Only the device's name and ID are shown: leave its (possibly large) fragments behind.
        return super().get_queryset(request).select_related("device").defer("device__fragments")

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        attach_latest_retries(list(changelist.result_list))  # the cached rows the page shows
        return changelist

    def get_fieldsets(self, request: HttpRequest, obj: Operation | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or obj.status not in FINAL_STATUSES:
            return fieldsets
        # A finished operation no longer expires: its deadline would only mislead.
        return [
            (
                name,
                {
                    **options,
                    "fields": [
                        tuple(f for f in row if f != "expires_at")
                        if isinstance(row, tuple)
                        else row
                        for row in options["fields"]
                    ],
                },
            )
            for name, options in fieldsets
        ]

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "live/",
                self.admin_site.admin_view(self.live_view),
                name="devicecontrol_operation_live",
            ),
            path(
                "<path:object_id>/retry/",
                self.admin_site.admin_view(self.retry_view),
                name="devicecontrol_operation_retry",
            ),
            path(
                "<path:object_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="devicecontrol_operation_cancel",
            ),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # "Add" is sending an operation, not a second form like this one.
        context = {"show_save_and_add_another": False, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, context)

    # --- live status ---

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context and "cl" in context:  # the list itself (not an action's redirect or page)
            context["operations_live_url"] = live_url([op.pk for op in context["cl"].result_list])
        return response

    def live_view(self, request: HttpRequest) -> HttpResponse:
        """`?ids=1,2,3` (up to MAX_LIVE_IDS): the status, failure reason and status-change time
        of each, as deviceplatform/live.js takes them; one query. `done` once all are finished
        (or gone)."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        raw = [part for part in request.GET.get("ids", "").split(",") if part.strip()]
        ids = [_as_id(part) for part in raw]
        if not ids or len(ids) > MAX_LIVE_IDS or not all(ids):  # IDs start at 1
            return JsonResponse(
                {
                    "error": "devicecontrol/Invalid Data",
                    "message": f"ids must be 1 to {MAX_LIVE_IDS} operation IDs, comma-separated",
                    "info": "",
                },
                status=422,
            )
        rows = Operation.objects.filter(pk__in=ids).values_list(
            "pk", "status", "failure_reason", "status_changed_at"
        )
        values: dict[str, dict[str, str]] = {}
        done = True
        for pk, status, reason, changed in rows:
            keys = live_keys(pk)
            values[keys["status"]] = {"html": _status_badge(status)}
            values[keys["failure"]] = {"text": reason or ""}
            values[keys["changed"]] = {"html": _time(changed)}
            if status in FINAL_STATUSES:
                # A Cancel shown while it was open no longer applies (Retry comes with a reload).
                values[keys["actions"]] = {"html": ""}
            done = done and status in FINAL_STATUSES
        response = JsonResponse({"values": values, "done": done})
        response["Cache-Control"] = "no-store"
        return response

    # --- sending ---

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return self.send_view(request, device=None)

    def send_view(self, request: HttpRequest, device: ManagedObject | None) -> HttpResponse:
        """The send-operation page, for `device` or (from the operations list) any device."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        initial = {"device": request.GET.get("device")} if device is None else {}
        form = SendOperationForm(
            request.POST if request.method == "POST" else None, device=device, initial=initial
        )
        if request.method == "POST" and form.is_valid():
            target = form.target
            assert target is not None
            try:
                operation = operation_create(device=target, data=form.operation_body)
            except ApiError as exc:  # no agent above the device, a bad fragment name, ...
                form.add_error(None, exc.message)
            else:
                body = json.dumps(operation.fragments, ensure_ascii=False, sort_keys=True)
                if len(body) > LOGGED_BODY_CHARS:
                    body = body[:LOGGED_BODY_CHARS] + "…"
                self.log_addition(
                    request,
                    operation,
                    f"Sent to device {target.pk} through agent {operation.agent_id}: {body}",
                )
                messages.success(
                    request,
                    format_html(
                        "Sent operation {} ({}) to {}: PENDING until agent {} picks it up.",
                        _operation_link(operation.pk),
                        ", ".join(sorted(k for k in operation.fragments if k != "description")),
                        str(target),
                        operation.agent_id,
                    ),
                )
                if device is not None:
                    url = reverse("admin:inventory_managedobject_change", args=[device.pk])
                    return HttpResponseRedirect(url + "#operations")
                return HttpResponseRedirect(
                    reverse("admin:devicecontrol_operation_change", args=[operation.pk])
                )
        agent_id = device_agent_id(device=device) if device is not None else None
        context = {
            **self.admin_site.each_context(request),
            "title": f"Send an operation to {device}" if device else "Send an operation",
            "opts": self.opts,
            "form": form,
            "device": device,
            "agent_id": agent_id,
            "supported": form.supported,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/devicecontrol/send_operation.html", context)

    # --- columns and read-only fields ---

    @admin.display(description="status", ordering="status")
    def status_label(self, obj: Operation) -> str:
        return format_html(
            '<span data-live-key="{}">{}</span>',
            live_keys(obj.pk)["status"],
            _status_badge(obj.status),
        )

    @admin.display(description="description")
    def description(self, obj: Operation) -> str:
        value = obj.fragments.get("description")
        return value if isinstance(value, str) else ""

    @admin.display(description="failure reason")
    def failure_reason_short(self, obj: Operation) -> str:
        reason = obj.failure_reason or ""
        return format_html(
            '<span data-live-key="{}">{}</span>',
            live_keys(obj.pk)["failure"],
            reason if len(reason) <= 120 else reason[:119] + "…",
        )

    @admin.display(description="retries")
    def retried(self, obj: Operation) -> str:
        parts = []
        if getattr(obj, "latest_retry", None):
            parts.append(format_html("↻ retried as {}", _operation_link(obj.latest_retry)))
        if obj.retry_of_id is not None:
            parts.append(format_html("retry of {}", _operation_link(obj.retry_of_id)))
        return format_html_join("; ", "{}", ((part,) for part in parts)) if parts else ""

    @admin.display(description="device, agent", ordering="device_id")
    def device_agent(self, obj: Operation) -> str:
        return format_html(
            '<div>{}</div><div class="operation-secondary">agent {}</div>',
            self.device_link(obj),
            self.agent_link(obj),
        )

    @admin.display(description="operation")
    def operation_summary(self, obj: Operation) -> str:
        """The fragment names over the description, the bulk operation and the retries."""
        lines = [format_html('<div class="operation-fragments">{}</div>', self.fragment_names(obj))]
        if description := self.description(obj):
            lines.append(format_html('<div class="operation-secondary">{}</div>', description))
        origin = [part for part in (self.bulk_link(obj), self.retried(obj)) if part]
        if origin:
            lines.append(
                format_html(
                    '<div class="operation-secondary">{}</div>',
                    format_html_join("; ", "{}", ((part,) for part in origin)),
                )
            )
        return format_html_join("", "{}", ((line,) for line in lines))

    @admin.display(description="created", ordering="creation_time")
    def created(self, obj: Operation) -> str:
        # As the admin shows a date (dates.js puts it in the browser's zone), but free to wrap.
        return admin_time(obj.creation_time)

    @staticmethod
    def bulk_link(obj: Operation) -> str:
        if obj.bulk_operation_id is None:
            return ""
        url = reverse("admin:bulkops_bulkoperation_change", args=[obj.bulk_operation_id])
        return format_html('bulk <a href="{}">{}</a>', url, obj.bulk_operation_id)

    @admin.display(description="device", ordering="device_id")
    def device_link(self, obj: Operation) -> str:
        return _object_link(obj.device_id, str(obj.device))

    @admin.display(description="agent ID", ordering="agent_id")
    def agent_link(self, obj: Operation) -> str:
        return _object_link(obj.agent_id, str(obj.agent_id))

    @admin.display(description="fragments")
    def fragment_names(self, obj: Operation) -> str:
        return ", ".join(sorted(name for name in obj.fragments if name != "description"))

    @admin.display(description="fragments")
    def fragments_json(self, obj: Operation) -> str:
        return format_html(
            '<pre style="margin: 0; white-space: pre-wrap;">{}</pre>',
            json.dumps(obj.fragments, ensure_ascii=False, indent=2, sort_keys=True),
        )

    @admin.display(description="retries")
    def retry_links(self, obj: Operation) -> str:
        parts = []
        if obj.retry_of_id is not None:
            parts.append(format_html("retry of {}", _operation_link(obj.retry_of_id)))
        retries = list(obj.retries.order_by("id").values_list("id", flat=True))
        if retries:
            links = format_html_join(", ", "{}", ((_operation_link(pk),) for pk in retries))
            parts.append(format_html("retried as {}", links))
        if obj.superseded:
            parts.append(format_html("{}", "superseded: the bulk operation counts the retry"))
        return format_html_join("; ", "{}", ((part,) for part in parts)) if parts else "-"

    # --- search ---

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Operation], search_term: str
    ) -> tuple[QuerySet[Operation], bool]:
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if not term:
            return found, may_have_duplicates
        # Fragment names are matched exactly (jsonb `?`): a substring of a key means nothing.
        extra = Q(fragments__has_key=term)
        number = _as_id(term)
        if number is not None:
            extra |= Q(pk=number) | Q(device_id=number) | Q(agent_id=number)
        return found | queryset.filter(extra), may_have_duplicates

    # --- writes, all through the services ---

    def save_model(
        self, request: HttpRequest, obj: Operation, form: forms.ModelForm, change: bool
    ) -> None:
        if not form.has_changed():
            return  # nothing to say to the agent: no write, no event
        saved = operation_update(operation_id=obj.pk, data=form.update_body())
        adopt(obj, saved)

    def delete_model(self, request: HttpRequest, obj: Operation) -> None:
        operations_delete(queryset=Operation.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Operation]) -> None:
        operations_delete(queryset=queryset)

    def construct_change_message(
        self, request: HttpRequest, form: forms.ModelForm, formsets: Any, add: bool = False
    ) -> str:
        if add or not form.changed_data:
            return super().construct_change_message(request, form, formsets, add)
        changes = [
            f"{name.replace('_', ' ')}: {form.initial.get(name)!r} → {form.cleaned_data.get(name)!r}"
            for name in form.changed_data
        ]
        return "Changed " + "; ".join(changes)

    @admin.action(
        description="Cancel (PENDING: FAILED at once; EXECUTING: ask the agent to stop)",
        permissions=["change"],
    )
    def mark_failed(self, request: HttpRequest, queryset: QuerySet[Operation]) -> None:
        self._cancel(request, set(queryset.order_by().values_list("pk", flat=True)))

    @admin.action(description="Retry failed operations", permissions=["change"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Operation]) -> None:
        self._retry(request, set(queryset.order_by().values_list("pk", flat=True)))

    def _cancel(self, request: HttpRequest, selected: set[int]) -> None:
        """The REST cancel (`operation_cancel`), one operation at a time: a PENDING one fails at
        once, an EXECUTING one gets `c8y_CancelRequested` for its agent; a finished one (an agent
        finishing it meanwhile wins the row lock) is skipped."""
        username = request.user.get_username()
        cancelled: list[int] = []
        requested: list[int] = []
        for pk in sorted(selected):
            with transaction.atomic():
                before = (
                    Operation.objects.select_for_update()
                    .filter(pk=pk, status__in=OPEN_STATUSES)
                    .values_list("status", "fragments")
                    .first()
                )
                if before is None:
                    continue
                status, fragments = before
                saved = operation_cancel(operation=Operation(pk=pk), by=username)
                if status == OperationStatus.PENDING:
                    cancelled.append(pk)
                    message = f"Cancelled: {status} → FAILED ({saved.failure_reason})"
                    self.log_change(request, saved, message)
                else:
                    requested.append(pk)
                    if CANCEL_REQUESTED not in fragments:
                        self.log_change(request, saved, "Cancel requested from its agent")
        if cancelled:
            messages.success(request, f"Cancelled {len(cancelled)} PENDING operation(s): FAILED.")
        if requested:
            messages.success(
                request,
                f"Asked the agent to cancel {len(requested)} EXECUTING operation(s): "
                f"{', '.join(map(str, requested))}. The agent decides; to force an end, set the "
                "status on the operation's page.",
            )
        skipped = sorted(selected - set(cancelled) - set(requested))
        if skipped:
            messages.warning(
                request,
                f"Skipped {len(skipped)} operation(s) already SUCCESSFUL or FAILED: "
                f"{', '.join(map(str, skipped))}.",
            )

    def _retry(self, request: HttpRequest, selected: set[int]) -> None:
        failed = list(
            Operation.objects.filter(pk__in=selected, status=OperationStatus.FAILED).order_by("pk")
        )
        retried: list[tuple[int, int]] = []
        already: list[tuple[int, int]] = []
        refused: list[str] = []
        for operation in failed:
            try:
                with transaction.atomic():
                    # Locked, then checked: of two clicks (or operators) at once, one retries and
                    # the other finds that retry. An operation retried before is not retried
                    # again from here; its latest attempt is the one to retry.
                    Operation.objects.select_for_update().filter(pk=operation.pk).first()
                    earlier = (
                        Operation.objects.filter(retry_of_id=operation.pk)
                        .order_by("-id")
                        .values_list("pk", flat=True)
                        .first()
                    )
                    if earlier is not None:
                        already.append((operation.pk, earlier))
                        continue
                    retry = operation_retry(operation=operation)
                    self.log_change(request, operation, f"Retried as operation {retry.pk}")
                    self.log_addition(request, retry, f"Retry of operation {operation.pk}")
            except ApiError as exc:  # e.g. the device is no longer under an agent
                refused.append(f"{operation.pk}: {exc.message}")
            else:
                retried.append((operation.pk, retry.pk))
        if retried:
            pairs = ", ".join(f"{old} → {new}" for old, new in retried)
            messages.success(
                request, f"Retried {len(retried)} operation(s) as new PENDING ones: {pairs}."
            )
        for message in refused:
            messages.error(request, f"Could not retry operation {message}")
        if already:
            pairs = ", ".join(f"{old} (as {new})" for old, new in already)
            messages.warning(
                request,
                f"Skipped {len(already)} operation(s) already retried: {pairs}. "
                "Retry the latest attempt instead.",
            )
        skipped = sorted(selected - {operation.pk for operation in failed})
        if skipped:
            messages.warning(
                request,
                f"Skipped {len(skipped)} operation(s) that are not FAILED: "
                f"{', '.join(map(str, skipped))}.",
            )

    def _button_view(self, request: HttpRequest, object_id: str, run: Any) -> HttpResponse:
        """A retry or cancel button (a device's operations, an agent's queue): POST only."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        pk = _as_id(unquote(object_id))
        if pk is None or not Operation.objects.filter(pk=pk).exists():
            raise Http404(f"No operation with ID {object_id}")
        run(request, {pk})
        fallback = reverse("admin:devicecontrol_operation_change", args=[pk])
        return HttpResponseRedirect(_safe_next(request, fallback))

    @method_decorator(require_POST)
    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._button_view(request, object_id, self._retry)

    @method_decorator(require_POST)
    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._button_view(request, object_id, self._cancel)


# --- new device requests (device registration) -----------------------------------------------


class NewDeviceRequestForm(forms.ModelForm):
    """Register a device id, as `POST /devicecontrol/newDeviceRequests` does: the service decides
    (id rules, duplicates, a person holding the device user's name), rehearsed and rolled back
    here so a refusal shows on the form."""

    security_token = forms.CharField(
        required=False,
        max_length=MAX_SECURITY_TOKEN_LENGTH,
        widget=forms.PasswordInput(render_value=False),
        help_text=(
            "Optional. The device must then present this token when it polls for its "
            "credentials. Stored only as a digest."
        ),
    )

    class Meta:
        model = NewDeviceRequest
        fields = ["device_id"]
        help_texts = {
            "device_id": (
                "The device's serial or IMEI, as it asks for its credentials: no whitespace, "
                "'/', '\\\\', '+', '$' or ':'. Its device user will be device_<id>."
            )
        }

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        device_id = data.get("device_id")
        if device_id and not self.errors:
            token = data.get("security_token") or None
            rehearse(
                lambda: new_device_request_create(
                    device_id=device_id, owner="", security_token=token
                )
            )
        return data

    def validate_unique(self) -> None:
        pass  # the service's own check (letter case aside) answers on the form instead


@admin.register(NewDeviceRequest)
class NewDeviceRequestAdmin(FleetListMixin, admin.ModelAdmin):
    """Registered device ids and where each one is in the bootstrap flow. "Accept" goes through
    the same service as the REST PUT (only PENDING_ACCEPTANCE, once the device has polled, can be
    accepted) and is recorded in the request's history; deleting a request rejects it."""

    form = NewDeviceRequestForm
    list_display = [
        "device_id",
        "status",
        "creation_time",
        "owner",
        "last_polled_at",
        "accepted_by",
        "accepted_at",
        "credentials_issued_at",
        "token",
    ]
    list_filter = ["status"]
    search_fields = ["device_id"]
    ordering = ["-id"]
    actions = ["accept_requests"]
    readonly_fields = list_display  # every field changes through the flow, never by hand

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        if obj is None:
            return ["device_id", "security_token"]
        return self.readonly_fields

    @admin.display(description="security token", boolean=True)
    def token(self, obj: NewDeviceRequest) -> bool:
        return obj.has_security_token

    def save_model(
        self, request: HttpRequest, obj: NewDeviceRequest, form: forms.ModelForm, change: bool
    ) -> None:
        if change:
            return  # nothing on the change page can be edited
        created = new_device_request_create(
            device_id=form.cleaned_data["device_id"],
            owner=request.user.get_username(),
            security_token=form.cleaned_data.get("security_token") or None,
        )
        adopt(obj, created)

    def delete_model(self, request: HttpRequest, obj: NewDeviceRequest) -> None:
        with contextlib.suppress(ApiError):  # deleted meanwhile: what the operator asked for
            new_device_request_delete(device_id=obj.device_id)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[NewDeviceRequest]) -> None:
        for device_id in queryset.values_list("device_id", flat=True):
            self.delete_model(request, NewDeviceRequest(device_id=device_id))

    @admin.action(
        description="Accept (the device has polled: PENDING_ACCEPTANCE)", permissions=["change"]
    )
    def accept_requests(self, request: HttpRequest, queryset: QuerySet[NewDeviceRequest]) -> None:
        accepted: list[str] = []
        for device_id in queryset.order_by("id").values_list("device_id", flat=True):
            try:
                saved = new_device_request_accept(
                    device_id=device_id,
                    status=NewDeviceRequestStatus.ACCEPTED,
                    accepted_by=request.user.get_username(),
                )
            except ApiError as exc:
                messages.error(request, f"Could not accept {device_id}: {exc.message}")
            else:
                self.log_change(request, saved, f"Accepted by {request.user.get_username()}")
                accepted.append(device_id)
        if accepted:
            messages.success(
                request,
                f"Accepted {len(accepted)} request(s): {', '.join(accepted)}. Each device gets "
                "its credentials at its next poll.",
            )


# --- a device's page: its operations, an agent's queue, sending ---------------------------------

PANEL_PAGE_SIZE = 20
MAX_PANEL_PAGE = 10_000


def _panel_page(request: HttpRequest, param: str, queryset: QuerySet[Operation]) -> dict[str, Any]:
    """One page of a panel, by offset, without a COUNT: one row more than shown says whether an
    older page exists. The page number is `?<param>=N`; other parameters are kept."""
    number = min(_as_id(request.GET.get(param)) or 1, MAX_PANEL_PAGE)
    start = (number - 1) * PANEL_PAGE_SIZE
    rows = list(queryset[start : start + PANEL_PAGE_SIZE + 1])
    attach_latest_retries(rows)
    for row in rows:
        row.live = live_keys(row.pk)
        description = row.fragments.get("description")
        names = ", ".join(sorted(name for name in row.fragments if name != "description"))
        row.summary = f"{description} ({names})" if isinstance(description, str) else names

    def url(page: int) -> str:
        query = request.GET.copy()
        query[param] = str(page)
        return "?" + query.urlencode()

    return {
        "rows": rows[:PANEL_PAGE_SIZE],
        "live_url": live_url([row.pk for row in rows[:PANEL_PAGE_SIZE]]),
        "number": number,
        "previous_url": url(number - 1) if number > 1 else None,
        "next_url": url(number + 1) if len(rows) > PANEL_PAGE_SIZE else None,
    }


def operation_columns() -> dict[str, Any]:
    """The device list's operation columns: one correlated subquery each, on the operations'
    (device, status, id) and (device, id) indexes. Computed for the page's rows only, after the
    page is read (`DeviceAdmin.get_changelist_instance`): as annotations of the list's query they
    would run for every row an OFFSET skips too (170 ms at page 500 of 100,000 devices)."""
    own = Operation.objects.filter(device=OuterRef("pk"))
    latest = own.order_by("-id")
    return {
        "open_operation_count": Subquery(
            own.filter(status__in=OPEN_STATUSES)
            .order_by()
            .values("device")
            .annotate(n=Count("pk"))
            .values("n")
        ),
        "last_operation_status": Subquery(latest.values("status")[:1]),
        "last_operation_at": Subquery(latest.values("status_changed_at")[:1]),
    }


class OperationStatusFilter(admin.SimpleListFilter):
    """The device list by what its operations say: any open (PENDING or EXECUTING), the status
    of its latest operation, or none at all, on the operations' (device, status, id), (device,
    id) and (status, id) indexes."""

    title = "operations"
    parameter_name = "operations"
    # Of the latest operation's statuses only FAILED is offered: the lookup is driven by the
    # operations of that status, cheap while they are a minority (240 ms for 100,000 FAILED of
    # 1,000,000); "latest SUCCESSFUL" would walk nearly every operation. Open covers PENDING.
    LATEST = (OperationStatus.FAILED,)

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("open", "with open operations"),
            *((f"last-{s.value}", f"last one {s.value}") for s in self.LATEST),
            ("none", "no operations"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        own = Operation.objects.filter(device=OuterRef("pk"))
        if value == "open":
            return queryset.filter(Exists(own.filter(status__in=OPEN_STATUSES)))
        if value == "none":
            return queryset.exclude(Exists(own))
        wanted = {f"last-{s.value}": s for s in self.LATEST}.get(value or "")
        if wanted is None:
            return queryset
        # Driven from the operations of that status (status index), each kept when no newer
        # operation of its device exists: a lookup per device would read every device whenever
        # few match (800 ms at 100,000 devices).
        newer = Operation.objects.filter(device=OuterRef("device"), id__gt=OuterRef("id"))
        latest = Operation.objects.filter(status=wanted).exclude(Exists(newer)).values("device")
        return queryset.filter(pk__in=latest)


class DeviceAdmin(ManagedObjectAdmin):
    """inventory's ManagedObject admin with what devicecontrol knows about a device: its
    operations (newest first, with retry and cancel), the queue of an agent, a send-operation
    page, and the list's open-operation and last-operation columns."""

    change_form_template = "admin/devicecontrol/device_change_form.html"

    class Media:
        css = {"all": ["devicecontrol/operations.css"]}

    def _operations_admin(self) -> OperationAdmin:
        return self.admin_site.get_model_admin(Operation)  # type: ignore[return-value]

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/send-operation/",
                self.admin_site.admin_view(self.send_operation_view),
                name="inventory_managedobject_send_operation",
            ),
            *super().get_urls(),
        ]

    def send_operation_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        device = self.get_object(request, unquote(object_id))
        if device is None:
            raise Http404(f"No managed object with ID {object_id}")
        if not self.has_view_or_change_permission(request, device):
            raise PermissionDenied
        return self._operations_admin().send_view(request, device=device)

    # --- list columns ---

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)  # the cached rows the page shows
        if rows:
            columns = operation_columns()
            values = {
                row.pop("pk"): row
                for row in ManagedObject.objects.filter(pk__in=[obj.pk for obj in rows])
                .annotate(**columns)
                .values("pk", *columns)
            }
            for obj in rows:
                for name, value in values.get(obj.pk, {}).items():
                    setattr(obj, name, value)
        return changelist

    def get_list_filter(self, request: HttpRequest) -> Any:
        return [*super().get_list_filter(request), OperationStatusFilter]

    def get_list_display(self, request: HttpRequest) -> Any:
        # Beside what an operator scans first (before the owner), else at the end.
        columns = list(super().get_list_display(request))
        at = columns.index("owner") if "owner" in columns else len(columns)
        columns[at:at] = ["open_operations", "last_operation"]
        return columns

    @admin.display(description="open operations")
    def open_operations(self, obj: ManagedObject) -> str:
        count = getattr(obj, "open_operation_count", None) or 0
        if not count:
            return "0"
        url = reverse("admin:inventory_managedobject_change", args=[obj.pk]) + "#operations"
        return format_html('<a href="{}">{}</a>', url, count)

    @admin.display(description="last operation")
    def last_operation(self, obj: ManagedObject) -> str:
        status = getattr(obj, "last_operation_status", None)
        if status is None:
            return "-"
        at = obj.last_operation_at  # type: ignore[attr-defined]
        return format_html(
            '{} <time datetime="{}">{}</time>',
            _status_badge(status),
            at.isoformat(),
            at.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )

    # --- the change page's operations panel ---

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: ManagedObject | None = None,
    ) -> Any:
        operations_admin = self._operations_admin()
        if (
            obj is not None
            and obj.pk is not None
            and operations_admin.has_view_or_change_permission(request)
        ):
            context.update(self._operations_context(request, obj, operations_admin))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _operations_context(
        self, request: HttpRequest, obj: ManagedObject, operations_admin: OperationAdmin
    ) -> dict[str, Any]:
        rows = Operation.objects.all()
        context: dict[str, Any] = {
            "device_operations": _panel_page(
                request, "operations_page", rows.filter(device_id=obj.pk).order_by("-id")
            ),
            "can_send_operation": operations_admin.has_add_permission(request),
            "can_change_operations": operations_admin.has_change_permission(request),
            "send_operation_url": reverse(
                "admin:inventory_managedobject_send_operation", args=[obj.pk]
            ),
            "back_url": request.get_full_path(),
        }
        if obj.is_agent:
            # What the agent receives next: its open operations in the order it gets them.
            queue = (
                rows.filter(agent_id=obj.pk, status__in=OPEN_STATUSES)
                .select_related("device")
                .defer("device__fragments")
                .order_by("id")
            )
            context["agent_queue"] = _panel_page(request, "queue_page", queue)
        return context


admin.site.unregister(ManagedObject)
admin.site.register(ManagedObject, DeviceAdmin)
