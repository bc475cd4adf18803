"""factory_boy factories for test data, built through the real services (STYLE.md §12).

`ManagedObjectFactory(owner=..., name=..., type=..., fragments={...})` goes through
`inventory.services.managed_object_create`, so flags and validation are the production ones;
`ExternalIdFactory` through `external_id_create`; `link()` adds references with
`managed_object_add_children`. `Clients` hands out Basic-auth API clients per user role."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import factory
from rest_framework.test import APIClient

from inventory import services
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation


class ManagedObjectFactory(factory.Factory):
    """A managed object. `fragments` are the extra top-level keys; `owner` is stored as given."""

    class Meta:
        model = ManagedObject

    owner = "admin"
    name = factory.Sequence(lambda n: f"Object {n}")
    type = None
    fragments = factory.Dict({})

    @classmethod
    def _create(cls, model_class: type[ManagedObject], *args: Any, **kwargs: Any) -> ManagedObject:
        owner = kwargs.pop("owner")
        data: dict[str, Any] = dict(kwargs.pop("fragments"))
        for key in ("name", "type"):
            value = kwargs.pop(key)
            if value is not None:
                data[key] = value
        data.update(kwargs)  # any other keyword is a fragment too
        return services.managed_object_create(owner=owner, data=data)


class DeviceFactory(ManagedObjectFactory):
    name = factory.Sequence(lambda n: f"Device {n}")
    type = "c8y_Linux"
    fragments = factory.Dict({"c8y_IsDevice": {}})


class AgentFactory(ManagedObjectFactory):
    name = factory.Sequence(lambda n: f"Agent {n}")
    type = "c8y_Agent"
    fragments = factory.Dict({"c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}})


class GroupFactory(ManagedObjectFactory):
    name = factory.Sequence(lambda n: f"Group {n}")
    type = "c8y_DeviceGroup"
    fragments = factory.Dict({"c8y_IsDeviceGroup": {}})


class ExternalIdFactory(factory.Factory):
    class Meta:
        model = ExternalId

    managed_object = factory.SubFactory(DeviceFactory)
    type = "c8y_Serial"
    external_id = factory.Sequence(lambda n: f"serial-{n}")

    @classmethod
    def _create(cls, model_class: type[ExternalId], *args: Any, **kwargs: Any) -> ExternalId:
        external_id, _ = services.external_id_create(**kwargs)
        return external_id


def link(
    parent: ManagedObject, *children: ManagedObject, relation: Relation = Relation.DEVICE
) -> list[ManagedObjectReference]:
    """Add `children` under `parent` in `relation` through the service."""
    return services.managed_object_add_children(
        parent=parent, relation=relation, children=list(children)
    )


# Clients that fail authentication, in every way auth.md §2 lists.
UNAUTHENTICATED = ["anon", "bad_password", "unknown_user", "foreign_tenant", "malformed_header"]


class Clients(dict):
    """API clients sending real Basic credentials, by name, each user created on first use.

    `roles` maps a name to the user's roles (the first name also backs the `bad_password` and
    `foreign_tenant` clients); the names in UNAUTHENTICATED give clients that fail authentication.
    Call `prepare(...)` before a row-count snapshot, since creating a user adds rows."""

    def __init__(
        self,
        make_user: Callable[..., Any],
        client_for: Callable[..., APIClient],
        roles: Mapping[str, Iterable[Any]],
        *,
        usernames: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.make_user = make_user
        self.client_for = client_for
        self.roles = roles
        self.usernames = usernames or {}
        self.users: dict[str, Any] = {}

    def user(self, name: str) -> Any:
        if name not in self.users:
            self.users[name] = self.make_user(self.usernames.get(name, name), self.roles[name])
        return self.users[name]

    def prepare(self, *names: str) -> None:
        for name in names:
            self[name]  # noqa: B018 (creates the client)

    def __missing__(self, name: str) -> APIClient:
        some_user = next(iter(self.roles))
        if name in self.roles:
            client = self.client_for(self.user(name))
        elif name == "anon":
            client = APIClient()
        elif name == "bad_password":
            client = self.client_for(self.user(some_user), password="wrong")
        elif name == "unknown_user":
            client = self.client_for(SimpleNamespace(username="ghost"))
        elif name == "foreign_tenant":
            client = self.client_for(self.user(some_user), tenant="t999")
        elif name == "malformed_header":
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION="Basic not-base64!")
        else:
            raise KeyError(name)
        self[name] = client
        return client
