"""Operations: commands for a device, queued FIFO for the agent above it (spec devicecontrol.md)."""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from deviceplatform.db import DocumentField


class OperationStatus(models.TextChoices):
    PENDING = "PENDING"
    EXECUTING = "EXECUTING"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"


FINAL_STATUSES = frozenset({OperationStatus.SUCCESSFUL, OperationStatus.FAILED})


class Operation(models.Model):
    """One operation. `id` draws from the global sequence (migration 0002).

    `agent_id` is the agent resolved at creation (devicecontrol.md §4); it is deliberately not a
    foreign key: it is never recomputed, and deleting the agent leaves its operations as they are.
    It is empty only for a bulk child created FAILED because its device had no agent.
    Fragments hold every other top-level key verbatim. The extension columns (expiry, execution
    timeout, retry link) are documented in the README under "Beyond Cumulocity"."""

    # No separate index on device_id: operation_device_idx and operation_device_status_idx lead with it.
    device = models.ForeignKey(
        "inventory.ManagedObject",
        on_delete=models.CASCADE,
        related_name="operations",
        db_index=False,
    )
    agent_id = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(
        max_length=10, choices=OperationStatus.choices, default=OperationStatus.PENDING
    )
    creation_time = models.DateTimeField(default=timezone.now)
    status_changed_at = models.DateTimeField(default=timezone.now)
    failure_reason = models.TextField(null=True, blank=True)
    fragments = DocumentField(default=dict, blank=True)
    bulk_operation_id = models.BigIntegerField(null=True, blank=True)
    # Extensions beyond Cumulocity: a PENDING operation fails when `expires_at` passes; an
    # EXECUTING one fails `execution_timeout` seconds after it started executing.
    expires_at = models.DateTimeField(null=True, blank=True)
    execution_timeout = models.PositiveIntegerField(null=True, blank=True)
    executing_since = models.DateTimeField(null=True, blank=True)
    retry_of = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="retries"
    )
    # A bulk child that was retried: the retry is now the device's attempt in the bulk operation,
    # and only that one counts in its progress (and can be retried again). Deleting the retry
    # makes the attempt before it the latest again.
    superseded = models.BooleanField(default=False, db_default=False)
    # Automatic retries (README "Automatic retries"): the attempt number (a retry's is its
    # original's plus one), and when a FAILED attempt is to be retried by the sweeper; null: not.
    attempt = models.PositiveIntegerField(default=1, db_default=1)
    retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            # One latest attempt per device and bulk operation: the ramp creates each device's
            # child exactly once, and a retry supersedes the attempt before it. (Not "one row
            # with retry_of NULL": deleting an original sets its retry's retry_of to NULL first.)
            models.UniqueConstraint(
                fields=["bulk_operation_id", "device"],
                name="operation_bulk_latest_unique",
                condition=models.Q(bulk_operation_id__isnull=False, superseded=False),
            ),
        ]
        indexes = [
            # The agent's poll: "my PENDING operations, oldest first".
            models.Index(fields=["agent_id", "status", "id"], name="operation_agent_status_idx"),
            # A device's history page.
            models.Index(fields=["device", "id"], name="operation_device_idx"),
            # `deviceId&status=…`, and the agent's poll under the owner filter (bench/operations.py).
            models.Index(fields=["device", "status", "id"], name="operation_device_status_idx"),
            models.Index(fields=["status", "id"], name="operation_status_idx"),
            models.Index(fields=["bulk_operation_id", "id"], name="operation_bulk_idx"),
            models.Index(fields=["creation_time"], name="operation_creation_idx"),
            # Sweepers: only the rows they can act on are indexed.
            models.Index(
                fields=["expires_at"],
                name="operation_pending_expiry_idx",
                condition=models.Q(status="PENDING", expires_at__isnull=False),
            ),
            models.Index(
                fields=["executing_since"],
                name="operation_executing_idx",
                condition=models.Q(status="EXECUTING"),
            ),
            models.Index(
                fields=["retry_at"],
                name="operation_retry_due_idx",
                condition=models.Q(retry_at__isnull=False),
            ),
            models.Index(
                fields=["status_changed_at"],
                name="operation_final_idx",
                condition=models.Q(status__in=["SUCCESSFUL", "FAILED"]),
            ),
        ]

    def __str__(self) -> str:
        return f"operation {self.pk} {self.status} for device {self.device_id}"


class NewDeviceRequestStatus(models.TextChoices):
    """Cumulocity's registration states: an operator registers the id, the device's first poll
    moves it on, and only then can the operator accept it (the next poll gets credentials)."""

    WAITING_FOR_CONNECTION = "WAITING_FOR_CONNECTION"
    PENDING_ACCEPTANCE = "PENDING_ACCEPTANCE"
    ACCEPTED = "ACCEPTED"


class NewDeviceRequest(models.Model):
    """A device registration (Cumulocity's newDeviceRequest), keyed on the wire by `device_id`.

    The device's first credentials poll moves it from WAITING_FOR_CONNECTION to
    PENDING_ACCEPTANCE; an operator accepts it; the next poll creates the device user and returns
    its password once (`credentials_issued_at` is set then, and later polls get 404). The security
    token, when one was given, is kept as its SHA-256 digest only: a poll must present the token,
    and the digests are compared in constant time. Device ids are unique regardless of letter case,
    because the device user's name (`device_<id>`) is."""

    device_id = models.CharField("device id", max_length=150)
    status = models.CharField(
        max_length=22,
        choices=NewDeviceRequestStatus.choices,
        default=NewDeviceRequestStatus.WAITING_FOR_CONNECTION,
    )
    security_token_digest = models.CharField(max_length=64, blank=True, default="", editable=False)
    creation_time = models.DateTimeField("created", default=timezone.now)
    owner = models.CharField(max_length=150, blank=True, default="")
    last_polled_at = models.DateTimeField("last polled", null=True, blank=True)
    accepted_by = models.CharField(max_length=150, blank=True, default="")
    accepted_at = models.DateTimeField("accepted at", null=True, blank=True)
    credentials_issued_at = models.DateTimeField("credentials issued at", null=True, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name = "new device request"
        constraints = [
            models.UniqueConstraint(Lower("device_id"), name="newdevicerequest_device_id_unique"),
        ]
        indexes = [models.Index(fields=["device_id"], name="newdevicerequest_device_idx")]

    def __str__(self) -> str:
        return f"new device request {self.device_id} {self.status}"

    @property
    def has_security_token(self) -> bool:
        return bool(self.security_token_digest)
