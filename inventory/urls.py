"""Inventory and identity URLs in Cumulocity's shapes (each with and without trailing slash)."""

from deviceplatform.api.routing import c8y_path
from inventory import identity_views, views
from inventory.models import Relation

MO = r"inventory/managedObjects/(?P<pk>[^/]+)"

urlpatterns = [
    c8y_path(r"inventory", views.InventoryApiView.as_view()),
    c8y_path(r"inventory/managedObjects", views.ManagedObjectCollectionView.as_view()),
    # Before the detail route: "count" is not a managed object ID.
    c8y_path(r"inventory/managedObjects/count", views.ManagedObjectCountView.as_view()),
    c8y_path(MO, views.ManagedObjectDetailView.as_view()),
    c8y_path(r"identity", identity_views.IdentityApiView.as_view()),
    c8y_path(
        r"identity/globalIds/(?P<pk>[^/]+)/externalIds",
        identity_views.ExternalIdCollectionView.as_view(),
    ),
    # Everything after the type is the external ID, so IDs containing '/' still route (identity.md §7).
    c8y_path(
        r"identity/externalIds/(?P<type>[^/]+)/(?P<external_id>.+?)",
        identity_views.ExternalIdDetailView.as_view(),
    ),
]

for relation in Relation:
    urlpatterns += [
        c8y_path(
            rf"{MO}/{relation.children_segment}",
            views.ReferenceCollectionView.as_view(),
            kwargs={"relation": relation.value},
        ),
        c8y_path(
            rf"{MO}/{relation.children_segment}/(?P<child_pk>[^/]+)",
            views.ReferenceDetailView.as_view(),
            kwargs={"relation": relation.value},
        ),
        c8y_path(
            rf"{MO}/{relation.parents_segment}",
            views.ParentCollectionView.as_view(),
            kwargs={"relation": relation.value},
        ),
    ]
