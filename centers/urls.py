from django.urls import path

from centers import api

urlpatterns = [
    path("agents/heartbeat", api.AgentHeartbeatView.as_view(), name="agent-heartbeat"),
]
