"""Operator UI for users and groups: the permissions offered are the Cumulocity roles, nothing else.

User management is an admin concern (spec auth.md §3), so users and groups are edited with Django's
own forms; only the permission choices, the role labels and case-insensitive usernames differ."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.widgets import FilteredSelectMultiple
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import ValidationError
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from deviceplatform.models import User
from deviceplatform.roles import ROLE_APP_LABEL, Role, user_roles

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


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserEditForm
    add_form = UserAddForm
    list_display = ["username", "email", "first_name", "last_name", "is_active", "is_superuser"]
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

    def save_related(
        self, request: HttpRequest, form: forms.ModelForm, formsets: Any, change: bool
    ) -> None:
        _keep_other_permissions(
            form.instance,
            "user_permissions",
            lambda: super(UserAdmin, self).save_related(request, form, formsets, change),
        )


admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(DjangoGroupAdmin):
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
