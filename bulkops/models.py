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
# The progress counters, in the order of the API's `progress` object.
COUNTERS = ("pending", "failed", "executing", "successful")


class RolloutState(models.TextChoices):
    """The stored rollout states (bulkops.rollout); ABORTED and DONE are derived from `status`."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    WAITING_FOR_WAVE = "WAITING_FOR_WAVE"


class BulkOperation(models.Model):
    """One bulk operation. `id` draws from the global sequence (migration 0002).

    The targets are a snapshot taken at creation (`BulkOperationTarget`, ordered by `position`).
    The ramp state is `next_index` (the next position to process) and the schedule it runs on:
    position p is due at `effective_start + (p - first_index) * creation_ramp`; `next_due_at` is
    the due time of `next_index`, indexed, so the beat task finds due work without scanning.
    `pending`/`executing`/`successful`/`failed` count the target devices by the status of their
    latest child operation (a retry supersedes the attempt it retries), as folded so far: a status
    change never writes this row (it would serialise every agent on it) but inserts a
    `BulkProgressDelta`, which the beat task folds in here. The exact progress is these columns
    plus the deltas not folded yet (`bulkops.selectors`), so reading a bulk operation never counts
    its children. `ramp_error*` describe the last failed attempt to advance the ramp (cleared
    when it advances again): the reason, when, and how many attempts in a row failed.
    `abort_config` holds the validated abort thresholds ("abortConfig", bulkops.abort; None: no
    abort thresholds) and `abort_reason` what fired once one did ("abortReason"; the rollout then
    ended DELETED).

    Rollout extensions (bulkops.rollout): `rollout_config` (rates) and `waves` as validated from
    the body; `rollout_state` is NULL for a plain bulk operation never paused; `wave` the current
    wave (0-based); `current_rate` the children per minute the schedule runs at when a rate governs
    it instead of `creation_ramp`, `rate_step` the exponential increases applied so far;
    `rollout_reason` why it is paused. A paused or wave-waiting bulk operation has no
    `next_due_at`, so the ramp never picks it up.

    `pending_fail` is set while PENDING children of a stopped bulk operation (aborted, or
    cancelled with `cancelPending`) are still to be failed after the stop committed
    (bulkops.abort `bulk_pending_fail`): {"reason", "notify", "at", "upTo"}, `at` the lease's
    last renewal by the process failing them in batches, `upTo` the highest child ID at the stop
    (later attempts are left alone); cleared once none is left."""

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
    ramp_error = models.TextField(null=True, blank=True)
    ramp_error_at = models.DateTimeField(null=True, blank=True)
    ramp_error_count = models.PositiveIntegerField(default=0, db_default=0)
    abort_config = DocumentField(null=True, blank=True)
    abort_reason = DocumentField(null=True, blank=True)
    rollout_config = DocumentField(null=True, blank=True)
    waves = DocumentField(null=True, blank=True)
    rollout_state = models.CharField(
        max_length=16, choices=RolloutState.choices, null=True, blank=True
    )
    rollout_reason = models.TextField(null=True, blank=True)
    wave = models.PositiveIntegerField(default=0, db_default=0)
    current_rate = models.FloatField(null=True, blank=True)
    rate_step = models.PositiveIntegerField(default=0, db_default=0)
    pending_fail = DocumentField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["rollout_state"],
                name="bulk_wave_wait_idx",
                condition=models.Q(rollout_state="WAITING_FOR_WAVE"),
            ),
            models.Index(
                fields=["id"],
                name="bulk_pending_fail_idx",
                condition=models.Q(pending_fail__isnull=False),
            ),
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


class BulkProgressDelta(models.Model):
    """A change of a bulk operation's progress counters, inserted in the transaction that changed
    its children's statuses (one row per bulk operation and transaction) and folded into the bulk
    operation's row by the beat task (`bulk_progress_fold`). `bulk_operation_id` is deliberately
    not a foreign key: its check would lock the bulk operation's row (FOR KEY SHARE) in every
    status change, the very serialisation these rows avoid."""

    bulk_operation_id = models.BigIntegerField()
    pending = models.IntegerField(default=0)
    executing = models.IntegerField(default=0)
    successful = models.IntegerField(default=0)
    failed = models.IntegerField(default=0)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["bulk_operation_id", "id"], name="bulk_delta_idx")]

    def __str__(self) -> str:
        return (
            f"bulk operation {self.bulk_operation_id}: pending {self.pending:+d}, executing "
            f"{self.executing:+d}, successful {self.successful:+d}, failed {self.failed:+d}"
        )
