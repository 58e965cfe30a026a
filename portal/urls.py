from django.contrib import admin
from django.urls import include, path

from portal import views

admin.site.site_header = "DICOM Exchange administration"
admin.site.site_title = "DICOM Exchange"
# A database that is down answers 503 with Retry-After, never 500 (portal.views.server_error).
handler500 = "portal.views.server_error"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/health", views.health, name="health"),
    path("api/v1/", include("routing.urls")),
    path("api/v1/", include("centers.urls")),
    path("", include("studies.urls")),
    path("dicomweb/", include("dicomweb.urls")),
]
