from django.contrib.auth import views as auth_views
from django.urls import path

from studies import views

app_name = "studies"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("received/", views.received, name="received"),
    path("sent/", views.sent, name="sent"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("pseudonyms/", views.pseudonyms, name="pseudonyms"),
    path("studies/<str:study_uid>/", views.study_detail, name="study"),
    path("studies/<str:study_uid>/download.zip", views.download_study, name="download-study"),
    path("series/<str:series_uid>/", views.series_viewer, name="viewer"),
    path("series/<str:series_uid>/thumbnail.jpg", views.series_thumbnail, name="thumbnail"),
    path("series/<str:series_uid>/download.zip", views.download_series, name="download-series"),
    path("instances/<str:sop_uid>/frames/<int:frame>", views.frame_image, name="frame"),
    path("instances/<str:sop_uid>/download", views.download_instance, name="download-instance"),
]
