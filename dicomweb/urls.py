from django.urls import path

from dicomweb import views

STUDY = "studies/<str:study>"
SERIES = f"{STUDY}/series/<str:series>"
INSTANCE = f"{SERIES}/instances/<str:instance>"

app_name = "dicomweb"
urlpatterns = [
    path("studies", views.studies, name="studies"),
    path("series", views.all_series, name="series-search"),
    path("instances", views.all_instances, name="instances-search"),
    path("wado", views.wado_uri, name="wado-uri"),
    path(STUDY, views.study, name="study"),
    path(f"{STUDY}/metadata", views.study_metadata, name="study-metadata"),
    path(f"{STUDY}/series", views.study_series, name="study-series"),
    path(f"{STUDY}/instances", views.study_instances, name="study-instances"),
    path(SERIES, views.series, name="series"),
    path(f"{SERIES}/metadata", views.series_metadata, name="series-metadata"),
    path(f"{SERIES}/instances", views.series_instances, name="series-instances"),
    path(f"{SERIES}/thumbnail", views.series_thumbnail, name="series-thumbnail"),
    path(INSTANCE, views.instance, name="instance"),
    path(f"{INSTANCE}/metadata", views.instance_metadata_view, name="instance-metadata"),
    path(f"{INSTANCE}/rendered", views.instance_rendered, name="instance-rendered"),
    path(f"{INSTANCE}/thumbnail", views.instance_thumbnail, name="instance-thumbnail"),
    path(f"{INSTANCE}/frames/<str:frames>", views.frames, name="frames"),
    path(f"{INSTANCE}/frames/<str:frames>/rendered", views.frames_rendered, name="frames-rendered"),
    path(f"{INSTANCE}/bulk/<str:tag>", views.bulk, name="bulk"),
]
