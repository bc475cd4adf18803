"""Device-control URLs (each with and without trailing slash)."""

from devicecontrol import views, waiting
from deviceplatform.api.routing import c8y_path

urlpatterns = [
    c8y_path(r"devicecontrol", views.DeviceControlApiView.as_view()),
    c8y_path(r"devicecontrol/operations", views.OperationCollectionView.as_view()),
    # Before the detail route: "wait" is not an operation ID.
    c8y_path(r"devicecontrol/operations/wait", waiting.operation_create_and_wait),
    c8y_path(r"devicecontrol/operations/(?P<pk>[^/]+)", views.OperationDetailView.as_view()),
    c8y_path(r"devicecontrol/operations/(?P<pk>[^/]+)/retry", views.OperationRetryView.as_view()),
    c8y_path(r"devicecontrol/operations/(?P<pk>[^/]+)/cancel", views.OperationCancelView.as_view()),
    c8y_path(r"devicecontrol/newDeviceRequests", views.NewDeviceRequestCollectionView.as_view()),
    c8y_path(
        r"devicecontrol/newDeviceRequests/(?P<device_id>[^/]+)",
        views.NewDeviceRequestDetailView.as_view(),
    ),
    c8y_path(r"devicecontrol/deviceCredentials", views.DeviceCredentialsView.as_view()),
    c8y_path(r"devicecontrol/bulkNewDeviceRequests", views.BulkNewDeviceRequestView.as_view()),
]
