"""Users and the Cumulocity roles, stored as Django permissions so groups can grant them."""

from django.contrib.auth.hashers import acheck_password, check_password
from django.contrib.auth.models import AbstractUser, UserManager
from django.db import models
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.db.models.functions import Lower

from deviceplatform.hashers import DEVICE_ALGORITHM, is_device_hash
from deviceplatform.roles import ROLE_DESCRIPTIONS


class CaseInsensitiveUserManager(UserManager["User"]):
    def get_by_natural_key(self, username: str | None) -> "User":
        # Cumulocity usernames log in case-insensitively (auth.md §2).
        return self.get(username__iexact=username)


class User(AbstractUser):
    """A platform user. `username` is stored without a tenant prefix and matched case-insensitively."""

    objects = CaseInsensitiveUserManager()

    # When the user last authenticated a request (REST or realtime), written at most once per
    # AUTH_LAST_REQUEST_INTERVAL_SECONDS; `last_login` is when a password was last checked.
    last_request_at = models.DateTimeField("last request", null=True, blank=True, editable=False)

    # A device hash (a generated password, deviceplatform/hashers.py) stays one: Django re-hashes
    # a correct password whose algorithm is not the preferred (first) hasher, which would turn it
    # into PBKDF2 on the first login. Every other hash upgrades as Django does it.
    def check_password(self, raw_password: str) -> bool:
        if not is_device_hash(self.password):
            return super().check_password(raw_password)
        return check_password(raw_password, self.password, preferred=DEVICE_ALGORITHM)

    async def acheck_password(self, raw_password: str) -> bool:
        if not is_device_hash(self.password):
            return await super().acheck_password(raw_password)
        return await acheck_password(raw_password, self.password, preferred=DEVICE_ALGORITHM)

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        constraints = [
            models.UniqueConstraint(Lower("username"), name="user_username_ci_unique"),
        ]


# The built-in group of device agents (roles.DEFAULT_GROUPS); its members are the device users.
DEVICES_GROUP = "devices"


def device_user_condition() -> Q:
    """Which users are device users: members of `devices` that are neither staff nor superusers
    (the accounts `device_user_provision` may hand to a device). Everyone else is a person, the
    device bootstrap login included."""
    member = User.groups.through.objects.filter(user_id=OuterRef("pk"), group__name=DEVICES_GROUP)
    return Q(Exists(member), is_staff=False, is_superuser=False)


class DeviceUserManager(CaseInsensitiveUserManager):
    use_in_migrations = False

    def get_queryset(self) -> QuerySet["DeviceUser"]:
        return super().get_queryset().filter(device_user_condition())


class DeviceUser(User):
    """A user a device (or agent) logs in as: one of the `devices` group, created by onboarding,
    `manage.py createuser NAME --groups devices` or a bulk registration. The same rows as `User`,
    listed apart from people in the admin, where they are revoked, restored and rotated."""

    objects = DeviceUserManager()

    class Meta:
        proxy = True
        verbose_name = "device user"
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username


class CumulocityRole(models.Model):
    """Not a table: the holder of one Django permission per Cumulocity role (codename = role name)."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [(role.value, description) for role, description in ROLE_DESCRIPTIONS.items()]


class EventSequence(models.Model):
    """How many committed transactions sent realtime events about one managed object (device),
    so subscribers get them in commit order (deviceplatform/realtime/events.py). A transaction
    takes its number just before COMMIT, under this row's lock: a second one on the same object
    waits for the first to commit and gets the next number. `taken_ms` is when the last number
    was taken, `after_ms` how long after the one before it (None for the first)."""

    object_id = models.BigIntegerField(primary_key=True)
    seq = models.BigIntegerField()
    taken_ms = models.BigIntegerField()
    after_ms = models.BigIntegerField(null=True)


class IdempotencyKey(models.Model):
    """One `Idempotency-Key` a user sent with a create (deviceplatform/api/idempotency.py): the
    request it came with (a SHA-256 of method, path and canonical JSON body) and the 2xx answer,
    replayed to a retry with the same key and body until IDEMPOTENCY_KEY_TTL_SECONDS have passed.
    The row is inserted in the same transaction as the object it answers for, so it exists (is
    visible) exactly when that object does; (user, key) is unique."""

    user = models.ForeignKey("User", on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(db_index=True)
    status = models.PositiveSmallIntegerField()
    location = models.TextField(blank=True)
    etag = models.CharField(max_length=255, blank=True)
    content_type = models.CharField(max_length=255, blank=True)
    body = models.BinaryField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key_unique"),
        ]
