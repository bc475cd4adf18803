"""Credentials are shown exactly once, even to polls that arrive together: real threads, each with
its own database connection, against committed data (transaction=True)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from devicecontrol import services
from devicecontrol.models import NewDeviceRequest
from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import Role
from deviceplatform.services import bootstrap_user_ensure
from tests.helpers import basic, run_together

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 6
CREDENTIALS = "/devicecontrol/deviceCredentials"


def accepted_request(device_id: str) -> None:
    services.new_device_request_create(device_id=device_id, owner="operator")
    services.device_credentials_poll(device_id=device_id, security_token=None)
    services.new_device_request_accept(device_id=device_id, status="ACCEPTED", accepted_by="op")


def test_concurrent_polls_over_http_give_exactly_one_password() -> None:
    bootstrap_user_ensure("bs-pw")
    accepted_request("race-1")

    def poll(_: int) -> tuple[int, dict[str, Any]]:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=basic("management/devicebootstrap", "bs-pw"))
        response = client.post(
            CREDENTIALS,
            json.dumps({"id": "race-1"}),
            content_type="application/json",
            HTTP_ACCEPT="application/json",
        )
        return response.status_code, response.json()

    results = run_together(poll, THREADS)

    assert not [result for result in results if isinstance(result, BaseException)], results
    statuses = Counter(status for status, _ in results)
    assert statuses == {201: 1, 404: THREADS - 1}
    [issued] = [body for status, body in results if status == 201]
    # Alike but for each request's own id.
    refusals = [
        {key: value for key, value in body.items() if key != "requestId"}
        for status, body in results
        if status == 404
    ]
    assert all(body == refusals[0] for body in refusals)
    assert User.objects.filter(username__iexact="device_race-1").count() == 1
    assert authenticate_credentials("device_race-1", issued["password"]) is not None
    assert NewDeviceRequest.objects.get().credentials_issued_at is not None


def test_concurrent_polls_of_the_service_issue_once() -> None:
    accepted_request("race-2")

    results = run_together(
        lambda _: services.device_credentials_poll(device_id="race-2", security_token=None),
        THREADS,
    )

    assert not [result for result in results if isinstance(result, BaseException)], results
    outcomes = Counter(outcome for outcome, _ in results)
    assert outcomes == {
        services.PollOutcome.ISSUED: 1,
        services.PollOutcome.ISSUED_BEFORE: THREADS - 1,
    }
    [credentials] = [creds for _, creds in results if creds is not None]
    assert authenticate_credentials("device_race-2", credentials.password) is not None


def test_concurrent_registrations_of_one_id_create_one_request(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    operator = make_user("operator", [Role.DEVICE_CONTROL_ADMIN])
    spellings = ["Same-ID", "same-id", "SAME-ID", "Same-Id", "same-ID", "sAME-id"]

    def register(index: int) -> tuple[int, str]:
        response = client_for(operator).post(
            "/devicecontrol/newDeviceRequests",
            json.dumps({"id": spellings[index]}),
            content_type="application/json",
            HTTP_ACCEPT="application/json",
        )
        return response.status_code, response.json().get("error", "")

    results = run_together(register, len(spellings))

    assert not [result for result in results if isinstance(result, BaseException)], results
    assert Counter(results) == {
        (201, ""): 1,
        (422, "devicecontrol/Non Unique Result"): len(spellings) - 1,
    }
    assert NewDeviceRequest.objects.count() == 1


def test_a_poll_and_a_delete_together_leave_no_half_state() -> None:
    """The delete and the issuing poll lock the same row: either the poll issued credentials
    before the row went, or it found nothing; never credentials for a row still there unmarked."""
    accepted_request("race-3")

    def work(index: int) -> Any:
        if index == 0:
            return services.new_device_request_delete(device_id="race-3")
        return services.device_credentials_poll(device_id="race-3", security_token=None)

    results = run_together(work, 2)

    assert not [result for result in results if isinstance(result, BaseException)], results
    outcome, credentials = results[1]
    assert not NewDeviceRequest.objects.exists()
    if outcome == services.PollOutcome.ISSUED:
        assert authenticate_credentials("device_race-3", credentials.password) is not None
    else:
        assert outcome == services.PollOutcome.UNKNOWN
        assert not User.objects.filter(username__iexact="device_race-3").exists()
