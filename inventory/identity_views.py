"""Identity REST resources (spec identity.md): external IDs bound to managed objects."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response

from deviceplatform.api.media_types import MediaType
from deviceplatform.api.pagination import paginated
from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.api.views import CumulocityView
from deviceplatform.roles import Role
from inventory import selectors, services
from inventory.models import ExternalId
from inventory.serializers import external_id_json, external_id_url, identity_api_json

READ = frozenset({Role.IDENTITY_READ})
ADMIN = frozenset({Role.IDENTITY_ADMIN})


class IdentityView(CumulocityView):
    """Base of the identity resources."""


class IdentityApiView(IdentityView):
    required_roles = {"GET": READ}

    def get(self, request: Any) -> Response:
        return self.respond(identity_api_json(self.base), MediaType.IDENTITY_API)


class ExternalIdCollectionView(IdentityView):
    """`/identity/globalIds/{id}/externalIds`: list and create the IDs of one managed object."""

    required_roles = {"GET": READ, "POST": ADMIN}
    owner_rule_methods = frozenset({"GET", "POST"})

    def get(self, request: Any, pk: str) -> Response:
        managed_object = selectors.managed_object_get(pk=pk)
        self.check_object_permissions(request, managed_object)
        base = self.base
        return self.respond(
            paginated(
                request,
                selectors.external_ids_of(managed_object=managed_object),
                key="externalIds",
                render=lambda rows: [external_id_json(row, base=base) for row in rows],
            ),
            MediaType.EXTERNAL_ID_COLLECTION,
        )

    def post(self, request: Any, pk: str) -> Response:
        managed_object = selectors.managed_object_get(pk=pk)
        self.check_object_permissions(request, managed_object)
        body = self.request_object()
        try:
            external_id, _ = services.external_id_create(
                managed_object=managed_object,
                type=body.get("type"),  # type: ignore[arg-type]
                external_id=body.get("externalId"),  # type: ignore[arg-type]
            )
        except services.ExternalIdTaken as taken:
            # The object it is bound to, only for a caller who could read the binding anyway.
            if has_any_role(request.user, READ) or is_owner(
                request.user, taken.bound.managed_object.owner
            ):
                raise taken.naming_the_object() from None
            raise
        return self.respond(
            lambda: external_id_json(external_id, base=self.base),
            MediaType.EXTERNAL_ID,
            etag=True,
            status=201,
            location=external_id_url(self.base, external_id.type, external_id.external_id),
        )


class ExternalIdDetailView(IdentityView):
    """`/identity/externalIds/{type}/{externalId}`; the owner is the bound object's owner."""

    required_roles = {"GET": READ, "DELETE": ADMIN}
    owner_rule_methods = frozenset({"GET", "DELETE"})

    def owner_of(self, obj: ExternalId) -> str | None:
        return obj.managed_object.owner

    def get_external_id(self, type: str, external_id: str) -> ExternalId:
        found = selectors.external_id_get(type=type, external_id=external_id)
        self.check_object_permissions(self.request, found)
        return found

    def get(self, request: Any, type: str, external_id: str) -> Response:
        found = self.get_external_id(type, external_id)
        return self.respond(
            external_id_json(found, base=self.base), MediaType.EXTERNAL_ID, etag=True
        )

    def delete(self, request: Any, type: str, external_id: str) -> Response:
        services.external_id_delete(
            external_id=self.get_external_id(type, external_id),
            precondition=self.if_match(lambda row: external_id_json(row, base=self.base)),
        )
        return self.no_content()
