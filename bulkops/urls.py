"""Bulk-operation URLs (lowercase `bulkoperations`, each with and without trailing slash)."""

from bulkops import views
from deviceplatform.api.routing import c8y_path

urlpatterns = [
    c8y_path(r"devicecontrol/bulkoperations", views.BulkOperationCollectionView.as_view()),
    c8y_path(
        r"devicecontrol/bulkoperations/(?P<pk>[^/]+)", views.BulkOperationDetailView.as_view()
    ),
    *(
        c8y_path(
            rf"devicecontrol/bulkoperations/(?P<pk>[^/]+)/{action}",
            views.BulkOperationRolloutView.as_view(action=action),
        )
        for action in ("pause", "resume")
    ),
]
