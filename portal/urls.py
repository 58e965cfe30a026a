from django.contrib import admin
from django.urls import include, path

from portal import views

admin.site.site_header = "DICOM Exchange administration"
admin.site.site_title = "DICOM Exchange"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/health", views.health, name="health"),
    path("api/v1/", include("routing.urls")),
    path("api/v1/", include("centers.urls")),
    path("", include("studies.urls")),
    path("dicomweb/", include("dicomweb.urls")),
]
