"""Clinician pages: thin views over studies.selectors, every patient-data access audited."""

from functools import wraps

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from centers.models import Membership
from centers.services import audit_record
from routing import selectors as routing_selectors
from routing.selectors import webhook_trouble
from routing.services import instance_open
from studies import rendering, selectors, services

PAGE_SIZE = 50
THUMBNAIL_SIZE = 192
MAX_RENDER_SIZE = 4096
# Common CT presets (center, width) in Hounsfield units.
WINDOW_PRESETS = [
    ("Soft tissue", 40, 400),
    ("Lung", -600, 1500),
    ("Bone", 300, 1500),
    ("Brain", 40, 80),
]
SORT_CHOICES = [
    ("-received", "Newest received"),
    ("received", "Oldest received"),
    ("-date", "Newest study date"),
    ("date", "Oldest study date"),
    ("patient", "Patient name"),
    ("patient_id", "Patient ID"),
    ("source", "Source center"),
    ("-instances", "Most instances"),
]


def center_required(view):
    """Log in first; a user with no center sees a message and nothing else."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        membership = getattr(request.user, "membership", None)
        if membership is None or not membership.center.is_active:
            return render(request, "studies/no_center.html", status=403)
        request.center = membership.center
        return view(request, *args, **kwargs)

    return wrapper


def _address(request) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


def _audit(request, action: str, obj, **detail) -> None:
    audit_record(
        action=action, center=request.center, user=request.user, obj=obj, address=_address(request), detail=detail
    )


class StudyFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Patient name or ID", max_length=100)
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    modality = forms.CharField(required=False, max_length=16)
    source = forms.TypedChoiceField(required=False, coerce=int, empty_value=None, label="Source center")
    sort = forms.ChoiceField(required=False, choices=SORT_CHOICES)

    def __init__(self, *args, sources=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["source"].choices = [("", "All centers")] + [(c.pk, c.name) for c in sources]

    def filters(self) -> selectors.StudyFilters:
        data = self.cleaned_data if self.is_valid() else {}
        return selectors.StudyFilters(
            query=data.get("q") or "",
            date_from=data.get("date_from"),
            date_to=data.get("date_to"),
            modality=(data.get("modality") or "").strip().upper(),
            source_center_id=data.get("source"),
            sort=data.get("sort") or "-received",
        )


def home(request):
    return redirect("studies:received")


@require_GET
@center_required
def received(request):
    form = StudyFilterForm(request.GET or None, sources=selectors.source_centers_for(center=request.center))
    filters = form.filters()
    page = Paginator(selectors.studies_received(center=request.center, filters=filters), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    ids = [study.pk for study in page]
    modalities = selectors.study_modalities(study_ids=ids, center=request.center)
    failed = selectors.failed_counts(study_ids=ids, center=request.center)
    marks = selectors.delivery_marks(study_ids=ids, center=request.center)
    rows = [
        {
            "study": study,
            "modalities": modalities.get(study.pk, []),
            "arriving": selectors.is_arriving(study.received_at),
            "failed": failed.get(study.pk, 0),
            "marks": marks.get(study.pk, {}),
        }
        for study in page
    ]
    if filters.query:
        _audit(request, "study.search", None, query=filters.query, results=page.paginator.count)
    return render(
        request,
        "studies/received.html",
        {
            "form": form,
            "page": page,
            "rows": rows,
            "query": _query(request),
            "failed_incoming": selectors.failed_incoming(center=request.center),
        },
    )


@require_GET
@center_required
def sent(request):
    form = StudyFilterForm(request.GET or None)
    page = Paginator(selectors.studies_sent(center=request.center, filters=form.filters()), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    ids = [study.pk for study in page]
    modalities = selectors.study_modalities(study_ids=ids)
    recipients = selectors.recipients_by_study(study_ids=ids)
    unrouted = selectors.unrouted_counts(study_ids=ids)
    rows = [
        {
            "study": study,
            "modalities": modalities.get(study.pk, []),
            "recipients": recipients.get(study.pk, []),
            "unrouted": unrouted.get(study.pk, 0),
        }
        for study in page
    ]
    return render(request, "studies/sent.html", {"form": form, "page": page, "rows": rows, "query": _query(request)})


def _query(request) -> str:
    """The current filters, to keep them across pages."""
    params = request.GET.copy()
    params.pop("page", None)
    return params.urlencode()


@require_GET
@center_required
def dashboard(request):
    data = selectors.center_dashboard(center=request.center)
    beats = [agent.heartbeat for agent in data.agents]
    failures = {
        "set_aside": sum(beat.failed for beat in beats),
        "retrying": sum(beat.retrying for beat in beats),
        "last": max((beat.last_failure_at for beat in beats if beat.last_failure_at), default=None),
    }
    return render(
        request,
        "studies/dashboard.html",
        {
            "dashboard": data,
            "failures": failures,
            "hourly": _chart(data.hourly, "%H:%M"),
            "daily": _chart(data.daily, "%d %b"),
            "webhooks": webhook_trouble(center=request.center),
        },
    )


def _chart(buckets, label_format: str) -> dict:
    """Bar geometry for an inline SVG: two bars (received, sent) per bucket, for counts and megabytes."""
    width, height = 720, 160
    slot = width / max(len(buckets), 1)
    charts = {}
    for name, received_attr, sent_attr, scale in (
        ("instances", "received_count", "sent_count", 1),
        ("megabytes", "received_bytes", "sent_bytes", 1024 * 1024),
    ):
        values = [(getattr(b, received_attr) / scale, getattr(b, sent_attr) / scale) for b in buckets]
        shown = int if scale == 1 else (lambda v: round(v, 1))
        peak = max([max(pair) for pair in values] + [0])
        bars = []
        for i, (bucket, (got, gave)) in enumerate(zip(buckets, values, strict=True)):
            x = i * slot
            for offset, value, kind in ((0.1, got, "received"), (0.5, gave, "sent")):
                h = 0 if not peak else value / peak * (height - 20)
                bars.append(
                    {
                        "x": round(x + slot * offset, 1),
                        "y": round(height - h, 1),
                        "w": round(slot * 0.4, 1),
                        "h": round(h, 1),
                        "kind": kind,
                        "title": f"{bucket.start.strftime(label_format)} {kind}: {shown(value)}",
                    }
                )
        # Each label starts where its bucket's first bar starts. Centred under a narrow bucket,
        # the first one reached past the chart's left edge and lost its first digit ("0 Oct").
        labels = [
            {"x": round(i * slot + slot * 0.1, 1), "text": b.start.strftime(label_format)}
            for i, b in enumerate(buckets)
            if i % max(len(buckets) // 6, 1) == 0
        ]
        charts[name] = {
            "bars": bars,
            "labels": labels,
            "peak": shown(peak),
            "width": width,
            "height": height,
            "total_received": shown(sum(v[0] for v in values)),
            "total_sent": shown(sum(v[1] for v in values)),
        }
    return charts


@require_GET
@center_required
def study_detail(request, study_uid: str):
    study = selectors.study_get_for_center(center=request.center, study_uid=study_uid)
    if study is None:
        raise Http404("No such study")
    series = selectors.study_series(center=request.center, study=study)
    _audit(request, "study.view", study, study_instance_uid=study.study_instance_uid)
    return render(request, "studies/study.html", {"study": study, "series_list": series})


@require_GET
@center_required
def series_viewer(request, series_uid: str):
    series = selectors.series_get_for_center(center=request.center, series_uid=series_uid)
    if series is None:
        raise Http404("No such series")
    instances = selectors.series_instances(center=request.center, series=series)
    slices, summaries = [], {}
    for instance in instances:
        summary = rendering.instance_summary(instance)
        summaries[instance.sop_instance_uid] = summary
        for frame in range(summary["frames"]):
            slices.append({"sop": instance.sop_instance_uid, "frame": frame})
    _audit(request, "series.view", series, series_instance_uid=series.series_instance_uid, instances=len(instances))
    viewer = {"slices": slices, "summaries": summaries, "presets": WINDOW_PRESETS}
    return render(
        request,
        "studies/viewer.html",
        {"series": series, "study": series.study, "viewer": viewer, "presets": WINDOW_PRESETS, "count": len(slices)},
    )


def _window(request) -> tuple[float, float] | None:
    try:
        center, width = float(request.GET["wc"]), float(request.GET["ww"])
    except (KeyError, ValueError):
        return None
    if not (-1e6 < center < 1e6 and 0 < width < 1e6):
        return None
    return center, width


def _image_response(data: bytes, fmt: str) -> HttpResponse:
    response = HttpResponse(data, content_type=rendering.media_type(fmt))
    # Private: patient images must not land in shared caches.
    response["Cache-Control"] = "private, max-age=3600"
    return response


@require_GET
@center_required
def frame_image(request, sop_uid: str, frame: int):
    instance = selectors.instance_get_for_center(center=request.center, sop_uid=sop_uid)
    if instance is None:
        raise Http404("No such instance")
    fmt = "jpeg" if request.GET.get("fmt") in ("jpeg", "jpg") else "png"
    try:
        size = min(int(request.GET["size"]), MAX_RENDER_SIZE) if request.GET.get("size") else None
    except ValueError:
        size = None
    window = _window(request)
    try:
        data = rendering.render_instance(instance, frame=frame, size=size, window=window, fmt=fmt)
    except rendering.RenderError:
        # Still 404 (nothing to show), but with an image the viewer's <img> displays instead of breaking.
        return _placeholder_response(size or THUMBNAIL_SIZE * 2, fmt, "Cannot be shown")
    _audit(request, "image.view", instance, frame=frame, size=size, window=window)
    return _image_response(data, fmt)


@require_GET
@center_required
def series_thumbnail(request, series_uid: str):
    series = selectors.series_get_for_center(center=request.center, series_uid=series_uid)
    if series is None:
        raise Http404("No such series")
    instances = selectors.series_instances(center=request.center, series=series)
    # The middle slice shows anatomy; the first is often an edge of the volume.
    for instance in instances[len(instances) // 2 :] + instances[: len(instances) // 2]:
        try:
            data = rendering.render_instance(instance, frame=0, size=THUMBNAIL_SIZE, fmt="jpeg")
        except rendering.RenderError:
            continue
        _audit(request, "image.view", instance, thumbnail=True, series_instance_uid=series_uid)
        return _image_response(data, "jpeg")
    return _placeholder_response(THUMBNAIL_SIZE, "jpeg", "No preview")


def _placeholder_response(size: int, fmt: str, message: str) -> HttpResponse:
    response = HttpResponse(
        rendering.placeholder(size=min(size, 512), fmt=fmt, message=message),
        status=404,
        content_type=rendering.media_type(fmt),
    )
    response["Cache-Control"] = "private, no-cache"
    return response


@require_GET
@center_required
def download_instance(request, sop_uid: str):
    instance = selectors.instance_get_for_center(center=request.center, sop_uid=sop_uid)
    if instance is None:
        raise Http404("No such instance")
    _audit(request, "download.instance", instance, size=instance.size)
    return FileResponse(
        instance_open(instance),
        as_attachment=True,
        filename=services.instance_filename(instance),
        content_type="application/dicom",
    )


@require_GET
@center_required
def download_series(request, series_uid: str):
    series = selectors.series_get_for_center(center=request.center, series_uid=series_uid)
    if series is None:
        raise Http404("No such series")
    instances = selectors.series_instances(center=request.center, series=series)
    for instance in instances:
        instance.series = series
    root = services.study_folder(series.study)
    _audit(request, "download.series", series, instances=len(instances))
    return _zip_response(services.zip_stream(instances=instances, root=root), f"{services.series_folder(instances[0])}")


@require_GET
@center_required
def download_study(request, study_uid: str):
    study = selectors.study_get_for_center(center=request.center, study_uid=study_uid)
    if study is None:
        raise Http404("No such study")
    instances = list(selectors.study_instances(center=request.center, study=study))
    _audit(request, "download.study", study, instances=len(instances))
    root = services.study_folder(study)
    return _zip_response(services.zip_stream(instances=instances, root=root), root.replace("/", "_"))


def _zip_response(archive, name: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse(archive, content_type="application/zip")
    response["Content-Length"] = str(len(archive))
    response["Content-Disposition"] = f'attachment; filename="{name}.zip"'
    return response


class PseudonymLookupForm(forms.Form):
    q = forms.CharField(label="Original or pseudonym (Patient ID or UID)", max_length=64, required=False)


@require_GET
@center_required
def pseudonyms(request):
    """What a de-identifying recipient knows this center's patients and UIDs as: its administrators only."""
    if request.user.membership.role != Membership.Role.CENTER_ADMIN:
        raise PermissionDenied("Only the center's administrators may look up pseudonyms.")
    form = PseudonymLookupForm(request.GET or None)
    query = form.cleaned_data["q"].strip() if form.is_valid() else ""
    found = routing_selectors.pseudonyms_find(publisher=request.center, query=query) if query else []
    if query:
        _audit(request, "pseudonym.lookup", None, query=query, results=len(found))
    return render(request, "studies/pseudonyms.html", {"form": form, "query": query, "found": found})
