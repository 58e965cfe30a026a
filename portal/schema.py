"""What the OpenAPI contract (drf-spectacular) needs beyond the views themselves: the key
scheme and the one error body every API error has (portal.api.exception_handler)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

ERROR_DESCRIPTIONS = {
    400: "The request is malformed; the sentence says what is wrong.",
    401: "No API key, or one that is unknown or revoked.",
    403: "The key's center may not do this (publish or receive).",
    404: "No such delivery for this key's center.",
    409: "The content contradicts what the portal holds (another file under the same SOP Instance UID, "
    "or a checksum that does not match).",
    410: "The stored file is gone from the portal; this delivery has failed and is not offered again.",
    413: "The file is larger than DICOM_MAX_UPLOAD_BYTES.",
    415: "The body is not sent with the Content-Type the operation takes (application/dicom for uploads, "
    "application/json for the rest).",
    429: "The key's rate limit (API_RATE_LIMIT) is spent; Retry-After says when to come back.",
    503: "The portal's database is unavailable for a moment; Retry-After says when to try again.",
}


class CenterKeyScheme(OpenApiAuthenticationExtension):
    target_class = "centers.auth.CenterKeyAuthentication"
    name = "centerKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A center's API key (`manage.py issue_key <center>`), as `Authorization: Bearer <key>`.",
        }


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="One sentence for the people running the agent.")


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """The {"error": ...} answers of an operation, with those every keyed request can get."""
    wanted = sorted({401, 429, 503, *statuses})
    return {code: OpenApiResponse(ErrorSerializer, description=ERROR_DESCRIPTIONS[code]) for code in wanted}
