"""Device-control URLs (each with and without trailing slash)."""

from deviceplatform.api.routing import c8y_path
from devicecontrol import views

urlpatterns = [
    c8y_path(r"devicecontrol", views.DeviceControlApiView.as_view()),
]
