"""Operator UI for users and groups: the permissions offered are the Cumulocity roles, nothing else.

User management is an admin concern (spec auth.md §3), so users and groups are edited with Django's
own forms; only the permission choices, the role labels and case-insensitive usernames differ.

People and device users are listed apart: `UserAdmin` shows people (the device bootstrap login
among them, marked), `DeviceUserAdminBase` the members of `devices` with their last request and
the revoke, restore and rotate actions, which go through the user services. inventory/admin.py
registers it with the devices each one owns (deviceplatform knows no managed objects)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.widgets import FilteredSelectMultiple
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Model, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone

from deviceplatform.admin_lists import FleetListMixin
from deviceplatform.models import DeviceUser, User, device_user_condition
from deviceplatform.realtime.rights import credentials_changed
from deviceplatform.roles import ROLE_APP_LABEL, Role, user_roles
from deviceplatform.services import device_user_rotate, user_set_active

admin.site.site_header = "Device platform admin"
admin.site.site_title = "Device platform admin"
admin.site.index_title = "Inventory, identities, users and roles"


def role_permissions() -> QuerySet[Permission]:
    """The permissions that are Cumulocity roles (not the User model's add/change/... ones)."""
    return Permission.objects.filter(
        content_type__app_label=ROLE_APP_LABEL, codename__in=[role.value for role in Role]
    ).order_by("codename")


class RoleChoiceField(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj: Permission) -> str:
        return f"{obj.codename}: {obj.name}"


def role_selector(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`formfield_for_manytomany` kwargs for a permissions selector that offers the roles only."""
    return {
        **kwargs,
        "queryset": role_permissions(),
        "form_class": RoleChoiceField,
        "widget": FilteredSelectMultiple("roles", is_stacked=False),
        "label": "Roles",
    }


class CaseInsensitiveUsernameMixin:
    """Usernames are unique ignoring case (a functional unique constraint on Lower(username)):
    refuse `ADMIN` when `admin` exists with a form error rather than an IntegrityError."""

    instance: User
    cleaned_data: dict[str, Any]

    def clean_username(self) -> str:
        username = self.cleaned_data.get("username")
        if username:
            clash = User.objects.filter(username__iexact=username).exclude(pk=self.instance.pk)
            existing = clash.values_list("username", flat=True).first()
            if existing is not None:
                raise ValidationError(
                    "The username %(existing)s is taken; usernames are not case-sensitive.",
                    code="unique",
                    params={"existing": existing},
                )
        return username  # type: ignore[return-value]


class UserAddForm(CaseInsensitiveUsernameMixin, AdminUserCreationForm):
    class Meta(AdminUserCreationForm.Meta):
        model = User


class UserEditForm(CaseInsensitiveUsernameMixin, UserChangeForm):
    class Meta(UserChangeForm.Meta):
        model = User


def _keep_other_permissions(instance: Model, related_name: str, save: Any) -> None:
    """Save the form's m2m data without dropping permissions the role selector does not offer
    (granted outside the admin, e.g. Django model permissions for a staff operator)."""
    manager = getattr(instance, related_name)
    others = list(manager.exclude(pk__in=role_permissions()))
    save()
    if others:
        manager.add(*others)


def _end_sessions_on_commit(user_id: int) -> None:
    """The user's realtime sessions end once the change commits (`credentials_changed`)."""
    transaction.on_commit(partial(credentials_changed, user_id))


class AccountAdmin(FleetListMixin, DjangoUserAdmin):
    """What the people and the device-user admins share: the forms, the role selector, the
    effective roles, and ending a user's realtime sessions when an edit disables it, changes its
    password or deletes it (REST refuses it at its next request anyway: the row is read then)."""

    form = UserEditForm
    add_form = UserAddForm
    readonly_fields = ["effective_roles"]

    def get_fieldsets(self, request: HttpRequest, obj: User | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        return [*fieldsets, ("Effective roles", {"fields": ["effective_roles"]})]

    @admin.display(description="effective roles")
    def effective_roles(self, obj: User) -> str:
        if obj.pk is None:
            return "-"
        # user_roles caches on the instance; a fresh copy shows what is stored now.
        roles = user_roles(User.objects.get(pk=obj.pk))
        return ", ".join(sorted(roles)) or "(none: the user is inactive)"

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "user_permissions":
            kwargs = role_selector(kwargs)
            kwargs["help_text"] = (
                "Roles granted to this user directly; groups grant more. "
                "An *_ADMIN role implies its *_READ role."
            )
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            _end_sessions_on_commit(obj.pk)

    def save_related(
        self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool
    ) -> None:
        _keep_other_permissions(
            form.instance,
            "user_permissions",
            lambda: super(AccountAdmin, self).save_related(request, form, formsets, change),
        )

    def user_change_password(
        self,
        request: HttpRequest,
        id: str,
        form_url: str = "",  # noqa: A002 - Django's name
    ) -> HttpResponse:
        user = self.get_object(request, unquote(id)) if request.method == "POST" else None
        response = super().user_change_password(request, id, form_url)
        if user is not None:
            now = User.objects.filter(pk=user.pk).values_list("password", flat=True).first()
            if now != user.password:
                _end_sessions_on_commit(user.pk)
        return response

    def delete_model(self, request: HttpRequest, obj: User) -> None:
        user_id = obj.pk
        super().delete_model(request, obj)
        _end_sessions_on_commit(user_id)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        user_ids = list(queryset.values_list("pk", flat=True))
        super().delete_queryset(request, queryset)
        for user_id in user_ids:
            _end_sessions_on_commit(user_id)


@admin.register(User)
class UserAdmin(AccountAdmin):
    """People: everyone but the device users (`DeviceUser`), the device bootstrap login marked."""

    list_display = [
        "username",
        "email",
        "first_name",
        "last_name",
        "is_active",
        "is_superuser",
        "account",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).exclude(device_user_condition())

    @admin.display(description="note")
    def account(self, obj: User) -> str:
        if obj.username.lower() == settings.DEVICE_BOOTSTRAP_USERNAME:
            return "device bootstrap login: may only ask for device credentials"
        return ""


# --- device users --------------------------------------------------------------------------------


class SilenceFilter(admin.SimpleListFilter):
    """Device users not heard from (no request) for a while, or never."""

    title = "not heard from"
    parameter_name = "silent"
    PERIODS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24)}

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("1h", "in 1 hour"), ("24h", "in 24 hours"), ("never", "ever")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> QuerySet[User]:
        value = self.value()
        if value == "never":
            return queryset.filter(last_request_at__isnull=True)
        if value in self.PERIODS:
            since = timezone.now() - self.PERIODS[value]
            return queryset.filter(Q(last_request_at__lt=since) | Q(last_request_at__isnull=True))
        return queryset


# What each credentials change is called on the buttons, in confirmations and in the history.
CREDENTIAL_CHANGES = {
    "revoke": "Revoke (disable) credentials",
    "restore": "Restore credentials",
    "rotate": "Rotate credentials",
}


class DeviceUserAdminBase(AccountAdmin):
    """Device users (registered with their devices in inventory/admin.py). Their credentials are
    changed only through the services: revoked, restored or rotated from the list (actions) or
    from a device user's page (buttons), each with a history entry; a rotated password is shown
    once, on the page that answers the rotation, and kept nowhere."""

    list_display = ["username", "is_active", "last_request_at", "last_login", "date_joined"]
    list_filter = [("is_active", admin.BooleanFieldListFilter), SilenceFilter]
    search_fields = ["username"]
    search_help_text = "Part of a username, e.g. a device's serial (device users are device_<id>)."
    ordering = ["username"]
    actions = ["revoke_credentials", "restore_credentials", "rotate_credentials"]
    readonly_fields = [
        "is_active",
        "last_request_at",
        "last_login",
        "date_joined",
        "effective_roles",
    ]
    change_form_template = "admin/deviceplatform/deviceuser/change_form.html"
    confirm_template = "admin/deviceplatform/deviceuser/confirm_credentials.html"
    rotated_template = "admin/deviceplatform/deviceuser/rotated_credentials.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # device users come from onboarding, createuser or a bulk registration

    def get_fieldsets(self, request: HttpRequest, obj: User | None = None) -> Any:
        return [
            (None, {"fields": ["username", "password"]}),
            (
                "Credentials",
                {
                    "fields": ["is_active"],
                    "description": "Revoke, restore or rotate with the buttons above.",
                },
            ),
            ("Roles", {"fields": ["groups", "user_permissions"]}),
            ("Activity", {"fields": ["last_request_at", "last_login", "date_joined"]}),
            ("Effective roles", {"fields": ["effective_roles"]}),
        ]

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/credentials/<str:change>/",
                self.admin_site.admin_view(self.credentials_view),
                name="{}_{}_credentials".format(*info),
            ),
            *super().get_urls(),
        ]

    # --- actions ----------------------------------------------------------------------------

    @admin.action(description=CREDENTIAL_CHANGES["revoke"], permissions=["change"])
    def revoke_credentials(
        self, request: HttpRequest, queryset: QuerySet[DeviceUser]
    ) -> HttpResponse | None:
        return self._confirmed_action(request, queryset, "revoke")

    @admin.action(description=CREDENTIAL_CHANGES["restore"], permissions=["change"])
    def restore_credentials(
        self, request: HttpRequest, queryset: QuerySet[DeviceUser]
    ) -> HttpResponse | None:
        return self.change_credentials(request, list(queryset), "restore")

    @admin.action(description=CREDENTIAL_CHANGES["rotate"], permissions=["change"])
    def rotate_credentials(
        self, request: HttpRequest, queryset: QuerySet[DeviceUser]
    ) -> HttpResponse | None:
        return self._confirmed_action(request, queryset, "rotate")

    def _confirmed_action(
        self, request: HttpRequest, queryset: QuerySet[DeviceUser], change: str
    ) -> HttpResponse | None:
        users = list(queryset)
        if request.POST.get("confirmed") == "yes":
            return self.change_credentials(request, users, change)
        return self._confirmation(request, users, change, action=f"{change}_credentials")

    # --- the buttons on a device user's page ------------------------------------------------

    def credentials_view(self, request: HttpRequest, object_id: str, change: str) -> HttpResponse:
        if change not in CREDENTIAL_CHANGES:
            raise Http404(f"No such credentials change: {change}")
        user = self.get_object(request, unquote(object_id))
        if user is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, user):
            raise PermissionDenied
        if request.method != "POST":
            return self._confirmation(request, [user], change)
        response = self.change_credentials(request, [user], change)
        if response is not None:
            return response
        return HttpResponseRedirect(
            reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[user.pk])
        )

    # --- the changes ------------------------------------------------------------------------

    def change_credentials(
        self, request: HttpRequest, users: Sequence[DeviceUser], change: str
    ) -> HttpResponse | None:
        """Apply `change` to each user through the services, each with its history entry (in the
        same transaction). Answers the page with the new passwords for a rotation, else None (a
        message says what happened)."""
        changed: list[DeviceUser] = []
        skipped: list[DeviceUser] = []
        rotated: list[tuple[DeviceUser, str]] = []
        for user in users:
            with transaction.atomic():
                if change == "revoke" and user.is_active:
                    user_set_active(user.pk, active=False)
                    message = "Revoked credentials: disabled, its requests are refused."
                elif change == "restore" and not user.is_active:
                    user_set_active(user.pk, active=True)
                    message = "Restored credentials: enabled again."
                elif change == "rotate":
                    _, password = device_user_rotate(user.pk)
                    rotated.append((user, password))
                    message = "Rotated credentials: a new generated password (not recorded)."
                else:
                    skipped.append(user)
                    continue
                self.log_change(request, user, message)
                changed.append(user)
        names = ", ".join(user.username for user in changed)
        if change == "revoke" and changed:
            messages.success(
                request,
                f"Revoked the credentials of {len(changed)} device user(s): {names}. Their REST "
                "requests and realtime sessions are refused from now on.",
            )
        elif change == "restore" and changed:
            messages.success(request, f"Restored {len(changed)} device user(s): {names}.")
        if skipped:
            state = "revoked" if change == "revoke" else "active"
            messages.warning(
                request,
                f"Skipped {len(skipped)} device user(s) already {state}: "
                f"{', '.join(user.username for user in skipped)}.",
            )
        return self._rotated(request, rotated) if change == "rotate" else None

    def _confirmation(
        self, request: HttpRequest, users: Sequence[DeviceUser], change: str, action: str = ""
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": f"{CREDENTIAL_CHANGES[change]}: are you sure?",
            "opts": self.opts,
            "change": change,
            "change_name": CREDENTIAL_CHANGES[change],
            "users": users,
            "action": action,  # set when confirming a list action (posted back to the list)
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.confirm_template, context)

    def _rotated(
        self, request: HttpRequest, rotated: list[tuple[DeviceUser, str]]
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": "New device credentials",
            "opts": self.opts,
            "tenant": settings.C8Y_TENANT_ID,
            "rotated": rotated,
        }
        request.current_app = self.admin_site.name
        response = TemplateResponse(request, self.rotated_template, context)
        # Shown once: no browser or proxy keeps a copy of the page.
        response["Cache-Control"] = "no-store"
        return response


admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(FleetListMixin, DjangoGroupAdmin):
    list_display = ["name", "role_names"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Group]:
        return super().get_queryset(request).prefetch_related("permissions")

    @admin.display(description="roles")
    def role_names(self, obj: Group) -> str:
        codenames = {permission.codename for permission in obj.permissions.all()}
        return ", ".join(sorted(codenames & {role.value for role in Role})) or "-"

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "permissions":
            kwargs = role_selector(kwargs)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def save_related(
        self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool
    ) -> None:
        _keep_other_permissions(
            form.instance,
            "permissions",
            lambda: super(GroupAdmin, self).save_related(request, form, formsets, change),
        )
