"""Fault injection for tests only: the portal answers 500 to chosen uploads, as a bug in ingest would.

Off unless DICOM_FAULT_500_SOP_UIDS names SOP Instance UIDs; never set it in production.
The agent's tests use it to show that one file the portal cannot take stops no other file.
"""

import io
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseServerError
from pydicom import dcmread

from portal.bridge import RECEIVED_BODY

UPLOAD_PATH = "/api/v1/instances"


class Fail500ForSopInstances:
    """Answers an upload of a listed SOP Instance UID with Django's own HTML 500 page, before ingest sees it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.sop_instance_uids = frozenset(settings.DICOM_FAULT_500_SOP_UIDS)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST" and request.path == UPLOAD_PATH:
            received = request.META.get(RECEIVED_BODY)
            if received is not None:
                # A batch the event loop received: each part is already a file of its own.
                uids = [sop_instance_uid(Path(path).read_bytes()) for path in received.paths()]
            else:
                # The whole body, held in memory: acceptable for test files, and why this is test-only.
                data = request.read()
                request._stream = io.BytesIO(data)
                uids = sop_instance_uids(data, request.META.get("CONTENT_TYPE", ""))
            if self.sop_instance_uids & set(uids):
                return HttpResponseServerError("<h1>Server Error (500)</h1>")
        return self.get_response(request)


def sop_instance_uids(data: bytes, content_type: str) -> list[str | None]:
    """The UIDs of a single upload, or of each part of a batch (a bug in ingest fails the whole request)."""
    from dicomweb.multipart import MalformedMultipart, MultipartReader, media_type_params

    media_type, params = media_type_params(content_type)
    if media_type != "multipart/related" or not params.get("boundary"):
        return [sop_instance_uid(data)]
    try:
        return [sop_instance_uid(part.read()) for part in MultipartReader(io.BytesIO(data), params["boundary"])]
    except MalformedMultipart:
        return []


def sop_instance_uid(data: bytes) -> str | None:
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    # Whatever the file is, ingest itself will say what is wrong with it.
    except Exception:  # noqa: BLE001
        return None
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None
