"""Operator UI for operations: list, filter, change the status and failure reason, cancel, retry;
and for new device requests: register, accept, reject (at the end).

Every write goes through `devicecontrol.services`, as the REST API's do, so the status rules apply
and each change sends its realtime event on commit. A status change is rehearsed with the real
service in a savepoint that is always rolled back: a refusal (a failure reason without FAILED) is
shown on the form and nothing is written. Operations are created by the API and bulk operations
only, so the admin offers no "add"."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from devicecontrol.models import (
    NewDeviceRequest,
    NewDeviceRequestStatus,
    Operation,
    OperationStatus,
)
from devicecontrol.serializers import MAX_SECURITY_TOKEN_LENGTH
from devicecontrol.services import (
    new_device_request_accept,
    new_device_request_create,
    new_device_request_delete,
    operation_retry,
    operation_update,
    operations_delete,
)
from deviceplatform.api.exceptions import ApiError
from deviceplatform.api.params import MAX_ID
from inventory.admin import adopt, rehearse
from inventory.models import ManagedObject

CANCELLED_REASON = "Cancelled by an operator ({username})"
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


# --- model admin -----------------------------------------------------------------------------


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    form = OperationForm
    list_display = [
        "id",
        "device_link",
        "agent_link",
        "status",
        "fragment_names",
        "creation_time",
        "bulk_operation_id",
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
                ]
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Operation]:
        # Only the device's name and ID are shown: leave its (possibly large) fragments behind.
        return super().get_queryset(request).select_related("device").defer("device__fragments")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # operations come from the API and from bulk operations

    # --- columns and read-only fields ---

    @admin.display(description="device", ordering="device_id")
    def device_link(self, obj: Operation) -> str:
        return _object_link(obj.device_id, str(obj.device))

    @admin.display(description="agent ID", ordering="agent_id")
    def agent_link(self, obj: Operation) -> str:
        return _object_link(obj.agent_id, str(obj.agent_id))

    @admin.display(description="fragments")
    def fragment_names(self, obj: Operation) -> str:
        return ", ".join(sorted(obj.fragments))

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

    @admin.action(
        description="Mark as FAILED (cancel PENDING and EXECUTING operations)",
        permissions=["change"],
    )
    def mark_failed(self, request: HttpRequest, queryset: QuerySet[Operation]) -> None:
        reason = CANCELLED_REASON.format(username=request.user.get_username())
        selected = set(queryset.order_by().values_list("pk", flat=True))
        with transaction.atomic():
            # Lock first, then check: an agent finishing the operation meanwhile wins.
            open_ids = list(
                Operation.objects.select_for_update()
                .filter(
                    pk__in=selected,
                    status__in=[OperationStatus.PENDING, OperationStatus.EXECUTING],
                )
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            for pk in open_ids:
                operation_update(
                    operation_id=pk,
                    data={"status": OperationStatus.FAILED, "failureReason": reason},
                )
        if open_ids:
            messages.success(request, f"Marked {len(open_ids)} operation(s) as FAILED.")
        skipped = sorted(selected - set(open_ids))
        if skipped:
            messages.warning(
                request,
                f"Skipped {len(skipped)} operation(s) already SUCCESSFUL or FAILED: "
                f"{', '.join(map(str, skipped))}.",
            )

    @admin.action(description="Retry failed operations", permissions=["change"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Operation]) -> None:
        selected = set(queryset.order_by().values_list("pk", flat=True))
        failed = list(
            Operation.objects.filter(pk__in=selected, status=OperationStatus.FAILED).order_by("pk")
        )
        retried: list[tuple[int, int]] = []
        refused: list[str] = []
        for operation in failed:
            try:
                with transaction.atomic():
                    retry = operation_retry(operation=operation)
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
        skipped = sorted(selected - {operation.pk for operation in failed})
        if skipped:
            messages.warning(
                request,
                f"Skipped {len(skipped)} operation(s) that are not FAILED: "
                f"{', '.join(map(str, skipped))}.",
            )


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
class NewDeviceRequestAdmin(admin.ModelAdmin):
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
