"""Property-based API test (Schemathesis) against the live server: for every operation of the
OpenAPI description, requests generated from it (parameters, headers and bodies, valid and not) get
no 5xx, only described status codes and content types, and bodies and headers as described.

Bounded and reproducible: FUZZ_EXAMPLES examples per operation and mode (default 5: about 40 s,
so it runs in the normal suite), derandomized; a third pass aims the path parameters at real
objects. Raise FUZZ_EXAMPLES for a longer hunt (30: ~4,500 requests in about 3 minutes)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deviceplatform.api.openapi_views import schema_document
from tests.helpers import PASSWORD

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

schema = schemathesis.openapi.from_dict(schema_document())


@dataclass
class World:
    auth: tuple[str, str]
    known: dict[str, dict[str, str]]  # path template prefix -> path parameters of real objects

    def path_parameters(self, path: str) -> dict[str, str] | None:
        for prefix, parameters in self.known.items():
            if path.startswith(prefix):
                return {k: v for k, v in parameters.items() if "{" + k + "}" in path} or None
        return None


@pytest.fixture
def fuzz_world(
    make_user: Callable[..., Any], client_for: Callable[..., Any], settings: Any
) -> World:
    """An admin, one object of each kind for generated requests to hit, no failed-login limit
    (generated realtime handshakes carry random tokens) and short operation waits."""
    settings.AUTH_FAILURES_PER_USER = 10**9
    settings.AUTH_FAILURES_PER_ADDRESS = 10**9
    settings.OPERATION_MAX_WAIT_SECONDS = 1
    api = client_for(make_user("admin", groups=["admins"]))

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = api.post(path, body, format="json", HTTP_ACCEPT="application/json")
        assert response.status_code == 201, response.content
        return response.json()

    agent = post(
        "/inventory/managedObjects", {"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}}
    )
    device = post("/inventory/managedObjects", {"c8y_IsDevice": {}, "name": "d"})
    group = post("/inventory/managedObjects", {"c8y_IsDeviceGroup": {}, "name": "g"})
    mo = "/inventory/managedObjects/"
    post(f"{mo}{agent['id']}/childDevices", {"managedObject": {"id": device["id"]}})
    post(f"{mo}{group['id']}/childAssets", {"managedObject": {"id": device["id"]}})
    post(
        f"/identity/globalIds/{device['id']}/externalIds",
        {"externalId": "SN-1", "type": "c8y_Serial"},
    )
    operation = post("/devicecontrol/operations", {"deviceId": device["id"], "c8y_Restart": {}})
    bulk = post(
        "/devicecontrol/bulkoperations",
        {
            "groupId": group["id"],
            "startDate": "2030-01-01T00:00:00Z",
            "creationRamp": 1,
            "operationPrototype": {"c8y_Restart": {}},
        },
    )
    post("/devicecontrol/newDeviceRequests", {"id": "SN-2"})
    return World(
        auth=("t100/admin", PASSWORD),
        known={
            f"{mo}{{id}}/child": {"id": agent["id"], "childId": device["id"]},
            f"{mo}{{id}}/": {"id": device["id"]},
            f"{mo}{{id}}": {"id": agent["id"]},
            "/identity/globalIds/": {"id": device["id"]},
            "/identity/externalIds/": {"type": "c8y_Serial", "externalId": "SN-1"},
            "/devicecontrol/operations/": {"id": operation["id"]},
            "/devicecontrol/bulkoperations/": {"id": bulk["id"]},
            "/devicecontrol/newDeviceRequests/": {"id": "SN-2"},
        },
    )


@pytest.mark.django_db(transaction=True)
def test_generated_requests_get_described_answers(live_server: Any, fuzz_world: World) -> None:
    """Every operation in one test (one database flush, not one per operation): positive and
    negative examples, failures collected and reported together."""
    failures: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        known = fuzz_world.path_parameters(operation.path)
        # A DOWN readiness check is a described 503, not a server error.
        checks = CHECKS[1:] if operation.path == "/health/ready" else CHECKS
        for mode, path_parameters in [
            (GenerationMode.POSITIVE, None),
            (GenerationMode.NEGATIVE, None),
            *([(GenerationMode.POSITIVE, known)] if known else []),
        ]:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            def run(case: Any) -> None:
                # run() is called right below, within this iteration: `checks` is current.
                response = case.call_and_validate(
                    base_url=live_server.url,
                    auth=fuzz_world.auth,
                    checks=checks,  # noqa: B023
                    timeout=30,
                )
                statuses[response.status_code] += 1

            try:
                run()
            except Unsatisfiable:  # nothing to break in a request without parameters or body
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as failure:  # reported together below
                label = (
                    f"{operation.label} ({mode.value}{', known IDs' if path_parameters else ''})"
                )
                failures[label] = str(failure)[:3000]
            ran += 1
    assert ran >= 2 * 40
    print(f"fuzz: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    assert statuses[200] + statuses[201] > 0  # both sides were reached
    assert statuses[422] > 0
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
