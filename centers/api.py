"""The agents' own API: the heartbeat that makes each center's agent visible in the admin."""

from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from centers.auth import IsCenterAgent
from centers.selectors import agent_heartbeats_of_center
from centers.services import agent_heartbeat_record
from portal.schema import error_responses

MAX_COUNT = 2**31 - 1


class _SpoolSerializer(serializers.Serializer):
    count = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)
    bytes = serializers.IntegerField(min_value=0, max_value=2**63 - 1, default=0)
    # Set aside in failed/ (refused for good, or failing past the agent's bounds); retrying: failed, waiting to retry.
    failed = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)
    retrying = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)


class _OutboxSerializer(serializers.Serializer):
    pending = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)
    failed = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)
    retrying = serializers.IntegerField(min_value=0, max_value=MAX_COUNT, default=0)


class HeartbeatSerializer(serializers.Serializer):
    # Untrimmed: the length the contract states is the length of what was sent.
    version = serializers.CharField(max_length=32, trim_whitespace=False)
    hostname = serializers.CharField(max_length=255, trim_whitespace=False)
    roles = serializers.ListField(
        child=serializers.CharField(max_length=16, trim_whitespace=False), max_length=8, default=list
    )
    interval = serializers.IntegerField(min_value=1, max_value=86400, default=60)
    spool = _SpoolSerializer(required=False, default=dict)
    outbox = _OutboxSerializer(required=False, default=dict)
    last_failure_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


def _agent_body(heartbeat, now) -> dict:
    return {
        "hostname": heartbeat.hostname,
        "version": heartbeat.version,
        "roles": heartbeat.roles,
        "last_seen_at": heartbeat.last_seen_at.isoformat(),
        "online": heartbeat.is_online(now),
        "failed": {"spool": heartbeat.spool_failed, "outbox": heartbeat.outbox_failed},
        "retrying": {"spool": heartbeat.spool_retrying, "outbox": heartbeat.outbox_retrying},
        "last_failure_at": heartbeat.last_failure_at.isoformat() if heartbeat.last_failure_at else None,
    }


class _PerStoreSerializer(serializers.Serializer):
    spool = serializers.IntegerField()
    outbox = serializers.IntegerField()


class AgentSerializer(serializers.Serializer):
    """One agent as the portal sees it (_agent_body), for the API's contract."""

    hostname = serializers.CharField()
    version = serializers.CharField()
    roles = serializers.ListField(child=serializers.CharField())
    last_seen_at = serializers.DateTimeField()
    online = serializers.BooleanField()
    failed = _PerStoreSerializer()
    retrying = _PerStoreSerializer()
    last_failure_at = serializers.DateTimeField(allow_null=True)


class HeartbeatAnswerSerializer(AgentSerializer):
    status = serializers.ChoiceField(["ok"])


class AgentHeartbeatView(APIView):
    permission_classes = [IsCenterAgent]

    @extend_schema(
        operation_id="agent_heartbeat",
        summary="Report this agent's state",
        request=HeartbeatSerializer,
        responses={200: HeartbeatAnswerSerializer, **error_responses(400, 415)},
    )
    def post(self, request):
        serializer = HeartbeatSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        heartbeat = agent_heartbeat_record(
            api_key=request.auth,
            hostname=data["hostname"],
            version=data["version"],
            roles=data["roles"],
            interval=data["interval"],
            spool=dict(data["spool"]),
            outbox=dict(data["outbox"]),
            last_failure_at=data["last_failure_at"],
            address=request.META.get("REMOTE_ADDR") or None,
        )
        return Response({"status": "ok", **_agent_body(heartbeat, timezone.now())})

    @extend_schema(
        operation_id="agents_of_center",
        summary="This key's center and its agents",
        responses={
            200: inline_serializer(
                "CenterAgents",
                {
                    "center": inline_serializer(
                        "CenterOfKey", {"slug": serializers.CharField(), "name": serializers.CharField()}
                    ),
                    "agents": AgentSerializer(many=True),
                },
            ),
            **error_responses(),
        },
    )
    def get(self, request):
        """Who this key belongs to and the center's agents as the portal sees them; changes nothing."""
        center = request.user.center
        now = timezone.now()
        agents = [_agent_body(h, now) for h in agent_heartbeats_of_center(center=center)]
        return Response({"center": {"slug": center.slug, "name": center.name}, "agents": agents})
