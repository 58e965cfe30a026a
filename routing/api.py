"""The REST API agents use: publish an instance, lease, fetch and acknowledge deliveries."""

import math
import time
from urllib.parse import quote

from django.conf import settings
from django.db import connection
from django.http import FileResponse, HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ParseError, UnsupportedMediaType
from rest_framework.response import Response
from rest_framework.views import APIView

from centers.auth import IsCenterAgent, MayPublish, MaySubscribe
from centers.services import audit_record
from dicomweb.multipart import MalformedMultipart, MultipartReader, media_type_params
from portal.bridge import DISCONNECTED, RECEIVED_BODY
from portal.schema import error_responses
from routing import batch, delivery_services, selectors, services
from routing.links import signed_download_path
from routing.models import Delivery, Instance, Priority

MAX_LEASE = 100
MAX_WAIT = 60


def client_address(request) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def public_url(request, path: str) -> str:
    if settings.PORTAL_PUBLIC_URL:
        return settings.PORTAL_PUBLIC_URL + path
    return request.build_absolute_uri(path)


def instance_body(instance: Instance) -> dict:
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": instance.series.study.study_instance_uid,
        "series_instance_uid": instance.series.series_instance_uid,
        "routing_key": instance.routing_key,
        "sha256": instance.sha256,
        "size": instance.size,
    }


class InstanceSerializer(serializers.Serializer):
    """The answer to an upload (instance_body), for the API's contract."""

    sop_instance_uid = serializers.CharField()
    study_instance_uid = serializers.CharField()
    series_instance_uid = serializers.CharField()
    routing_key = serializers.CharField(help_text="<region>.<city>.<modality>, what subscriptions match.")
    sha256 = serializers.CharField(help_text="Of the file as stored.")
    size = serializers.IntegerField(help_text="Bytes.")


PRIORITY_LABELS = {label: value for value, label in Priority.choices}


def priority_param(request) -> int:
    """The `priority` query parameter: routine (the default) or stat; ParseError names the allowed values."""
    raw = request.query_params.get("priority")
    if raw is None or raw == "":
        return Priority.ROUTINE
    if raw not in PRIORITY_LABELS:
        raise ParseError(f"'priority' must be one of {', '.join(PRIORITY_LABELS)}, not {raw[:40]!r}.")
    return PRIORITY_LABELS[raw]


class UploadQuerySerializer(serializers.Serializer):
    """The upload's query, for the API's contract (priority_param reads it)."""

    priority = serializers.ChoiceField(
        choices=list(PRIORITY_LABELS),
        default="routine",
        help_text="stat: this instance's deliveries are leased before every routine one, and its fan-out has "
        "workers of its own. Sending a stored file again with stat raises what is still owed of it to stat.",
    )


class BatchResultSerializer(serializers.Serializer):
    """One part's answer in a batch upload: its own status, and the instance or the error."""

    status = serializers.ChoiceField([200, 201, 400, 409, 413, 415], help_text="What a single upload would answer.")
    sop_instance_uid = serializers.CharField(required=False)
    study_instance_uid = serializers.CharField(required=False)
    series_instance_uid = serializers.CharField(required=False)
    routing_key = serializers.CharField(required=False)
    sha256 = serializers.CharField(required=False)
    size = serializers.IntegerField(required=False)
    error = serializers.CharField(required=False)


def instances_upload_batch(request, params: dict[str, str]) -> Response:
    """Many instances in one multipart/related body: one transaction, one fsync wave, one fan-out task."""
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(
            request.content_type, 'Send instances as multipart/related; type="application/dicom".'
        )
    boundary = params.get("boundary")
    if not boundary:
        raise ParseError("The multipart/related Content-Type has no boundary.")
    priority = priority_param(request)
    # The event loop may have received the parts already, each straight to its file (portal.bridge).
    received = request._request.META.get(RECEIVED_BODY)
    try:
        results = batch.instances_ingest(
            parts=MultipartReader(request._request, boundary) if received is None else None,
            received=received,
            api_key=request.auth,
            address=client_address(request),
            priority=priority,
        )
    except MalformedMultipart as exc:
        raise ParseError(f"The body is not a valid multipart/related message: {exc} No instance was kept.") from None
    except services.IngestError as exc:
        return Response({"error": exc.message}, status=exc.status)
    body = [
        {"status": r.status, **(instance_body(r.instance) if r.instance is not None else {"error": r.error})}
        for r in results
    ]
    return Response({"results": body})


class InstanceUploadView(APIView):
    permission_classes = [IsCenterAgent, MayPublish]

    @extend_schema(
        operation_id="instance_upload",
        summary="Publish one DICOM instance, or a batch of them",
        description="The body is the Part 10 file itself. Sending the same file again is answered 200, "
        'not stored twice. A multipart/related body (type="application/dicom") carries many files: '
        f"up to {batch.MAX_PARTS}, answered 200 with a result per part, in order, each with the status a single "
        "upload of that file would have had. A refused part costs the others nothing.",
        parameters=[UploadQuerySerializer],
        request={"application/dicom": OpenApiTypes.BINARY, "multipart/related": OpenApiTypes.BINARY},
        responses={
            201: OpenApiResponse(InstanceSerializer, description="Stored and routed to the subscribing centers."),
            200: OpenApiResponse(
                PolymorphicProxySerializer(
                    "InstanceUploadAnswer",
                    serializers=[
                        InstanceSerializer,
                        inline_serializer("BatchUploadResults", {"results": BatchResultSerializer(many=True)}),
                    ],
                    resource_type_field_name=None,
                ),
                description="This very file was already stored; or, for a batch, the result of each part.",
            ),
            **error_responses(400, 403, 409, 413, 415),
        },
    )
    def post(self, request):
        media_type, params = media_type_params(request.content_type)
        if media_type == "multipart/related":
            return instances_upload_batch(request, params)
        if media_type != "application/dicom":
            raise UnsupportedMediaType(
                media_type or "(none)",
                "Send the file with Content-Type: application/dicom, "
                'or many as multipart/related; type="application/dicom".',
            )
        priority = priority_param(request)
        # The Django request itself is the body stream: REST framework's parsing
        # would treat a chunked body (no Content-Length) as empty.
        try:
            result = services.instance_ingest(
                stream=request._request, api_key=request.auth, address=client_address(request), priority=priority
            )
        except services.IngestError as exc:
            return Response({"error": exc.message}, status=exc.status)
        return Response(
            instance_body(result.instance), status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        )


class DeliverySerializer(serializers.ModelSerializer):
    sop_instance_uid = serializers.CharField(source="instance.sop_instance_uid")
    study_instance_uid = serializers.CharField(source="instance.series.study.study_instance_uid")
    series_instance_uid = serializers.CharField(source="instance.series.series_instance_uid")
    patient_id = serializers.CharField(source="instance.series.study.patient.patient_id")
    modality = serializers.CharField(source="instance.series.modality")
    routing_key = serializers.CharField(source="instance.routing_key")
    size = serializers.IntegerField(source="instance.size")
    sha256 = serializers.CharField(source="instance.sha256")
    priority = serializers.ChoiceField(
        choices=list(PRIORITY_LABELS),
        source="get_priority_display",
        help_text="stat deliveries are leased before routine ones.",
    )
    download_url = serializers.SerializerMethodField()
    deliver = serializers.SerializerMethodField(
        help_text="study: one of a whole, stable study, leased with the rest of it; place the study's files "
        "together. instance: place it as it comes."
    )

    class Meta:
        model = Delivery
        fields = [
            "id",
            "sop_instance_uid",
            "study_instance_uid",
            "series_instance_uid",
            "patient_id",
            "modality",
            "routing_key",
            "size",
            "sha256",
            "priority",
            "download_url",
            "deliver",
        ]

    @extend_schema_field(serializers.ChoiceField(choices=["instance", "study"]))
    def get_deliver(self, delivery: Delivery) -> str:
        return "study" if delivery.whole_study else "instance"

    def get_download_url(self, delivery: Delivery) -> str:
        return download_url(self.context["request"], delivery)


def delivery_body(request, delivery: Delivery) -> dict:
    """DeliverySerializer's representation, built directly: a lease of 50 spent a third of
    its CPU walking the serializer's 600 fields (the serializer stays as the API's contract)."""
    instance = delivery.instance
    series = instance.series
    study = series.study
    return {
        "id": delivery.pk,
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "patient_id": study.patient.patient_id,
        "modality": series.modality,
        "routing_key": instance.routing_key,
        "size": instance.size,
        "sha256": instance.sha256,
        "priority": delivery.get_priority_display(),
        "download_url": download_url(request, delivery),
        "deliver": "study" if delivery.whole_study else "instance",
    }


def download_url(request, delivery: Delivery) -> str:
    if settings.S3_PRESIGNED_DOWNLOADS and delivery.lease_expires_at is not None:
        return presigned_download_url(delivery)
    if settings.DICOM_DOWNLOAD_LINK_SECRET and delivery.lease_expires_at is not None:
        path = signed_download_path(
            prefix=settings.DICOM_DOWNLOAD_LINK_PREFIX,
            delivery_id=delivery.pk,
            file_name=delivery.instance.file,
            expires=delivery.lease_expires_at,
            secret=settings.DICOM_DOWNLOAD_LINK_SECRET,
        )
    else:
        path = f"/api/v1/deliveries/{delivery.pk}/file"
    return public_url(request, path)


def presigned_download_url(delivery: Delivery) -> str:
    """A GET URL of the bucket's object, signed by the storage's credentials until the lease ends."""
    seconds = math.ceil((delivery.lease_expires_at - timezone.now()).total_seconds())
    instance = delivery.instance
    return services.dicom_storage().url(
        instance.file,
        # At least a second: a URL must not be born expired; the ack still checks the lease itself.
        expire=max(seconds, 1),
        parameters={
            "ResponseContentType": "application/dicom",
            "ResponseContentDisposition": f'attachment; filename="{instance.sop_instance_uid}.dcm"',
        },
    )


def _bounded_int(request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ParseError(f"'{name}' must be a whole number between 0 and {maximum}.") from None
    if value < 0:
        raise ParseError(f"'{name}' must be a whole number between 0 and {maximum}.")
    return min(value, maximum)


class LeaseQuerySerializer(serializers.Serializer):
    """The lease's query, for the API's contract (_bounded_int reads it)."""

    limit = serializers.IntegerField(
        min_value=0, default=10, help_text=f"At most this many deliveries (1 to {MAX_LEASE}; more is {MAX_LEASE})."
    )
    wait = serializers.IntegerField(
        min_value=0,
        default=0,
        help_text=f"Seconds to wait when no delivery is waiting, a long poll (up to {MAX_WAIT}; more is {MAX_WAIT}).",
    )


class DeliveryListView(APIView):
    permission_classes = [IsCenterAgent, MaySubscribe]

    @extend_schema(
        operation_id="deliveries_lease",
        summary="Lease the deliveries waiting for this key's center",
        description="Each delivery returned is leased to the caller for DELIVERY_LEASE_SECONDS: fetch its file "
        "from download_url and acknowledge it before the lease runs out, or it is offered again. Deliveries with "
        "deliver=study come only once their study is stable, the whole study in one lease (even past limit).",
        parameters=[LeaseQuerySerializer],
        responses={200: DeliverySerializer(many=True), **error_responses(400, 403)},
    )
    def get(self, request):
        limit = max(1, _bounded_int(request, "limit", 10, MAX_LEASE))
        wait = _bounded_int(request, "wait", 0, MAX_WAIT)
        deadline = time.monotonic() + wait
        center = request.user.center
        # Set by portal.bridge when the agent hangs up; absent under other servers.
        gone = request.META.get(DISCONNECTED)
        leased = []
        while not (gone and gone.is_set()):
            leased = delivery_services.deliveries_lease(
                center=center, limit=limit, api_key=request.auth, address=client_address(request)
            )
            remaining = deadline - time.monotonic()
            if leased or remaining <= 0:
                break
            pause = min(settings.DELIVERY_POLL_INTERVAL, remaining)
            if not connection.in_atomic_block:
                # A waiting agent holds no database connection (with the pool,
                # closing hands it back), so hundreds of long polls share a few.
                connection.close()
            if gone:
                gone.wait(pause)
            else:
                time.sleep(pause)
        return Response([delivery_body(request, delivery) for delivery in leased])


def _delivery_or_404(request, delivery_id: int) -> Delivery:
    delivery = selectors.delivery_get_for_center(center=request.user.center, delivery_id=delivery_id)
    if delivery is None:
        raise NotFound("No such delivery.")
    return delivery


class DeliveryFileView(APIView):
    permission_classes = [IsCenterAgent]

    @extend_schema(
        operation_id="delivery_file",
        summary="Download a delivery's DICOM file",
        parameters=[OpenApiParameter("delivery_id", int, OpenApiParameter.PATH)],
        responses={
            (200, "application/dicom"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The Part 10 file; X-Checksum-SHA256 carries its digest."
            ),
            **error_responses(404, 410),
        },
    )
    def get(self, request, delivery_id: int):
        delivery = _delivery_or_404(request, delivery_id)
        instance = delivery.instance
        accel = settings.DICOM_ACCEL_REDIRECT and settings.STORAGE_BACKEND == "local"
        storage = services.dicom_storage()
        try:
            # Behind nginx a missing file would be nginx's 404, which fails nothing: look first.
            handle = None if accel and storage.exists(instance.file) else services.instance_open(instance)
        except services.StoredFileMissing as missing:
            delivery_services.delivery_fail(
                delivery=delivery,
                reason=delivery_services.MISSING_FILE_REASON,
                api_key=request.auth,
                address=client_address(request),
            )
            return Response(
                {
                    "error": f"{missing} This delivery has failed and is not offered again; "
                    "the portal's administrator sees it."
                },
                status=status.HTTP_410_GONE,
            )
        audit_record(
            action="delivery.download",
            center=delivery.center,
            api_key=request.auth,
            obj=delivery,
            address=client_address(request),
            detail={"sop_instance_uid": instance.sop_instance_uid},
        )
        if accel:
            # nginx sends the file itself and sets its length.
            response = HttpResponse(content_type="application/dicom")
            response["X-Accel-Redirect"] = settings.DICOM_ACCEL_REDIRECT.rstrip("/") + "/" + quote(instance.file)
        else:
            response = FileResponse(handle, content_type="application/dicom")
            response["Content-Length"] = str(instance.size)
        response["Content-Disposition"] = f'attachment; filename="{instance.sop_instance_uid}.dcm"'
        response["X-Checksum-SHA256"] = instance.sha256
        return response


class AckSerializer(serializers.Serializer):
    sha256 = serializers.RegexField(
        r"^[0-9a-fA-F]{64}$",
        trim_whitespace=False,  # the contract's pattern holds for what was sent, spaces included
        error_messages={"invalid": "must be 64 hexadecimal digits."},
    )


class DeliveryAckView(APIView):
    permission_classes = [IsCenterAgent]

    @extend_schema(
        operation_id="delivery_ack",
        summary="Acknowledge one delivery with the digest of the file received",
        parameters=[OpenApiParameter("delivery_id", int, OpenApiParameter.PATH)],
        request=AckSerializer,
        responses={
            200: inline_serializer(
                "DeliveryAcked",
                {"id": serializers.IntegerField(), "status": serializers.ChoiceField([Delivery.Status.DELIVERED])},
            ),
            **error_responses(400, 404, 409, 415),
        },
    )
    def post(self, request, delivery_id: int):
        delivery = _delivery_or_404(request, delivery_id)
        body = AckSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            delivery_services.delivery_ack(
                delivery=delivery,
                sha256=body.validated_data["sha256"],
                api_key=request.auth,
                address=client_address(request),
            )
        except delivery_services.ChecksumMismatch as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response({"id": delivery.pk, "status": Delivery.Status.DELIVERED})


class BatchAckItemSerializer(AckSerializer):
    id = serializers.IntegerField(min_value=1)


class BatchAckSerializer(serializers.Serializer):
    # A list field, not many=True: its bounds reach the API's contract as minItems and maxItems.
    acks = serializers.ListField(child=BatchAckItemSerializer(), allow_empty=False, min_length=1, max_length=MAX_LEASE)


class DeliveryBatchAckView(APIView):
    """Acknowledge up to a lease's worth of deliveries in one request."""

    permission_classes = [IsCenterAgent]

    @extend_schema(
        operation_id="deliveries_ack",
        summary="Acknowledge up to a lease's worth of deliveries",
        request=BatchAckSerializer,
        responses={
            200: inline_serializer(
                "DeliveriesAcked",
                {
                    "results": inline_serializer(
                        "DeliveryAckOutcome",
                        {
                            "id": serializers.IntegerField(),
                            "status": serializers.ChoiceField(["delivered", "requeued", "failed", "not_found"]),
                            "error": serializers.CharField(required=False),
                        },
                        many=True,
                    )
                },
            ),
            **error_responses(400, 415),
        },
    )
    def post(self, request):
        body = BatchAckSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        outcomes = delivery_services.deliveries_ack(
            center=request.user.center,
            acks=[(item["id"], item["sha256"]) for item in body.validated_data["acks"]],
            api_key=request.auth,
            address=client_address(request),
        )
        return Response(
            {
                "results": [
                    {"id": o.delivery_id, "status": o.status, **({"error": o.error} if o.error else {})}
                    for o in outcomes
                ]
            }
        )
