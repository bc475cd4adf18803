"""Bulk registration (`POST /devicecontrol/bulkNewDeviceRequests`): a CSV of device ids and
passwords, each row provisioned in its own transaction, per-row results, and whole-file refusals
that write nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BULK = "/devicecontrol/bulkNewDeviceRequests"
VENDOR = "application/vnd.com.nsn.cumulocity."


@pytest.fixture
def operator(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("operator", [Role.DEVICE_CONTROL_ADMIN]))


def upload(client: APIClient, content: bytes | str, *, name: str = "devices.csv") -> Any:
    raw = content.encode() if isinstance(content, str) else content
    return client.post(
        BULK,
        {"file": SimpleUploadedFile(name, raw, content_type="text/csv")},
        format="multipart",
        HTTP_ACCEPT=f"{VENDOR}bulkNewDeviceRequest+json",
    )


def results(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.content[:500]
    assert response["Content-Type"].startswith(f"{VENDOR}bulknewdevicerequest+json")
    return response.json()


def device_of(external_id: str, id_type: str = "c8y_Serial") -> ManagedObject:
    return ExternalId.objects.get(type=id_type, external_id=external_id).managed_object


def groups_of(device: ManagedObject) -> list[str]:
    return list(
        ManagedObjectReference.objects.filter(child=device, relation="asset").values_list(
            "parent__name", flat=True
        )
    )


def test_full_rows_create_users_devices_external_ids_and_groups(operator: APIClient) -> None:
    body = results(
        upload(
            operator,
            "ID;CREDENTIALS;TYPE;NAME;IDTYPE;PATH;ICCID;SHELL\n"
            "sn-001;first-secret-1;c8y_Linux;Pump 1;;Plant A/Hall 3;8949000001;1\n"
            "sn-002;second-secret;c8y_Linux;Pump 2;c8y_IMEI;Plant A/Hall 3;;0\n"
            "sn-003;third-secret;;;;;;\n",
        )
    )

    assert body["numberOfAll"] == 3
    assert body["numberOfCreated"] == 3
    assert body["numberOfSuccessful"] == 3
    assert body["numberOfFailed"] == 0
    assert body["failedCreationList"] == []
    assert body["credentialUpdatedList"] == [
        {"bulkNewDeviceStatus": "CREATED", "deviceId": "sn-001"},
        {"bulkNewDeviceStatus": "CREATED", "deviceId": "sn-002"},
        {"bulkNewDeviceStatus": "CREATED", "deviceId": "sn-003"},
    ]
    for device_id, password in (
        ("sn-001", "first-secret-1"),
        ("sn-002", "second-secret"),
        ("sn-003", "third-secret"),
    ):
        user = User.objects.get(username=f"device_{device_id}")
        assert list(user.groups.values_list("name", flat=True)) == ["devices"]
        assert authenticate_credentials(user.username, password) is not None

    pump = device_of("sn-001")
    assert (pump.name, pump.type, pump.owner) == ("Pump 1", "c8y_Linux", "device_sn-001")
    assert pump.is_device
    assert pump.fragments["c8y_Mobile"] == {"iccid": "8949000001"}
    assert pump.fragments["c8y_SupportedOperations"] == ["c8y_Command"]
    second = device_of("sn-002", "c8y_IMEI")
    assert "c8y_Mobile" not in second.fragments
    assert "c8y_SupportedOperations" not in second.fragments
    assert groups_of(pump) == groups_of(second) == ["Hall 3"]
    hall = ManagedObject.objects.get(name="Hall 3")
    plant = ManagedObject.objects.get(name="Plant A")
    assert hall.is_group
    assert plant.is_group
    assert hall.owner == plant.owner == "operator"
    assert groups_of(hall) == ["Plant A"]
    assert not ExternalId.objects.filter(external_id="sn-003").exists()  # no TYPE and NAME
    assert ManagedObject.objects.count() == 4  # two devices, two groups


def test_uploading_again_updates_credentials_and_reuses_devices_and_groups(
    operator: APIClient,
) -> None:
    results(upload(operator, "ID;CREDENTIALS;TYPE;NAME;PATH\nsn-9;password-one;t;Dev 9;G1/G2\n"))
    objects = ManagedObject.objects.count()

    body = results(
        upload(operator, "ID;CREDENTIALS;TYPE;NAME;PATH\nsn-9;password-two;t;Dev 9;G1/G2\n")
    )

    assert body["credentialUpdatedList"] == [
        {"bulkNewDeviceStatus": "CREDENTIAL_UPDATED", "deviceId": "sn-9"}
    ]
    assert body["numberOfCreated"] == 0
    assert body["numberOfSuccessful"] == 1
    assert ManagedObject.objects.count() == objects  # same device, same groups
    assert authenticate_credentials("device_sn-9", "password-two") is not None
    assert authenticate_credentials("device_sn-9", "password-one") is None


@pytest.mark.parametrize(
    ("content", "ids"),
    [
        ("ID,CREDENTIALS,NAME,TYPE\ncomma-1,password-1,Dev,t\n", ["comma-1"]),
        ("ID\tCREDENTIALS\ntab-1\tpassword-1\ntab-2\tpassword-2\n", ["tab-1", "tab-2"]),
        ("\ufeffid;credentials\r\nbom-1;password-1\r\n", ["bom-1"]),  # BOM, CRLF, any case
        ('"ID";"CREDENTIALS"\n"q-1";"pass;word;1"\n', ["q-1"]),  # quoted, separator inside
        ("\n\nID;CREDENTIALS;EXTRA\n\nblank-1;password-1;x\n\n", ["blank-1"]),
    ],
)
def test_separators_and_shapes(operator: APIClient, content: str, ids: list[str]) -> None:
    body = results(upload(operator, content))
    assert [item["deviceId"] for item in body["credentialUpdatedList"]] == ids
    assert body["failedCreationList"] == []
    if ids == ["q-1"]:
        assert authenticate_credentials("device_q-1", "pass;word;1") is not None


def test_bad_rows_fail_alone_and_valid_rows_are_provisioned(
    operator: APIClient, make_user: Callable[..., Any]
) -> None:
    make_user("device_person", [Role.INVENTORY_READ])
    person_hash = User.objects.get(username="device_person").password
    content = (
        "ID;CREDENTIALS;TYPE;NAME;PATH;SHELL\n"
        "ok-1;good-password-1;t;Dev 1;;\n"  # line 2
        "short;pw;;;;\n"
        ";no-id-password;;;;\n"
        "has space;good-password;;;;\n"
        "half;good-password;t;;;\n"
        "shell;good-password;t;Dev;;maybe\n"
        "path-only;good-password;;;G;\n"
        "person;good-password;;;;\n"
        "fields;secret-in-a-bad-row;t\n"
        "ok-1;another-password;;;;\n"  # line 11: the ID again
        f"late;late-password;t;Late;{'x' * 1025};\n"  # fails at the group, after the device
        "ok-2;good-password-2;;;;\n"
    )

    response = upload(operator, content)

    body = results(response)
    assert body["numberOfAll"] == 12
    assert body["numberOfSuccessful"] == 2
    assert body["numberOfCreated"] == 2
    assert body["numberOfFailed"] == 10
    assert [item["deviceId"] for item in body["credentialUpdatedList"]] == ["ok-1", "ok-2"]
    failed = {item["lineNumber"]: item for item in body["failedCreationList"]}
    assert sorted(failed) == list(range(3, 13))
    reasons = {number: item["failureReason"] for number, item in failed.items()}
    assert "at least 8 characters" in reasons[3]
    assert "Invalid value for ID" in reasons[4]
    assert "whitespace" in reasons[5]
    assert "TYPE and NAME go together" in reasons[6]
    assert "SHELL" in reasons[7]
    assert "give TYPE and NAME too" in reasons[8]
    assert "device_person exists and is not a device user" in reasons[9]
    assert "Expected 6 fields" in reasons[10]
    assert "line 2 already" in reasons[11]
    assert "at most 1024 characters" in reasons[12]
    assert all(item["bulkNewDeviceStatus"] == "FAILED" for item in failed.values())
    assert failed[3]["line"] == "short;******;;;;"
    assert failed[10]["line"] == "fields;******;******"
    assert failed[10]["deviceId"] == "fields"
    for secret in ("good-password", "secret-in-a-bad-row", "another-password", "late-password"):
        assert secret not in response.content.decode()

    # The valid rows are there; nothing of a failed row is, not even of the one that failed last.
    assert authenticate_credentials("device_ok-1", "good-password-1") is not None
    assert authenticate_credentials("device_ok-2", "good-password-2") is not None
    assert set(
        User.objects.filter(username__startswith="device_").values_list("username", flat=True)
    ) == {
        "device_ok-1",
        "device_ok-2",
        "device_person",
    }
    assert User.objects.get(username="device_person").password == person_hash
    assert list(ExternalId.objects.values_list("external_id", flat=True)) == ["ok-1"]
    assert list(ManagedObject.objects.values_list("name", flat=True)) == ["Dev 1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "The file is empty"),
        (b"\n \n", "The file is empty"),
        (b"SERIAL;CREDENTIALS\nx;password-1\n", "no ID column"),
        (b"ID;NAME\nx;y\n", "no CREDENTIALS column"),
        (b"ID;CREDENTIALS\n", "no device rows"),
        (b"ID;CREDENTIALS;ID\nx;password-1;y\n", "names column ID more than once"),
        (b"ID;CREDENTIALS\nx;\xff\xfepassword\n", "not a CSV in UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV in UTF-8"),
        (b"ID;CREDENTIALS\nx\x00;password-1\n", "NUL"),
        (b"ID;CREDENTIALS\n" + b"r;password-1\n" * 4, "more than 3 device rows"),
    ],
)
def test_files_that_are_no_device_csv_are_refused_whole(
    operator: APIClient,
    row_counts: Callable[[], dict[str, int]],
    settings: Any,
    content: bytes,
    message: str,
) -> None:
    settings.BULK_NEW_DEVICE_MAX_ROWS = 3
    before = row_counts()
    body = assert_error(upload(operator, content), 422, "devicecontrol/Invalid Data")
    assert message in body["message"]
    assert row_counts() == before


def test_requests_that_carry_no_csv_file_are_refused(
    operator: APIClient, row_counts: Callable[[], dict[str, int]], settings: Any
) -> None:
    before = row_counts()
    no_file = operator.post(BULK, {"other": "x"}, format="multipart")
    assert "part named 'file'" in assert_error(no_file, 422)["message"]
    as_json = operator.post(BULK, {"file": "ID;CREDENTIALS"}, format="json")
    assert_error(as_json, 415, "general/unsupportedMediaType")
    as_text = operator.generic("POST", BULK, "ID;CREDENTIALS\n", content_type="text/csv")
    assert_error(as_text, 415)
    broken = operator.generic(
        "POST", BULK, b"--xx\r\nnot a part", content_type="multipart/form-data; boundary=xx"
    )
    assert "part named 'file'" in assert_error(broken, 422)["message"]  # no part could be read
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2000
    too_large = upload(operator, "ID;CREDENTIALS\n" + "some-device;password-1\n" * 200)
    assert_error(too_large, 413)
    assert row_counts() == before
