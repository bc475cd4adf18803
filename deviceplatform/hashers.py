"""A cheap password hasher for machine-generated device passwords only.

Key stretching (PBKDF2's 1,000,000 iterations, ~0.2 s of CPU per check) makes guessing a
*human-chosen* password from a stolen hash slow. A device password from
`deviceplatform.services.generate_password` is 192 random bits: even at 10^12 guesses a second
against a single salted HMAC-SHA256, finding it would take ~10^38 years, so stretching adds no
safety there and costs a fleet's restart tens of minutes of CPU (README, "Device users").

The hasher is listed in PASSWORD_HASHERS after the default (so `set_password`, the admin, CSV
imports and `createuser` keep PBKDF2) and only used explicitly, through `device_password_hash`,
for passwords the platform generated itself. `User.check_password` keeps a device hash a device
hash (Django would otherwise re-hash it with the preferred hasher on the first login)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from django.contrib.auth.hashers import BasePasswordHasher, make_password, mask_hash
from django.utils.crypto import constant_time_compare
from django.utils.translation import gettext_noop as _

DEVICE_ALGORITHM = "device_hmac_sha256"
# generate_password() gives 32 URL-safe characters (192 bits); refuse anything shorter, so that
# a person's or an operator's password can never end up behind the fast hash by mistake.
MIN_GENERATED_LENGTH = 32


class DevicePasswordHasher(BasePasswordHasher):
    """`device_hmac_sha256$<salt>$<hex HMAC-SHA256(key=salt, password)>`: one HMAC per check."""

    algorithm = DEVICE_ALGORITHM

    def encode(self, password: str, salt: str) -> str:
        self._check_encode_args(password, salt)
        digest = hmac.new(salt.encode(), password.encode(), hashlib.sha256).hexdigest()
        return f"{self.algorithm}${salt}${digest}"

    def decode(self, encoded: str) -> dict[str, Any]:
        algorithm, salt, digest = encoded.split("$", 2)
        assert algorithm == self.algorithm
        return {"algorithm": algorithm, "hash": digest, "salt": salt}

    def verify(self, password: str, encoded: str) -> bool:
        try:
            decoded = self.decode(encoded)
        except (ValueError, AssertionError):
            return False
        return constant_time_compare(encoded, self.encode(password, decoded["salt"]))

    def safe_summary(self, encoded: str) -> dict[str, Any]:
        decoded = self.decode(encoded)
        return {
            _("algorithm"): decoded["algorithm"],
            _("salt"): mask_hash(decoded["salt"], show=2),
            _("hash"): mask_hash(decoded["hash"]),
        }

    def must_update(self, encoded: str) -> bool:
        return False

    def harden_runtime(self, password: str, encoded: str) -> None:
        pass


def is_device_hash(encoded: str | None) -> bool:
    """Whether a stored password is a device hash."""
    return bool(encoded) and encoded.startswith(DEVICE_ALGORITHM + "$")


def device_password_hash(password: str) -> str:
    """The stored form of a password the platform generated (`generate_password`): the fast
    device hash. Raises ValueError for anything shorter than a generated password."""
    if len(password) < MIN_GENERATED_LENGTH:
        raise ValueError("only generated device passwords may use the device hasher")
    return make_password(password, hasher=DEVICE_ALGORITHM)
