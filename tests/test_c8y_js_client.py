"""End to end with the official JavaScript client `@c8y/client` (pinned in tests/js/package.json)
against a live server: device onboarding (`deviceRegistration`, `deviceRegistrationBulk`) and
`inventory.count`, run by Node from tests/js/onboarding.cjs, unchanged client code.

Node and npm are required (CI installs them, .ci/run); the client is installed into
tests/js/node_modules with `npm ci` on first use."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from deviceplatform.services import bootstrap_user_ensure, user_upsert
from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)

JS_DIR = Path(__file__).parent / "js"
BOOTSTRAP_PASSWORD = "bootstrap-secret-for-the-js-test"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/js with @c8y/client installed (one `npm ci` per checkout, under a lock for xdist)."""
    npm = shutil.which("npm")
    if not (shutil.which("node") and npm):
        pytest.fail("Node.js and npm run the @c8y/client tests: apt-get install nodejs npm")
    with open(JS_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (JS_DIR / "node_modules" / "@c8y" / "client" / "package.json").exists():
            subprocess.run(
                [npm, "ci", "--silent", "--no-audit", "--no-fund"],
                cwd=JS_DIR,
                check=True,
                timeout=300,
            )
    return JS_DIR


def run_node(script: Path, env: dict[str, str]) -> dict[str, Any]:
    completed = subprocess.run(
        ["node", script.name],
        cwd=script.parent,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_js_client_onboards_a_device_and_counts(live_server: Any, node_client: Path) -> None:
    user_upsert(username="admin", password=PASSWORD, groups=["admins"])
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)

    result = run_node(
        node_client / "onboarding.cjs",
        {
            "PLATFORM_URL": live_server.url,
            "TENANT": settings.C8Y_TENANT_ID,
            "ADMIN_USER": "admin",
            "ADMIN_PASSWORD": PASSWORD,
            "BOOTSTRAP_PASSWORD": BOOTSTRAP_PASSWORD,
            "SERIAL": "js-4711",
        },
    )

    assert result["countBefore"] == 0
    assert result["created"]["status"] == 201
    assert result["created"]["body"]["id"] == "js-4711"
    assert result["created"]["body"]["status"] == "WAITING_FOR_CONNECTION"
    assert result["firstPoll"] == 404
    assert result["afterPoll"] == "PENDING_ACCEPTANCE"
    assert result["accepted"]["status"] == 200
    assert result["accepted"]["body"]["status"] == "ACCEPTED"
    assert result["credentialsStatus"] == 201
    assert {"tenantId", "username", "password"} <= set(result["credentialKeys"])
    assert result["username"] == "device_js-4711"
    assert result["tenantId"] == settings.C8Y_TENANT_ID
    assert result["secondPoll"] == 404
    assert result["deviceCreate"] == {"status": 201, "owner": "device_js-4711"}

    bulk = result["bulk"]
    assert bulk["status"] == 201
    assert bulk["body"]["numberOfAll"] == 2
    assert bulk["body"]["numberOfSuccessful"] == 1
    assert bulk["body"]["numberOfFailed"] == 1
    assert [row["deviceId"] for row in bulk["body"]["credentialUpdatedList"]] == ["js-4711-b1"]
    assert "nope" not in json.dumps(bulk["body"])  # a password is never echoed back

    assert ["js-4711", "ACCEPTED"] in result["listed"]
    # The device the agent made, and the one the CSV row with TYPE and NAME made.
    assert result["countAfter"] == 2
    assert result["afterDelete"] == 404
