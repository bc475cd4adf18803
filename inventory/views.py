"""Inventory REST resources (spec inventory.md): validate, call a service or selector, render."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response

from deviceplatform.api.idempotency import idempotent_create
from deviceplatform.api.media_types import PLAIN_JSON, MediaType
from deviceplatform.api.pagination import paginated
from deviceplatform.api.params import MAX_ID, get_bool
from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.api.views import CumulocityView
from deviceplatform.roles import Role
from inventory import selectors, services
from inventory.filters import ManagedObjectFilter
from inventory.models import ManagedObject, Relation
from inventory.query import parse_query
from inventory.serializers import (
    RenderOptions,
    ids_param,
    inventory_api_json,
    managed_object_json,
    managed_object_url,
    reference_json,
    reference_target_id,
    references_list_ids,
    unique,
)

READ = frozenset({Role.INVENTORY_READ})
ADMIN = frozenset({Role.INVENTORY_ADMIN})
CREATE = frozenset({Role.INVENTORY_ADMIN, Role.INVENTORY_CREATE})


class InventoryView(CumulocityView):
    """Shared helpers of the inventory resources."""

    def is_admin(self) -> bool:
        return has_any_role(self.request.user, ADMIN)

    def render_many(
        self, objects: list[ManagedObject], options: RenderOptions
    ) -> list[dict[str, Any]]:
        refs = selectors.references_for(
            [mo.pk for mo in objects], children=options.with_children, parents=options.with_parents
        )
        return [
            managed_object_json(mo, base=self.base, refs=refs, options=options) for mo in objects
        ]

    def render_one(
        self, managed_object: ManagedObject, options: RenderOptions | None = None
    ) -> dict[str, Any]:
        return self.render_many([managed_object], options or RenderOptions())[0]

    def get_managed_object(self, pk: object) -> ManagedObject:
        """404 first, then the role-or-owner check (auth.md §6)."""
        managed_object = selectors.managed_object_get(pk=pk)
        self.check_object_permissions(self.request, managed_object)
        return managed_object


class InventoryApiView(InventoryView):
    required_roles = {"GET": READ}

    def get(self, request: Any) -> Response:
        return self.respond(inventory_api_json(self.base), MediaType.INVENTORY_API)


def managed_objects_filtered(request: Any) -> Any:
    """The managed objects the list answers for these query parameters (inventory.md §4),
    ordered; visible to the user only."""
    params = request.GET
    queryset = selectors.managed_objects_visible_to(request.user)
    query, device_query = params.get("query"), params.get("q")
    if query or device_query:
        # `query`/`q` replace every other filter (inventory.md §4); `q` means devices only.
        parsed = parse_query(query or device_query or "")
        queryset = queryset.filter(parsed.filter)
        if device_query:
            if query:
                queryset = queryset.filter(parse_query(device_query).filter)
            queryset = queryset.filter(is_device=True)
        return queryset.order_by(*(parsed.order_by or ("id",)))
    if params.get("ids"):
        return queryset.filter(pk__in=ids_param(params["ids"])).order_by("id")
    return ManagedObjectFilter(params, queryset=queryset).qs.order_by("id")


class ManagedObjectCollectionView(InventoryView):
    required_roles = {"GET": frozenset(), "POST": CREATE}

    def get(self, request: Any) -> Response:
        options = RenderOptions.from_params(request.GET)
        queryset = managed_objects_filtered(request)
        return self.respond(
            paginated(
                request,
                queryset,
                key="managedObjects",
                render=lambda rows: self.render_many(rows, options),
            ),
            MediaType.MANAGED_OBJECT_COLLECTION,
        )

    @idempotent_create
    def post(self, request: Any) -> Response:
        managed_object = services.managed_object_create(
            owner=request.user.username,
            data=self.request_object(),
            allow_owner=self.is_admin(),
            notify=self.notify,
        )
        # A new object has no references yet: render without querying for them.
        return self.respond(
            lambda: managed_object_json(managed_object, base=self.base),
            MediaType.MANAGED_OBJECT,
            status=201,
            location=managed_object_url(self.base, managed_object.pk),
        )


class ManagedObjectCountView(InventoryView):
    """`GET /inventory/managedObjects/count`: how many managed objects the list would hold for the
    same filters, as a bare JSON number (what @c8y/client's `inventory.count` reads)."""

    required_roles = {"GET": frozenset()}

    def get(self, request: Any) -> Response:
        count = managed_objects_filtered(request).order_by().count()
        return Response(count, content_type=PLAIN_JSON)


class ManagedObjectDetailView(InventoryView):
    required_roles = {"GET": READ, "PUT": ADMIN, "DELETE": ADMIN}
    owner_rule_methods = frozenset({"GET", "PUT", "DELETE"})

    def get(self, request: Any, pk: str) -> Response:
        managed_object = self.get_managed_object(pk)
        options = RenderOptions.from_params(request.GET)
        return self.respond(
            self.render_one(managed_object, options), MediaType.MANAGED_OBJECT, etag=True
        )

    def put(self, request: Any, pk: str) -> Response:
        managed_object = self.get_managed_object(pk)
        managed_object = services.managed_object_update(
            managed_object_id=managed_object.pk,
            data=self.request_object(),
            allow_owner=self.is_admin(),
            notify=self.notify,
            precondition=self.if_match(self.render_one),
        )
        return self.respond(
            lambda: self.render_one(managed_object), MediaType.MANAGED_OBJECT, etag=True
        )

    def delete(self, request: Any, pk: str) -> Response:
        managed_object = self.get_managed_object(pk)
        params = request.GET
        get_bool(params, "withDeviceUser")  # accepted, ignored (no device users in scope)
        services.managed_object_delete(
            managed_object=managed_object,
            cascade=get_bool(params, "cascade"),
            force_cascade=get_bool(params, "forceCascade"),
            notify=self.notify,
            precondition=self.if_match(self.render_one),
        )
        return self.no_content()


class ReferenceView(InventoryView):
    """Base of the child-reference resources; `relation` comes from the URL."""

    required_roles = {"GET": READ, "POST": ADMIN, "DELETE": ADMIN}
    owner_rule_methods = frozenset({"GET", "POST", "DELETE"})
    relation: Relation

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.relation = Relation(kwargs["relation"])
        super().initial(request, *args, **kwargs)

    def may_unassign(self, parent: ManagedObject, children: list[ManagedObject]) -> bool:
        """ADMIN, or owner of the parent, or owner of every child (auth.md §7)."""
        user = self.request.user
        return (
            self.is_admin()
            or is_owner(user, parent.owner)
            or (bool(children) and all(is_owner(user, child.owner) for child in children))
        )

    def references_body(self, parent: ManagedObject, children: list[ManagedObject]) -> list[Any]:
        parent_url = managed_object_url(self.base, parent.pk)
        segment = self.relation.children_segment
        return [
            reference_json(parent_url, segment, child_json)
            for child_json in self.render_many(children, RenderOptions())
        ]


class ReferenceCollectionView(ReferenceView):
    def get(self, request: Any, pk: str, relation: str) -> Response:
        parent = self.get_managed_object(pk)
        options = RenderOptions.from_params(request.GET)
        children = selectors.children_of(parent=parent, relation=self.relation)
        if request.GET.get("query"):
            parsed = parse_query(request.GET["query"])
            children = children.filter(parsed.filter)
            if parsed.order_by:
                children = children.order_by(*parsed.order_by)
        parent_url = managed_object_url(self.base, parent.pk)
        segment = self.relation.children_segment
        return self.respond(
            paginated(
                request,
                children,
                key="references",
                render=lambda rows: [
                    reference_json(parent_url, segment, child_json)
                    for child_json in self.render_many(rows, options)
                ],
            ),
            MediaType.MANAGED_OBJECT_REFERENCE_COLLECTION,
        )

    def post(self, request: Any, pk: str, relation: str) -> Response:
        parent = self.get_managed_object(pk)
        body = self.request_object()
        user = request.user
        collection_url = (
            f"{managed_object_url(self.base, parent.pk)}/{self.relation.children_segment}"
        )
        if "references" in body or "managedObject" in body:
            single = "references" not in body
            children = self._existing_children(
                [reference_target_id(body)] if single else references_list_ids(body)
            )
            if not self.is_admin() and not all(is_owner(user, c.owner) for c in children):
                raise PermissionDenied()
            services.managed_object_add_children(
                parent=parent, relation=self.relation, children=children, notify=self.notify
            )
        else:  # any other object: create a new managed object and add it (inventory.md §7.2)
            if not has_any_role(user, CREATE):
                raise PermissionDenied()
            single = True
            children = [
                services.managed_object_create_child(
                    parent=parent,
                    relation=self.relation,
                    owner=user.username,
                    data=body,
                    allow_owner=self.is_admin(),
                    notify=self.notify,
                )
            ]
        if single:
            child = children[0]
            return self.respond(
                lambda: self.references_body(parent, children)[0],
                MediaType.MANAGED_OBJECT_REFERENCE,
                status=201,
                location=f"{collection_url}/{child.pk}",
            )
        return self.respond(
            lambda: {"self": collection_url, "references": self.references_body(parent, children)},
            MediaType.MANAGED_OBJECT_REFERENCE_COLLECTION,
            status=201,
            location=collection_url,
        )

    def delete(self, request: Any, pk: str, relation: str) -> Response:
        parent = selectors.managed_object_get(pk=pk)
        body = self.request_object()
        child_ids = unique(references_list_ids(body))
        children = list(ManagedObject.objects.filter(pk__in=child_ids))
        if not self.may_unassign(parent, children):
            raise PermissionDenied()
        services.managed_object_remove_children(
            parent=parent, relation=self.relation, child_ids=child_ids, notify=self.notify
        )
        return self.no_content()

    def _existing_children(self, ids: list[int]) -> list[ManagedObject]:
        ids = unique(ids)
        existing = [child_id for child_id in ids if child_id <= MAX_ID]
        found = {mo.pk: mo for mo in ManagedObject.objects.filter(pk__in=existing)}
        for child_id in ids:
            if child_id not in found:
                raise services.managed_object_not_found(child_id)
        return [found[child_id] for child_id in ids]


class ReferenceDetailView(ReferenceView):
    def get(self, request: Any, pk: str, relation: str, child_pk: str) -> Response:
        parent = self.get_managed_object(pk)
        child = selectors.reference_get(parent=parent, relation=self.relation, child_pk=child_pk)
        options = RenderOptions.from_params(request.GET)
        child_json = self.render_many([child], options)[0]
        return self.respond(
            reference_json(
                managed_object_url(self.base, parent.pk), self.relation.children_segment, child_json
            ),
            MediaType.MANAGED_OBJECT_REFERENCE,
            etag=True,
        )

    def delete(self, request: Any, pk: str, relation: str, child_pk: str) -> Response:
        parent = selectors.managed_object_get(pk=pk)
        child = selectors.reference_get(parent=parent, relation=self.relation, child_pk=child_pk)
        if not self.may_unassign(parent, [child]):
            raise PermissionDenied()
        services.managed_object_remove_children(
            parent=parent,
            relation=self.relation,
            child_ids=[child.pk],
            strict=True,
            notify=self.notify,
        )
        return self.no_content()


class ParentCollectionView(InventoryView):
    """`GET .../{id}/deviceParents` (also assetParents, additionParents), inventory.md §7.6."""

    required_roles = {"GET": READ}
    owner_rule_methods = frozenset({"GET"})

    def get(self, request: Any, pk: str, relation: str) -> Response:
        child = self.get_managed_object(pk)
        options = RenderOptions.from_params(request.GET)
        parents = selectors.parents_of(child=child, relation=Relation(relation))
        child_url = managed_object_url(self.base, child.pk)
        segment = Relation(relation).parents_segment
        return self.respond(
            paginated(
                request,
                parents,
                key="references",
                render=lambda rows: [
                    reference_json(child_url, segment, parent_json)
                    for parent_json in self.render_many(rows, options)
                ],
            ),
            MediaType.MANAGED_OBJECT_REFERENCE_COLLECTION,
        )
