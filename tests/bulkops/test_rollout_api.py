"""Rollout rates, waves, pause and resume over REST (issue 14 items 2-4): bad input is a 422 that
writes nothing, POST .../pause and .../resume answer with the bulk operation and follow the bulk
roles, and a plain Cumulocity body is unaffected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bulkops.models import BulkOperation
from tests.bulkops.conftest import BULK, Fleet, advance, bulk_data, create_bulk, get_bulk, reload
from tests.devicecontrol.conftest import call
from tests.factories import Clients
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

INVALID = "devicecontrol/Invalid Data"
MEDIA = "application/vnd.com.nsn.cumulocity.bulkoperation+json"
EXPONENTIAL = {
    "baseRatePerMinute": 10,
    "incrementFactor": 2.0,
    "rateIncreaseCriteria": {"numberOfNotifiedDevices": 50},
}

BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("rollout config not an object", {"rolloutConfig": 5}, "rolloutConfig must be a JSON object"),
    ("empty rollout config", {"rolloutConfig": {}}, "must give maximumPerMinute or exponential"),
    ("unknown rollout key", {"rolloutConfig": {"perMinute": 5}}, "unknown key(s) perMinute"),
    ("zero maximum", {"rolloutConfig": {"maximumPerMinute": 0}}, "must be greater than 0"),
    ("negative maximum", {"rolloutConfig": {"maximumPerMinute": -5}}, "must be greater than 0"),
    ("text maximum", {"rolloutConfig": {"maximumPerMinute": "5"}}, "must be a number"),
    ("bool maximum", {"rolloutConfig": {"maximumPerMinute": True}}, "must be a number"),
    (
        "factor of 1",
        {"rolloutConfig": {"exponentialRate": {**EXPONENTIAL, "incrementFactor": 1}}},
        "incrementFactor must be greater than 1",
    ),
    (
        "no criteria",
        {"rolloutConfig": {"exponentialRate": {"baseRatePerMinute": 10, "incrementFactor": 2}}},
        "needs rateIncreaseCriteria",
    ),
    (
        "both criteria",
        {
            "rolloutConfig": {
                "exponentialRate": {
                    **EXPONENTIAL,
                    "rateIncreaseCriteria": {
                        "numberOfNotifiedDevices": 5,
                        "numberOfSucceededDevices": 5,
                    },
                }
            }
        },
        "exactly one of numberOfNotifiedDevices",
    ),
    (
        "unknown criterion",
        {
            "rolloutConfig": {
                "exponentialRate": {**EXPONENTIAL, "rateIncreaseCriteria": {"numberOfFoo": 5}}
            }
        },
        "unknown key(s) numberOfFoo",
    ),
    (
        "zero criterion",
        {
            "rolloutConfig": {
                "exponentialRate": {
                    **EXPONENTIAL,
                    "rateIncreaseCriteria": {"numberOfSucceededDevices": 0},
                }
            }
        },
        "must be a whole number",
    ),
    (
        "base above maximum",
        {"rolloutConfig": {"exponentialRate": EXPONENTIAL, "maximumPerMinute": 5}},
        "must not exceed rolloutConfig.maximumPerMinute",
    ),
    (
        "creation ramp conflicts",
        {"rolloutConfig": {"maximumPerMinute": 60}, "creationRamp": 5},
        "creationRamp conflicts with rolloutConfig",
    ),
    ("waves not a list", {"waves": {"size": 1}}, "waves must be a non-empty JSON array"),
    ("no waves", {"waves": []}, "waves must be a non-empty JSON array"),
    ("size and percentage", {"waves": [{"size": 1, "percentage": 100}]}, "exactly one of size"),
    ("neither", {"waves": [{"then": "PAUSE"}]}, "exactly one of size"),
    ("negative percentage", {"waves": [{"percentage": -5}]}, "must be greater than 0"),
    ("percentage over 100", {"waves": [{"percentage": 101}]}, "at most 100"),
    ("zero size", {"waves": [{"size": 0}, {"percentage": 100}]}, "size must be a whole number"),
    (
        "falling percentages",
        {"waves": [{"percentage": 50}, {"percentage": 25}, {"percentage": 100}]},
        "must be above the previous wave's",
    ),
    (
        "threshold over 100",
        {"waves": [{"percentage": 100, "successThreshold": 120}]},
        "successThreshold must be at least 0 and at most 100",
    ),
    (
        "negative threshold",
        {"waves": [{"percentage": 100, "successThreshold": -1}]},
        "successThreshold must be at least 0",
    ),
    ("unknown then", {"waves": [{"percentage": 100, "then": "STOP"}]}, "CONTINUE or PAUSE"),
    ("unknown wave key", {"waves": [{"percentage": 100, "gate": 1}]}, "unknown key(s) gate"),
    (
        "waves short of the fleet by percentage",
        {"waves": [{"size": 1}, {"percentage": 50}]},
        "waves cover 2 of the 3 target devices",
    ),
    ("waves short of the fleet by size", {"waves": [{"size": 2}]}, "cover 2 of the 3"),
]


@pytest.mark.parametrize(("label", "extra", "message"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_rollout_input_is_422_and_writes_nothing(
    bapi: Clients,
    fleet: Fleet,
    row_counts: Callable[[], dict[str, int]],
    label: str,
    extra: dict[str, Any],
    message: str,
) -> None:
    body = {**bulk_data(fleet.group, creationRamp=0), **extra}
    bapi.prepare("bulk_admin")
    before = row_counts()
    response = call(bapi["bulk_admin"], "POST", BULK, body, accept=MEDIA)
    error = assert_error(response, 422, INVALID)
    assert message in error["message"], error
    assert row_counts() == before


def test_create_with_rates_and_waves_echoes_them_with_the_rollout_state(
    bapi: Clients, fleet: Fleet
) -> None:
    body = bulk_data(fleet.group)
    del body["creationRamp"]  # a rolloutConfig replaces it
    body["rolloutConfig"] = {"exponentialRate": EXPONENTIAL, "maximumPerMinute": 1000}
    body["waves"] = [{"size": 1, "then": "PAUSE"}, {"percentage": 100, "successThreshold": 95}]
    response = call(bapi["bulk_admin"], "POST", BULK, body, accept=MEDIA)
    assert response.status_code == 201, response.content[:500]
    created = response.json()
    assert created["creationRamp"] == 0
    assert created["rolloutConfig"] == body["rolloutConfig"]
    assert created["waves"] == [
        {"size": 1, "successThreshold": 100, "then": "PAUSE"},
        {"percentage": 100, "successThreshold": 95, "then": "CONTINUE"},
    ]
    assert created["rollout"] == {"state": "RUNNING", "wave": 1, "currentRatePerMinute": 10}
    assert (created["status"], created["generalStatus"]) == ("ACTIVE", "SCHEDULED")
    assert not BulkOperation.objects.get(pk=created["id"]).fragments  # not kept twice
    assert get_bulk(bapi["bulk_reader"], created["id"]) == created


def test_a_zero_creation_ramp_goes_with_a_rollout_config(bapi: Clients, fleet: Fleet) -> None:
    body = {**bulk_data(fleet.group, creationRamp=0), "rolloutConfig": {"maximumPerMinute": 120}}
    response = call(bapi["bulk_admin"], "POST", BULK, body, accept=MEDIA)
    assert response.status_code == 201, response.content[:500]
    assert response.json()["rollout"]["currentRatePerMinute"] == 120


def test_pause_and_resume_over_rest(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    advance(0)
    admin = bapi["bulk_admin"]
    paused = call(admin, "POST", f"{BULK}/{bulk.pk}/pause", accept=MEDIA)
    assert paused.status_code == 200, paused.content[:500]
    assert paused["Content-Type"].startswith(MEDIA)
    body = paused.json()
    assert body["rollout"] == {
        "state": "PAUSED",
        "currentRatePerMinute": 0,
        "reason": "Paused by bulk_admin",
    }
    assert (body["status"], body["generalStatus"]) == ("IN_PROGRESS", "EXECUTING")
    assert reload(bulk).next_due_at is None
    assert_error(call(admin, "POST", f"{BULK}/{bulk.pk}/pause/", accept=MEDIA), 422, INVALID)
    resumed = call(admin, "POST", f"{BULK}/{bulk.pk}/resume/", accept=MEDIA)
    assert resumed.status_code == 200, resumed.content[:500]
    assert resumed.json()["rollout"] == {"state": "RUNNING", "currentRatePerMinute": 60}
    assert reload(bulk).next_due_at is not None
    assert_error(call(admin, "POST", f"{BULK}/{bulk.pk}/resume", accept=MEDIA), 422, INVALID)


def test_pause_without_accept_answers_200_without_a_body(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    response = call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/pause")
    assert response.status_code == 200
    assert reload(bulk).rollout_state == "PAUSED"


EXPECTED = {"bulk_admin": 200, "bulk_reader": 403, "alice": 403, "inv_admin": 403, "nobody": 403}


@pytest.mark.parametrize("action", ["pause", "resume"])
@pytest.mark.parametrize("who", [*EXPECTED, "anon", "bad_password", "foreign_tenant"])
def test_role_matrix(
    bapi: Clients,
    fleet: Fleet,
    row_counts: Callable[[], dict[str, int]],
    action: str,
    who: str,
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    if action == "resume":
        call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/pause")
    client = bapi[who]  # creates its user (if any) before the snapshot
    state = reload(bulk).rollout_state
    before = row_counts()
    response = call(client, "POST", f"{BULK}/{bulk.pk}/{action}", accept=MEDIA)
    expected = EXPECTED.get(who, 401)
    if expected >= 400:
        assert_error(
            response, expected, "security/Forbidden" if expected == 403 else "security/Unauthorized"
        )
        assert row_counts() == before
        assert reload(bulk).rollout_state == state
    else:
        assert response.status_code == 200, response.content[:500]


@pytest.mark.parametrize("action", ["pause", "resume"])
@pytest.mark.parametrize("pk", ["987654321", "abc"])
def test_unknown_id_is_404(
    bapi: Clients, row_counts: Callable[[], dict[str, int]], action: str, pk: str
) -> None:
    bapi.prepare("bulk_admin")
    before = row_counts()
    response = call(bapi["bulk_admin"], "POST", f"{BULK}/{pk}/{action}", accept=MEDIA)
    assert_error(response, 404, "devicecontrol/Not Found")
    assert row_counts() == before


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_pause_are_405(bapi: Clients, fleet: Fleet, method: str) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    response = call(bapi["bulk_admin"], method, f"{BULK}/{bulk.pk}/pause", accept=MEDIA)
    assert response.status_code in (403, 405), response.content[:300]
    assert reload(bulk).rollout_state is None


def test_pause_of_a_completed_bulk_operation_is_422(
    bapi: Clients, fleet: Fleet, row_counts: Callable[[], dict[str, int]]
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    bapi.prepare("bulk_admin")
    before = row_counts()
    response = call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/pause", accept=MEDIA)
    error = assert_error(response, 422, INVALID)
    assert "is COMPLETED" in error["message"]
    assert row_counts() == before
    assert reload(bulk).rollout_state is None


def test_a_put_back_of_a_rollout_bulk_operation_is_accepted(bapi: Clients, fleet: Fleet) -> None:
    body = {**bulk_data(fleet.group, creationRamp=0), "rolloutConfig": {"maximumPerMinute": 6}}
    created = call(bapi["bulk_admin"], "POST", BULK, body, accept=MEDIA).json()
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{created['id']}", created, accept=MEDIA)
    assert response.status_code == 200, response.content[:500]
    changed = {**created, "rolloutConfig": {"maximumPerMinute": 7}}
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{created['id']}", changed, accept=MEDIA)
    assert "cannot be changed" in assert_error(response, 422, INVALID)["message"]


def test_the_plain_contract_is_unchanged(bapi: Clients, fleet: Fleet) -> None:
    """A plain Cumulocity body still needs creationRamp and gets no extension keys."""
    body = bulk_data(fleet.group)
    del body["creationRamp"]
    assert_error(call(bapi["bulk_admin"], "POST", BULK, body, accept=MEDIA), 422)
    created = call(bapi["bulk_admin"], "POST", BULK, bulk_data(fleet.group), accept=MEDIA).json()
    assert not {"rolloutConfig", "waves", "rollout"} & set(created)


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ("<a/>", "text/plain", 415),
        ("[]", "application/json", 422),
        ('"pause"', "application/json", 422),
    ],
)
@pytest.mark.parametrize("action", ["pause", "resume"])
def test_a_bad_body_on_pause_or_resume_is_refused_and_changes_nothing(
    bapi: Clients, fleet: Fleet, raw: str, content_type: str, status: int, action: str
) -> None:
    """The actions read no body, but a malformed one is still an error, before anything."""
    bulk = create_bulk(fleet.group, creationRamp=1)
    advance(0)
    if action == "resume":
        assert call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/pause").status_code == 200
    before = reload(bulk).rollout_state
    response = call(
        bapi["bulk_admin"],
        "POST",
        f"{BULK}/{bulk.pk}/{action}",
        raw=raw,
        content_type=content_type,
    )
    assert_error(response, status)
    assert reload(bulk).rollout_state == before
    # An empty JSON object is accepted and ignored.
    ok = call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/{action}", {})
    assert ok.status_code == 200, ok.content[:300]
