"""The product's URLs, preceded by the bare DRF ceiling under /bench-bare/ (bench/README.md)."""

from django.urls import re_path

from bench.bare_drf import views
from deviceplatform.urls import urlpatterns as product_urlpatterns

urlpatterns = [
    re_path(r"^bench-bare/operations/?$", views.OperationCreate.as_view()),
    re_path(r"^bench-bare/managedObjects/?$", views.ManagedObjectCreate.as_view()),
    re_path(r"^bench-bare/managedObjects/(?P<pk>[0-9]+)/?$", views.ManagedObjectRetrieve.as_view()),
    *product_urlpatterns,
]

handler400 = "deviceplatform.api.exceptions.handler400"
handler403 = "deviceplatform.api.exceptions.handler403"
handler404 = "deviceplatform.api.exceptions.handler404"
handler500 = "deviceplatform.api.exceptions.handler500"
