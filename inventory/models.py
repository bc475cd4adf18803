"""Managed objects, the three child/parent relations between them, and external IDs."""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Upper
from django.utils import timezone

from deviceplatform.db import DocumentField


class ManagedObject(models.Model):
    """A Cumulocity managed object: a few standard properties plus free-form fragments.

    `id` draws from the global sequence shared with operations and bulk operations (migration 0001).
    Fragments (every top-level key that is not a standard property) live in one JSON document; the
    presence flags that hot queries filter on (device, agent, group) are columns kept in sync by the
    services, so agent resolution and group membership never scan JSON."""

    type = models.CharField(max_length=512, null=True, blank=True, db_index=True)
    name = models.CharField(max_length=1024, null=True, blank=True, db_index=True)
    owner = models.CharField(max_length=150, db_index=True)
    creation_time = models.DateTimeField(default=timezone.now)
    last_updated = models.DateTimeField(default=timezone.now)
    fragments = DocumentField(default=dict, blank=True)
    is_device = models.BooleanField(default=False, db_index=True)
    is_agent = models.BooleanField(default=False, db_index=True)
    is_group = models.BooleanField(default=False, db_index=True)

    class Meta:
        ordering = ["id"]
        verbose_name = "managed object"
        indexes = [
            # Users without ROLE_INVENTORY_READ see objects they own, matched case-insensitively.
            models.Index(Upper("owner"), name="mo_owner_upper_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name or '(unnamed)'} [{self.pk}]"

    def refresh_flags(self) -> None:
        self.is_device = "c8y_IsDevice" in self.fragments
        self.is_agent = "com_cumulocity_model_Agent" in self.fragments
        self.is_group = "c8y_IsDeviceGroup" in self.fragments


class Relation(models.TextChoices):
    """The three independent parent -> child relations (spec inventory.md §7)."""

    DEVICE = "device", "childDevices"
    ASSET = "asset", "childAssets"
    ADDITION = "addition", "childAdditions"

    @property
    def children_segment(self) -> str:
        return {"device": "childDevices", "asset": "childAssets", "addition": "childAdditions"}[
            self.value
        ]

    @property
    def parents_segment(self) -> str:
        return {"device": "deviceParents", "asset": "assetParents", "addition": "additionParents"}[
            self.value
        ]


class ManagedObjectReference(models.Model):
    """One directed edge `parent -> child` in one relation. Ordered by assignment (its own id)."""

    parent = models.ForeignKey(ManagedObject, on_delete=models.CASCADE, related_name="child_refs")
    child = models.ForeignKey(ManagedObject, on_delete=models.CASCADE, related_name="parent_refs")
    relation = models.CharField(max_length=10, choices=Relation.choices)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["parent", "relation", "child"], name="reference_unique_edge"
            ),
            models.CheckConstraint(
                condition=~models.Q(parent=models.F("child")), name="reference_not_self"
            ),
        ]
        indexes = [models.Index(fields=["child", "relation"], name="reference_child_idx")]

    def __str__(self) -> str:
        return f"{self.parent_id} -{self.relation}-> {self.child_id}"


class ExternalId(models.Model):
    """Binds (type, externalId) to one managed object; unique and case-sensitive (identity.md §1)."""

    type = models.CharField(max_length=512)
    external_id = models.CharField(max_length=1024)
    managed_object = models.ForeignKey(
        ManagedObject, on_delete=models.CASCADE, related_name="external_ids"
    )

    class Meta:
        ordering = ["id"]
        verbose_name = "external ID"
        constraints = [
            models.UniqueConstraint(fields=["type", "external_id"], name="external_id_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.type}/{self.external_id} -> {self.managed_object_id}"
