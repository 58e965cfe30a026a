"""DICOMweb (PS3.18) on the portal: STOW-RS, QIDO-RS, WADO-RS and WADO-URI.

Plain Django views rather than REST framework: bodies are multipart streams
read and written by hand, and every answer's media type is negotiated here.
A caller is a center, through its API key (Bearer) or a logged-in clinician's
session, and sees only what selectors.instances_visible allows; anything else
answers exactly like an unknown UID.
"""

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import AuthenticationFailed

from centers.auth import CenterKeyAuthentication
from centers.models import ApiKey, Center
from centers.services import audit_record
from dicomweb import qido, selectors
from dicomweb.metadata import (
    PIXEL_DATA,
    FrameNotFound,
    bulk_value,
    frames_read,
    instance_chunks,
    instance_file,
    instance_header,
    instance_metadata,
)
from dicomweb.multipart import (
    MalformedMultipart,
    MultipartReader,
    Part,
    media_type_params,
    multipart_stream,
    new_boundary,
)
from routing import batch
from routing.batch import PartResult
from routing.dicom import DicomHeader
from routing.models import Instance, Priority
from routing.services import IngestError, InstanceConflict, InvalidUpload, UploadTooLarge
from studies.dicomread import integer

logger = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# Store failure reasons (PS3.18 table I.2-1, PS3.4 annex GG).
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Caller:
    center: Center
    api_key: ApiKey | None = None
    user: AbstractBaseUser | None = None


class Problem(Exception):
    """An answer other than success: status and a sentence for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> HttpResponse:
    response = HttpResponse(json.dumps({"error": message}), status=status, content_type="application/json")
    # PS3.18 8.6.2: the reason also travels as a Warning header, which DICOMweb clients log.
    response["Warning"] = f'299 dicomweb "{_header_safe(message)}"'
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


def _header_safe(text: str) -> str:
    flat = " ".join(text.split()).replace('"', "'")
    return flat.encode("ascii", "replace").decode()[:300]


def _dicom_json(body, status: int = 200) -> HttpResponse:
    return HttpResponse(json.dumps(body), status=status, content_type=DICOM_JSON)


def _caller(request: HttpRequest) -> Caller:
    try:
        found = CenterKeyAuthentication().authenticate(request)
    except AuthenticationFailed as exc:
        raise Problem(401, str(exc.detail)) from None
    if found is not None:
        agent, api_key = found
        return Caller(center=agent.center, api_key=api_key)
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        membership = getattr(user, "membership", None)
        if membership is not None and membership.center.is_active:
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                # The view is csrf_exempt for key holders; a browser session still needs the token.
                rejected = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                if rejected is not None:
                    raise Problem(403, "CSRF verification failed for this session.")
            return Caller(center=membership.center, user=user)
        raise Problem(403, "This user does not belong to an active center.")
    raise Problem(401, "An API key (Authorization: Bearer <key>) or a portal login is required.")


def _address(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def _audit(request: HttpRequest, caller: Caller, action: str, **kwargs) -> None:
    audit_record(
        action=action,
        center=caller.center,
        api_key=caller.api_key,
        user=caller.user,
        address=_address(request),
        **kwargs,
    )


def base_url(request: HttpRequest) -> str:
    root = settings.PORTAL_PUBLIC_URL or request.build_absolute_uri("/").rstrip("/")
    return f"{root}/dicomweb"


def dicomweb_view(methods: tuple[str, ...]):
    """Authenticate, allow only `methods`, and turn Problems into DICOMweb error answers."""

    def decorate(view):
        @csrf_exempt
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if request.method not in methods:
                response = _error(405, f"{request.method} is not supported here.")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                caller = _caller(request)
                return view(request, caller, *args, **kwargs)
            except Problem as problem:
                return _error(problem.status, problem.message)

        wrapped.__name__ = view.__name__
        wrapped.__doc__ = view.__doc__
        return wrapped

    return decorate


# -- content negotiation ----------------------------------------------------------


def _accept_items(request: HttpRequest) -> list[tuple[str, dict[str, str]]]:
    header = request.META.get("HTTP_ACCEPT", "").strip()
    if not header:
        return [("*/*", {})]
    return [media_type_params(item) for item in header.split(",") if item.strip()]


def _syntax_ok(requested: str | None, stored: set[str]) -> bool:
    # Instances go out as stored: any syntax, or exactly the stored one.
    return requested in (None, "", "*") or stored <= {requested}


def _negotiate(request: HttpRequest, part_type: str, stored: set[str], *, single_ok: bool) -> str:
    """'multipart' or 'single' for what the Accept header allows; 406 when nothing fits."""
    major = part_type.split("/")[0]
    for media_type, params in _accept_items(request):
        if media_type in ("*/*", "multipart/*"):
            return "multipart"
        if media_type == "multipart/related":
            wanted = params.get("type", part_type).lower()
            if wanted in (part_type, "*/*", f"{major}/*") and _syntax_ok(params.get("transfer-syntax"), stored):
                return "multipart"
        elif single_ok and media_type in (part_type, f"{major}/*"):
            if _syntax_ok(params.get("transfer-syntax"), stored):
                return "single"
    accepted = request.META.get("HTTP_ACCEPT", "")
    raise Problem(
        406,
        f'Cannot answer with {accepted!r}: this resource is served as multipart/related; type="{part_type}" '
        f"in its stored transfer syntax ({', '.join(sorted(stored))}).",
    )


def _frames_syntax_ok(requested: str | None, stored: str) -> bool:
    if requested in (None, "", "*", stored):
        return True
    return requested == EXPLICIT_LE and stored == IMPLICIT_LE


def _negotiate_frames(request: HttpRequest, stored: str, encapsulated: bool) -> str:
    for media_type, params in _accept_items(request):
        if media_type in ("*/*", "multipart/*"):
            return "multipart"
        if media_type == "multipart/related":
            wanted = params.get("type", "application/octet-stream").lower()
            requested = params.get("transfer-syntax")
            if wanted in ("application/octet-stream", "*/*") and _frames_syntax_ok(requested, stored):
                return "multipart"
            if encapsulated and wanted.startswith(("image/", "video/")) and requested in (None, "*", stored):
                return "multipart"
    raise Problem(
        406,
        f"The frames are stored in transfer syntax {stored} and are served only as stored "
        '(Accept: multipart/related; type="application/octet-stream"; transfer-syntax=*).',
    )


# -- STOW-RS ------------------------------------------------------------------------


def _body_stream(request: HttpRequest):
    # Under WSGI a chunked body has no Content-Length and Django's own stream
    # reads as empty; the server's input stream is already de-chunked.
    if not request.META.get("CONTENT_LENGTH") and "wsgi.input" in request.META:
        return request.META["wsgi.input"]
    return request


def _item(tag: int, vr: str, value) -> dict:
    return {f"{tag:08X}": {"vr": vr, "Value": [value]}} if value not in (None, "") else {f"{tag:08X}": {"vr": vr}}


class StudyMismatch(IngestError):
    """An instance of another study than the STOW-RS URL names."""

    status = 409


class _GuardedPart:
    """A body part for routing.batch: a malformed body refuses the part it cuts short, never the batch."""

    def __init__(self, part: Part) -> None:
        self._part = part

    @property
    def content_type(self) -> str:
        return self._part.content_type

    @property
    def done(self) -> bool:
        return self._part.done

    def read(self, size: int = -1) -> bytes:
        try:
            return self._part.read(size)
        except MalformedMultipart as exc:
            raise InvalidUpload(f"the body is malformed: {exc}") from None


class _StowParts:
    """The parts of a STOW-RS body, up to a malformation, if any.

    The parts before it are still stored, as their own answers say; the part it cuts
    short is refused (a truncated instance is never stored).
    """

    def __init__(self, reader: MultipartReader) -> None:
        self._reader = reader
        self._last: _GuardedPart | None = None
        self.malformed: MalformedMultipart | None = None
        self.cut = False

    def __iter__(self) -> Iterator[_GuardedPart]:
        try:
            for part in self._reader:
                self._last = _GuardedPart(part)
                yield self._last
        except MalformedMultipart as exc:
            self.malformed = exc
            self.cut = self._last is not None and not self._last.done


def _stored(instance: Instance, base: str) -> dict:
    return {
        **_item(0x00081150, "UI", instance.sop_class_uid),
        **_item(0x00081155, "UI", instance.sop_instance_uid),
        **_item(0x00081190, "UR", _instance_url(base, instance)),
    }


def _failed(sop_class: str | None, sop_uid: str | None, code: int) -> dict:
    return {
        **_item(0x00081150, "UI", sop_class),
        **_item(0x00081155, "UI", sop_uid),
        **_item(0x00081197, "US", code),
    }


def _failure_code(refusal: IngestError | None) -> int:
    if isinstance(refusal, StudyMismatch):
        return DOES_NOT_MATCH
    if isinstance(refusal, UploadTooLarge):
        return OUT_OF_RESOURCES
    if isinstance(refusal, InstanceConflict):
        return DUPLICATE_SOP_INSTANCE
    return CANNOT_UNDERSTAND


def _study_check(study_uid: str | None) -> Callable[[DicomHeader], None] | None:
    if not study_uid:
        return None

    def admit(header: DicomHeader) -> None:
        if header.study_instance_uid != study_uid:
            raise StudyMismatch(
                f"instance {header.sop_instance_uid} belongs to study {header.study_instance_uid}, not {study_uid}"
            )

    return admit


def _stow(request: HttpRequest, caller: Caller, study_uid: str | None) -> HttpResponse:
    """Store the body's instances through routing.batch, a thousand at most per transaction.

    Each batch is one fsync wave, one transaction with one audit INSERT and one
    fan-out message; every part still has its own answer.
    """
    if not caller.center.may_publish:
        raise Problem(403, "This center is not allowed to publish images.")
    media_type, params = media_type_params(request.META.get("CONTENT_TYPE", ""))
    if media_type != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
        raise Problem(415, 'Send instances as multipart/related; type="application/dicom".')
    boundary = params.get("boundary")
    if not boundary:
        raise Problem(400, "The multipart/related Content-Type has no boundary.")
    # As POST /api/v1/instances?priority=: every instance of the request is stat or routine.
    labels = {label: value for value, label in Priority.choices}
    raw = request.GET.get("priority") or "routine"
    if raw not in labels:
        raise Problem(400, f"'priority' must be one of {', '.join(labels)}, not {raw[:40]!r}.")
    try:
        body = _StowParts(MultipartReader(_body_stream(request), boundary))
    except MalformedMultipart as exc:
        raise Problem(400, f"The body is not a valid multipart/related message: {exc}") from None
    parts = iter(body)
    results: list[PartResult] = []
    while True:
        # Past batch.MAX_PARTS (open files until the fsync wave), the rest goes in the next batch.
        stored = batch.instances_ingest(
            parts=islice(parts, batch.MAX_PARTS),
            api_key=caller.api_key,
            center=caller.center,
            user=caller.user,
            address=_address(request),
            priority=labels[raw],
            admit=_study_check(study_uid),
        )
        results += stored
        if len(stored) < batch.MAX_PARTS:
            break
    base = base_url(request)
    referenced, failed, reasons, studies = [], [], [], set()
    if body.malformed is not None and body.cut:
        results.pop()  # answered below as the malformed body
    for result in results:
        if result.instance is not None:
            referenced.append(_stored(result.instance, base))
            studies.add(f"{base}/studies/{result.instance.series.study.study_instance_uid}")
        else:
            header = result.header
            code = _failure_code(result.refusal)
            failed.append(_failed(header and header.sop_class_uid, header and header.sop_instance_uid, code))
            reasons.append(result.error)
    if body.malformed is not None:
        if not results:
            raise Problem(400, f"The body is not a valid multipart/related message: {body.malformed}")
        failed.append(_failed(None, None, CANNOT_UNDERSTAND))
        reasons.append(f"the body is malformed: {body.malformed}")
    if not referenced and not failed:
        raise Problem(400, "The multipart/related body holds no instance.")
    body_json: dict = {}
    if study_uid:
        body_json.update(_item(0x00081190, "UR", f"{base}/studies/{study_uid}"))
    elif len(studies) == 1:
        body_json.update(_item(0x00081190, "UR", studies.pop()))
    if referenced:
        body_json["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body_json["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else 409 if not referenced else 202
    if status == 202:
        # PS3.18 10.5.3.1: a partial store carries a warning reason (B000-class: some not stored).
        body_json.update(_item(0x00081196, "US", 0xB000))
    response = _dicom_json(dict(sorted(body_json.items())), status=status)
    if reasons:
        response["Warning"] = ", ".join(f'299 dicomweb "{_header_safe(r)}"' for r in reasons[:20])
        logger.info("STOW from %s: %d stored, %d failed: %s", caller.center.slug, len(referenced), len(failed), reasons)
    return response


# -- QIDO-RS ------------------------------------------------------------------------


def _search(request: HttpRequest, caller: Caller, level: str, study_uid=None, series_uid=None) -> HttpResponse:
    try:
        query = qido.query_parse(request.GET, level=level)
        rows = qido.query_run(query, center=caller.center, study_uid=study_uid, series_uid=series_uid)
        documents = qido.results_json(
            query, rows, center=caller.center, base=base_url(request), study_uid=study_uid, series_uid=series_uid
        )
    except qido.QueryError as exc:
        raise Problem(400, str(exc)) from None
    _audit(
        request,
        caller,
        "dicomweb.search",
        object_type=level,
        object_id=series_uid or study_uid or "",
        detail={"query": request.GET.urlencode()[:1000], "results": len(documents)},
    )
    response = _dicom_json(documents)
    if query.ignored:
        response["Warning"] = f'299 dicomweb "These keys are not matched at this level: {", ".join(query.ignored)}"'
    return response


# -- WADO-RS --------------------------------------------------------------------------


def _instances_or_404(caller: Caller, study: str, series: str | None = None, instance: str | None = None):
    instances = list(selectors.instances_in(center=caller.center, study_uid=study, series_uid=series, sop_uid=instance))
    if not instances:
        what = "instance" if instance else "series" if series else "study"
        raise Problem(404, f"No such {what}.")
    return instances


def _retrieve(request: HttpRequest, caller: Caller, study: str, series=None, instance=None) -> HttpResponse:
    instances = _instances_or_404(caller, study, series, instance)
    stored = {i.transfer_syntax_uid for i in instances}
    shape = _negotiate(request, "application/dicom", stored, single_ok=instance is not None)
    _audit_retrieve(request, caller, "dicomweb.retrieve", instances, study, series, instance)
    if shape == "single":
        only = instances[0]
        response = StreamingHttpResponse(instance_chunks(only), content_type="application/dicom")
        response["Content-Length"] = str(only.size)
        return response
    boundary = new_boundary()
    parts = (
        (
            {
                "Content-Type": f"application/dicom; transfer-syntax={i.transfer_syntax_uid}",
                "Content-Length": str(i.size),
            },
            instance_chunks(i),
        )
        for i in instances
    )
    return StreamingHttpResponse(
        multipart_stream(parts, boundary),
        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def _audit_retrieve(request, caller: Caller, action: str, instances, study, series, instance) -> None:
    _audit(
        request,
        caller,
        action,
        object_type="instance" if instance else "series" if series else "study",
        object_id=(instance or series or study)[:128],
        detail={"instances": len(instances)},
    )


def _metadata(request: HttpRequest, caller: Caller, study: str, series=None, instance=None) -> HttpResponse:
    instances = _instances_or_404(caller, study, series, instance)
    for media_type, _ in _accept_items(request):
        if media_type in ("*/*", "application/*", DICOM_JSON, "application/json"):
            break
    else:
        raise Problem(406, "Metadata is served as application/dicom+json.")
    base = base_url(request)
    documents = [instance_metadata(i, instance_url=_instance_url(base, i)) for i in instances]
    _audit_retrieve(request, caller, "dicomweb.metadata", instances, study, series, instance)
    return _dicom_json(documents)


def _instance_url(base: str, instance: Instance) -> str:
    series = instance.series
    return (
        f"{base}/studies/{series.study.study_instance_uid}/series/{series.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise Problem(400, f"{text!r} is not a list of frame numbers (1, 2, ...).") from None
    if not numbers or any(n < 1 for n in numbers):
        raise Problem(400, "Frame numbers start at 1.")
    return numbers


def _frames_response(request, caller: Caller, instance: Instance, numbers: list[int] | None) -> HttpResponse:
    try:
        source, frames = frames_read(instance, numbers)
    except FrameNotFound as exc:
        raise Problem(404, str(exc)) from None
    _negotiate_frames(request, source.transfer_syntax_uid, source.encapsulated)
    _audit(
        request,
        caller,
        "dicomweb.frames",
        obj=instance,
        detail={"frames": numbers[:50] if numbers else "all"},
    )
    boundary = new_boundary()
    part_type = f"application/octet-stream; transfer-syntax={source.transfer_syntax_uid}"
    parts = (({"Content-Type": part_type}, [frame]) for frame in frames)
    return StreamingHttpResponse(
        multipart_stream(parts, boundary),
        content_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
    )


def _rendered(request, caller: Caller, instance: Instance, *, frame: int, thumbnail: bool) -> HttpResponse:
    from studies.rendering import RenderError, render_frame

    fmt = None
    for media_type, _ in _accept_items(request):
        if media_type in ("image/jpeg", "image/jpg"):
            fmt = "jpeg"
        elif media_type == "image/png":
            fmt = "png"
        elif media_type in ("*/*", "image/*"):
            fmt = "jpeg" if thumbnail else "png"
        if fmt:
            break
    if fmt is None:
        raise Problem(406, "Rendered images are served as image/jpeg or image/png.")
    size = 128 if thumbnail else None
    if "viewport" in request.GET:
        try:
            size = max(int(v) for v in request.GET["viewport"].split(",")[:2])
        except ValueError:
            raise Problem(400, "viewport must be width,height.") from None
    window = None
    if "window" in request.GET:
        try:
            center, width = (float(v) for v in request.GET["window"].split(",")[:2])
        except ValueError:
            raise Problem(400, "window must be center,width[,function].") from None
        window = (center, width)
    # As the renderer reads it: a frame count that is not a number means one frame.
    count = max(integer(instance_header(instance), "NumberOfFrames") or 1, 1)
    if frame > count:
        raise Problem(404, f"Frame {frame} does not exist: the instance has {count} frame(s).")
    try:
        with instance_file(instance) as handle:
            image = render_frame(handle, frame=frame - 1, size=size, window=window, fmt=fmt)
    except RenderError as exc:
        # PS3.18 8.3.5: what cannot be rendered in the asked-for type is Not Acceptable.
        raise Problem(406, f"This instance cannot be rendered: {exc}") from None
    _audit(request, caller, "dicomweb.rendered", obj=instance, detail={"frame": frame, "thumbnail": thumbnail})
    return HttpResponse(image, content_type="image/jpeg" if fmt == "jpeg" else "image/png")


# -- the resources ------------------------------------------------------------------


@dicomweb_view(("GET", "POST"))
def studies(request, caller):
    if request.method == "POST":
        return _stow(request, caller, None)
    return _search(request, caller, qido.STUDY)


@dicomweb_view(("GET", "POST"))
def study(request, caller, study):
    if request.method == "POST":
        return _stow(request, caller, study)
    return _retrieve(request, caller, study)


@dicomweb_view(("GET",))
def study_metadata(request, caller, study):
    return _metadata(request, caller, study)


@dicomweb_view(("GET",))
def study_series(request, caller, study):
    return _search(request, caller, qido.SERIES, study_uid=study)


@dicomweb_view(("GET",))
def study_instances(request, caller, study):
    return _search(request, caller, qido.INSTANCE, study_uid=study)


@dicomweb_view(("GET",))
def all_series(request, caller):
    return _search(request, caller, qido.SERIES)


@dicomweb_view(("GET",))
def all_instances(request, caller):
    return _search(request, caller, qido.INSTANCE)


@dicomweb_view(("GET",))
def series(request, caller, study, series):
    return _retrieve(request, caller, study, series)


@dicomweb_view(("GET",))
def series_metadata(request, caller, study, series):
    return _metadata(request, caller, study, series)


@dicomweb_view(("GET",))
def series_instances(request, caller, study, series):
    return _search(request, caller, qido.INSTANCE, study_uid=study, series_uid=series)


@dicomweb_view(("GET",))
def series_thumbnail(request, caller, study, series):
    instances = _instances_or_404(caller, study, series)
    return _rendered(request, caller, instances[len(instances) // 2], frame=1, thumbnail=True)


@dicomweb_view(("GET",))
def instance(request, caller, study, series, instance):
    return _retrieve(request, caller, study, series, instance)


@dicomweb_view(("GET",))
def instance_metadata_view(request, caller, study, series, instance):
    return _metadata(request, caller, study, series, instance)


@dicomweb_view(("GET",))
def instance_rendered(request, caller, study, series, instance):
    found = _instances_or_404(caller, study, series, instance)[0]
    return _rendered(request, caller, found, frame=1, thumbnail=False)


@dicomweb_view(("GET",))
def instance_thumbnail(request, caller, study, series, instance):
    found = _instances_or_404(caller, study, series, instance)[0]
    return _rendered(request, caller, found, frame=1, thumbnail=True)


@dicomweb_view(("GET",))
def frames(request, caller, study, series, instance, frames):
    found = _instances_or_404(caller, study, series, instance)[0]
    return _frames_response(request, caller, found, _frame_numbers(frames))


@dicomweb_view(("GET",))
def frames_rendered(request, caller, study, series, instance, frames):
    found = _instances_or_404(caller, study, series, instance)[0]
    return _rendered(request, caller, found, frame=_frame_numbers(frames)[0], thumbnail=False)


@dicomweb_view(("GET",))
def bulk(request, caller, study, series, instance, tag):
    found = _instances_or_404(caller, study, series, instance)[0]
    try:
        number = int(tag, 16)
    except ValueError:
        raise Problem(400, f"{tag!r} is not a tag (8 hexadecimal digits).") from None
    if number == PIXEL_DATA:
        return _frames_response(request, caller, found, None)
    try:
        value = bulk_value(found, number)
    except FrameNotFound as exc:
        raise Problem(404, str(exc)) from None
    _negotiate(request, "application/octet-stream", {EXPLICIT_LE}, single_ok=True)
    _audit(request, caller, "dicomweb.bulkdata", obj=found, detail={"tag": tag})
    boundary = new_boundary()
    return StreamingHttpResponse(
        multipart_stream([({"Content-Type": "application/octet-stream"}, [value])], boundary),
        content_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
    )


@dicomweb_view(("GET",))
def wado_uri(request, caller):
    """WADO-URI (PS3.18 chapter 9) for older viewers: one object, as DICOM or rendered."""
    params = request.GET
    if params.get("requestType") != "WADO":
        raise Problem(400, "requestType=WADO is required.")
    missing = [name for name in ("studyUID", "seriesUID", "objectUID") if not params.get(name)]
    if missing:
        raise Problem(400, f"Missing parameter(s): {', '.join(missing)}.")
    found = _instances_or_404(caller, params["studyUID"], params["seriesUID"], params["objectUID"])[0]
    content_types = [media_type_params(v)[0] for v in params.get("contentType", "image/jpeg").split(",")]
    if "application/dicom" in content_types:
        requested = params.get("transferSyntax")
        if requested and requested != found.transfer_syntax_uid:
            raise Problem(406, f"The object is stored in {found.transfer_syntax_uid} and served only so.")
        _audit(request, caller, "dicomweb.retrieve", obj=found, detail={"wado_uri": True})
        response = StreamingHttpResponse(instance_chunks(found), content_type="application/dicom")
        response["Content-Length"] = str(found.size)
        return response
    if not {"image/jpeg", "image/png", "*/*", "image/*"} & set(content_types):
        raise Problem(406, "WADO-URI answers application/dicom, image/jpeg or image/png.")
    frame = params.get("frameNumber", "1")
    if not frame.isdigit() or int(frame) < 1:
        raise Problem(400, "frameNumber must be a whole number from 1.")
    request.META["HTTP_ACCEPT"] = "image/png" if content_types[0] == "image/png" else "image/jpeg"
    return _rendered(request, caller, found, frame=int(frame), thumbnail=False)
