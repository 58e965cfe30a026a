from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal import metrics, views

admin.site.site_header = "DICOM Exchange administration"
admin.site.site_title = "DICOM Exchange"
# A database that is down answers 503 with Retry-After, never 500 (portal.views.server_error).
handler500 = "portal.views.server_error"
# An API path that matches no route answers JSON like the rest of the API (README "The API contract").
handler404 = "portal.views.not_found"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/health", views.health, name="health"),
    # Prometheus, for operators only (README "Metrics and monitoring").
    path("metrics", metrics.metrics_view, name="metrics"),
    # The API's contract, README "The API contract": YAML, or JSON with ?format=json.
    path("api/v1/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("routing.urls")),
    path("api/v1/", include("centers.urls")),
    path("", include("studies.urls")),
    path("dicomweb/", include("dicomweb.urls")),
]
