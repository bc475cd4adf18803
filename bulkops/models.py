"""Bulk operations: one operation prototype ramped across a fleet (spec bulkoperations.md)."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from deviceplatform.db import DocumentField


class BulkStatus(models.TextChoices):
    ACTIVE = "ACTIVE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    DELETED = "DELETED"


RUNNING_STATUSES = (BulkStatus.ACTIVE, BulkStatus.IN_PROGRESS)


class BulkOperation(models.Model):
    """One bulk operation. `id` draws from the global sequence (migration 0002).

    The targets are a snapshot taken at creation (`BulkOperationTarget`, ordered by `position`).
    The ramp state is `next_index` (the next position to process) and the schedule it runs on:
    position p is due at `effective_start + (p - first_index) * creation_ramp`; `next_due_at` is
    the due time of `next_index`, indexed, so the beat task finds due work without scanning.
    `pending`/`executing`/`successful`/`failed` count the existing child operations by status;
    they change in the same transaction as the children (devicecontrol STATUS_CHANGE_HOOKS), so
    reading a bulk operation never counts its children."""

    group_id = models.BigIntegerField(null=True, blank=True)
    failed_parent_id = models.BigIntegerField(null=True, blank=True)
    start_date = models.DateTimeField()
    creation_ramp = models.FloatField()
    operation_prototype = DocumentField(default=dict)
    fragments = DocumentField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=BulkStatus.choices, default=BulkStatus.ACTIVE)
    creation_time = models.DateTimeField(default=timezone.now)
    last_updated = models.DateTimeField(default=timezone.now)
    effective_start = models.DateTimeField()
    first_index = models.PositiveIntegerField(default=0)
    next_index = models.PositiveIntegerField(default=0)
    next_due_at = models.DateTimeField(null=True, blank=True)
    target_count = models.PositiveIntegerField(default=0)
    dropped = models.PositiveIntegerField(default=0)
    pending = models.IntegerField(default=0)
    executing = models.IntegerField(default=0)
    successful = models.IntegerField(default=0)
    failed = models.IntegerField(default=0)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["next_due_at"],
                name="bulk_due_idx",
                condition=models.Q(status__in=["ACTIVE", "IN_PROGRESS"]),
            ),
        ]

    def __str__(self) -> str:
        return f"bulk operation {self.pk} ({self.status})"

    @property
    def remaining(self) -> int:
        """Targets not processed yet (never, once cancelled)."""
        if self.status == BulkStatus.DELETED:
            return 0
        return max(self.target_count - self.next_index, 0)


class BulkOperationTarget(models.Model):
    """One target device of a bulk operation, in processing order."""

    bulk_operation = models.ForeignKey(
        BulkOperation, on_delete=models.CASCADE, related_name="targets"
    )
    position = models.PositiveIntegerField()
    device_id = models.BigIntegerField()

    class Meta:
        ordering = ["bulk_operation", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["bulk_operation", "position"], name="bulk_target_position_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.bulk_operation_id}#{self.position} -> {self.device_id}"
