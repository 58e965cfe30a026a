"""The clinician pages through Django's test client, on real uploads through the agent API."""

import hashlib
import io
import zipfile

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from PIL import Image
from pydicom.uid import generate_uid

from centers.models import AuditEvent
from routing.models import Delivery, Instance
from tests.dicomfiles import dicom_bytes
from tests.studies.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def series_of(study, modality):
    return next(series for mod, series, _ in study["files"].values() if mod == modality)


def test_an_anonymous_visitor_is_sent_to_the_login_page(client):
    response = client.get("/received/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/received/")


def test_a_clinician_logs_in_and_out(clinicians, network):
    browser = Client()
    assert browser.post("/login/", {"username": "dr-partner", "password": "wrong"}).status_code == 200
    response = browser.post("/login/", {"username": "dr-partner", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/received/"
    assert b"Tehran Hospital" in browser.get("/received/").content
    assert browser.post("/logout/").status_code == 302
    assert browser.get("/received/").status_code == 302


def test_a_user_without_a_center_sees_only_a_message(clinicians, study):
    for url in ("/received/", "/sent/", "/dashboard/", f"/studies/{study['uid']}/"):
        response = clinicians["nobody"].get(url)
        assert response.status_code == 403
        assert b"not linked to a center" in response.content
        assert b"PAT-777" not in response.content


def test_the_received_list_shows_one_row_per_study_with_its_counts(clinicians, study):
    page = clinicians["partner"].get("/received/").content.decode()
    assert page.count(f'data-study-uid="{study["uid"]}"') == 1
    row = page.split(f'data-study-uid="{study["uid"]}"')[1].split("</tr>")[0]
    assert "Rostami, Sara" in row and "PAT-777" in row and "2026-03-01" in row and "Head trauma" in row
    assert '<span class="tag">CT</span><span class="tag">MR</span>' in row
    assert "Shiraz Imaging" in row
    assert '<td class="num">2</td>' in row and '<td class="num">5</td>' in row
    assert "arriving" in row  # the last instance came in seconds ago


def test_search_and_filters_narrow_the_received_list(clinicians, study, agents):
    other = dicom_bytes("CT", patient_id="PAT-123", patient_name="Karimi^Ali", StudyDate="20250101")
    assert agents["own"].upload(other).status_code == 201
    partner = clinicians["partner"]

    def uids(**params):
        return partner.get("/received/", params).content.decode().count("data-study-uid=")

    assert uids() == 2
    assert uids(q="PAT-777") == 1
    assert uids(q="rostami sara") == 1
    assert uids(q="nobody-like-this") == 0
    assert uids(modality="mr") == 1
    assert uids(date_from="2026-01-01") == 1
    assert uids(date_to="2025-12-31") == 1
    assert uids(source=study_source_id(study)) == 2
    page = partner.get("/received/", {"sort": "patient"}).content.decode()
    assert page.index("Karimi, Ali") < page.index("Rostami, Sara")


def study_source_id(study):
    return Instance.objects.get(sop_instance_uid=next(iter(study["files"]))).source_center_id


def test_the_received_list_costs_the_same_queries_for_one_study_or_many(clinicians, agents):
    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert clinicians["partner"].get("/received/").status_code == 200
        return len(captured)

    assert agents["own"].upload(dicom_bytes("CT", patient_id="P-0")).status_code == 201
    one = queries()
    for n in range(1, 12):
        assert agents["own"].upload(dicom_bytes("MR" if n % 2 else "CT", patient_id=f"P-{n}")).status_code == 201
    assert queries() == one


def test_another_centers_user_cannot_reach_the_study_by_any_url(clinicians, study):
    sop = next(iter(study["files"]))
    series = series_of(study, "CT")
    urls = [
        f"/studies/{study['uid']}/",
        f"/studies/{study['uid']}/download.zip",
        f"/series/{series}/",
        f"/series/{series}/thumbnail.jpg",
        f"/series/{series}/download.zip",
        f"/instances/{sop}/frames/0",
        f"/instances/{sop}/download",
    ]
    for url in urls:
        assert clinicians["outsider"].get(url).status_code == 404, url
        assert clinicians["partner"].get(url).status_code == 200, url
    assert b"PAT-777" not in clinicians["outsider"].get("/received/").content


def test_the_study_page_lists_each_series_with_a_thumbnail_and_is_audited(clinicians, study, network):
    page = clinicians["partner"].get(f"/studies/{study['uid']}/", REMOTE_ADDR="10.1.2.3").content.decode()
    for modality in ("CT", "MR"):
        assert f"/series/{series_of(study, modality)}/thumbnail.jpg" in page
    thumb = clinicians["partner"].get(f"/series/{series_of(study, 'CT')}/thumbnail.jpg")
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "JPEG" and max(image.size) <= 192
    event = AuditEvent.objects.get(action="study.view")
    assert event.user.username == "dr-partner" and event.center == network["partner"]
    assert event.address == "10.1.2.3" and event.object_type == "study"
    assert AuditEvent.objects.filter(action="image.view", detail__thumbnail=True).count() == 1


def test_a_frame_renders_with_the_requested_window_and_each_view_is_audited(clinicians, study):
    sop = next(sop for sop, (mod, _, _) in study["files"].items() if mod == "CT")
    partner = clinicians["partner"]
    default = partner.get(f"/instances/{sop}/frames/0")
    bone = partner.get(f"/instances/{sop}/frames/0", {"wc": 300, "ww": 1500})
    assert default["Content-Type"] == "image/png" and "private" in default["Cache-Control"]
    assert Image.open(io.BytesIO(default.content)).size == (128, 128)
    assert default.content != bone.content
    assert partner.get(f"/instances/{sop}/frames/1").status_code == 404
    instance_pk = str(Instance.objects.get(sop_instance_uid=sop).pk)
    assert AuditEvent.objects.filter(action="image.view", object_id=instance_pk).count() == 2


def test_rendered_frames_are_served_from_the_cache(clinicians, study, storage_dir):
    sop = next(iter(study["files"]))
    first = clinicians["partner"].get(f"/instances/{sop}/frames/0", {"size": 64})
    (storage_dir / Instance.objects.get(sop_instance_uid=sop).file).unlink()
    again = clinicians["partner"].get(f"/instances/{sop}/frames/0", {"size": 64})
    assert again.status_code == 200 and again.content == first.content


def test_the_viewer_lists_every_slice_in_order_with_key_attributes(clinicians, study):
    response = clinicians["partner"].get(f"/series/{series_of(study, 'CT')}/")
    viewer = response.context["viewer"]
    assert len(viewer["slices"]) == 3
    numbers = [Instance.objects.get(sop_instance_uid=s["sop"]).instance_number for s in viewer["slices"]]
    assert numbers == [1, 2, 3]
    attributes = dict(viewer["summaries"][viewer["slices"][0]["sop"]]["attributes"])
    assert attributes["Patient ID"] == "PAT-777" and attributes["Modality"] == "CT"
    assert b'id="viewer-data"' in response.content
    assert AuditEvent.objects.filter(action="series.view").count() == 1


def test_the_study_zip_streams_plain_folders_with_the_exact_bytes(clinicians, study):
    response = clinicians["partner"].get(f"/studies/{study['uid']}/download.zip")
    assert response.streaming and response["Content-Type"] == "application/zip"
    body = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(body)
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    names = archive.namelist()
    assert len(names) == 5 and not any("DICOMDIR" in n for n in names)
    assert {n.split("/")[0] for n in names} == {"PAT-777_Rostami_Sara"}
    assert {n.split("/")[2].split("_")[1] for n in names} == {"CT", "MR"}
    stored = {hashlib.sha256(data).hexdigest() for _, _, data in study["files"].values()}
    assert {hashlib.sha256(archive.read(n)).hexdigest() for n in names} == stored
    assert AuditEvent.objects.filter(action="download.study", detail__instances=5).count() == 1


def test_a_series_zip_and_a_single_instance_download(clinicians, study):
    series = series_of(study, "MR")
    response = clinicians["partner"].get(f"/series/{series}/download.zip")
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert len(archive.namelist()) == 2
    sop, (_, _, data) = next(iter(study["files"].items()))
    single = clinicians["partner"].get(f"/instances/{sop}/download")
    assert b"".join(single.streaming_content) == data
    assert single["Content-Type"] == "application/dicom" and "attachment" in single["Content-Disposition"]
    assert set(AuditEvent.objects.filter(action__startswith="download.").values_list("action", flat=True)) == {
        "download.series",
        "download.instance",
    }


def test_the_sent_list_tells_the_publisher_what_each_recipient_got(clinicians, study, agents):
    page = clinicians["own"].get("/sent/").content.decode()
    assert "Tehran Hospital" in page and "0/5 delivered, 5 queued" in page
    leased = agents["partner"].lease(limit=2).json()
    for delivery in leased:
        agents["partner"].ack(delivery["id"], delivery["sha256"])
    page = clinicians["own"].get("/sent/").content.decode()
    assert "2/5 delivered" in page and "last delivered" in page
    # The receiver sees it as received, not as sent.
    assert study["uid"] not in clinicians["partner"].get("/sent/").content.decode()


def test_the_dashboard_counts_deliveries_and_charts_the_last_hours(clinicians, study, agents):
    agents["partner"].lease(limit=1)
    partner = clinicians["partner"].get("/dashboard/")
    data = partner.context["dashboard"]
    assert data.incoming == {"queued": 4, "leased": 1, "delivered": 0, "failed": 0}
    assert data.agent_last_seen is not None
    assert sum(b.received_count for b in data.hourly) == 5 and len(data.hourly) == 24
    assert sum(b.received_bytes for b in data.daily) == sum(len(d) for _, _, d in study["files"].values())
    assert b'id="chart-hourly-instances"' in partner.content and b"<rect" in partner.content
    publisher = clinicians["own"].get("/dashboard/").context["dashboard"]
    assert sum(b.sent_count for b in publisher.hourly) == 5 and publisher.outgoing["queued"] == 4


def test_a_partly_routed_study_shows_only_the_instances_routed_to_the_center(clinicians, agents, network):
    study_uid = generate_uid()
    for modality in ("CT", "NM"):
        assert agents["own"].upload(dicom_bytes(modality, study_uid=study_uid)).status_code == 201
    # The outsider subscribes to #.nm only: it sees the NM series, never the CT.
    response = clinicians["outsider"].get(f"/studies/{study_uid}/")
    assert [s.modality for s in response.context["series_list"]] == ["NM"]
    assert Delivery.objects.filter(center=network["outsider"]).count() == 1


def test_the_dashboard_shows_each_agents_heartbeat(clinicians, study, keys, client):
    from datetime import timedelta

    from django.utils import timezone

    from centers.models import AgentHeartbeat

    beat = {
        "version": "0.2.0",
        "hostname": "pacs-gw-1",
        "roles": ["receive"],
        "interval": 60,
        "spool": {"count": 2, "bytes": 10, "failed": 0},
        "outbox": {"pending": 0, "failed": 0},
    }
    for hostname in ("pacs-gw-1", "old-box"):
        response = client.post(
            "/api/v1/agents/heartbeat",
            data={**beat, "hostname": hostname},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {keys['partner']}",
        )
        assert response.status_code == 200
    AgentHeartbeat.objects.filter(hostname="old-box").update(last_seen_at=timezone.now() - timedelta(hours=2))
    page = clinicians["partner"].get("/dashboard/")
    agents = {a.heartbeat.hostname: a.online for a in page.context["dashboard"].agents}
    assert agents == {"pacs-gw-1": True, "old-box": False}
    html = page.content.decode()
    assert "pacs-gw-1" in html and "online" in html and "offline" in html
    assert "pacs-gw-1" not in clinicians["own"].get("/dashboard/").content.decode()


def test_failed_deliveries_show_on_the_publishers_sent_page_and_the_receivers_received_page(
    clinicians, study, agents, settings, storage_dir
):
    settings.DELIVERY_MAX_MISMATCHES = 1
    first, second = agents["partner"].lease(limit=2).json()
    assert agents["partner"].ack(first["id"], "0" * 64).status_code == 409
    (storage_dir / Delivery.objects.select_related("instance").get(pk=second["id"]).instance.file).unlink()
    assert agents["partner"].file(second["id"]).status_code == 410

    sent = clinicians["own"].get("/sent/").content.decode()
    assert "0/5 delivered" in sent and "2 failed" in sent and 'class="state failed"' in sent
    assert "1 failed: the stored file is missing" in sent
    assert "1 failed: the receiver&#x27;s copy never matched the stored SHA-256" in sent

    received = clinicians["partner"].get("/received/").content.decode()
    assert 'id="failed-deliveries"' in received
    assert "1 from Shiraz Imaging: the stored file is missing" in received
    assert '<span class="state failed">2 failed</span>' in received
    # Only the center owed them sees the notice.
    assert 'id="failed-deliveries"' not in clinicians["outsider"].get("/received/").content.decode()


def _chart_labels(html: str) -> list[tuple[str, float, str, str, float]]:
    """(chart id, x, text-anchor, text, chart width) of every axis label on the page."""
    import re

    labels = []
    for chart_id, svg in re.findall(r'<figure class="chart" id="([^"]+)">.*?(<svg.*?</svg>)', html, re.S):
        width = float(re.search(r'viewBox="0 0 (\d+)', svg).group(1))
        for x, anchor, text in re.findall(r'<text x="([\d.]+)"[^>]*text-anchor="(\w+)">([^<]*)</text>', svg):
            labels.append((chart_id, float(x), anchor, text, width))
    return labels


def test_every_chart_label_is_drawn_whole_inside_its_chart(clinicians, study):
    """The 30-day chart labelled its first day "0 Oct": "10 Oct", centred under a narrow bar, began left of it."""
    import re
    from pathlib import Path

    css = (Path(__file__).resolve().parents[2] / "static" / "studies" / "portal.css").read_text()
    font_size = float(re.search(r"\.chart text \{[^}]*font-size: (\d+)px", css).group(1))
    # A digit or letter of the sans-serif UI fonts is at least about half an em wide.
    glyph = 0.5 * font_size
    labels = _chart_labels(clinicians["partner"].get("/dashboard/").content.decode())
    assert {label[0] for label in labels} >= {"chart-daily-instances", "chart-hourly-megabytes"}
    for chart_id, x, anchor, text, width in labels:
        span = len(text) * glyph
        left = {"start": x, "middle": x - span / 2, "end": x - span}[anchor]
        assert 0 <= left and left + span <= width, f"{chart_id}: {text!r} at x={x} ({anchor}) is cut off"
    days = [text for chart_id, _, _, text, _ in labels if chart_id == "chart-daily-instances"]
    assert all(re.fullmatch(r"\d\d [A-Z][a-z]{2}", day) for day in days), days


def test_the_dashboard_shows_files_the_agent_set_aside_as_failures_at_the_center(clinicians, keys, client):
    beat = {
        "version": "0.2.0",
        "hostname": "gw-1",
        "roles": ["scp", "watch"],
        "interval": 60,
        "spool": {"count": 5, "bytes": 10, "failed": 2, "retrying": 1},
        "outbox": {"pending": 0, "failed": 1, "retrying": 0},
        "last_failure_at": "2026-11-28T09:00:00+00:00",
    }
    response = client.post(
        "/api/v1/agents/heartbeat",
        data=beat,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {keys['own']}",
    )
    assert response.status_code == 200
    html = clinicians["own"].get("/dashboard/").content.decode()
    assert "3 set aside" in html and "1 retrying" in html
    assert '<p class="bad" id="agent-failures"><strong>3 files failed at this center</strong>' in html
    assert "1 more is being retried" in html
    assert 'id="agent-failures"' not in clinicians["partner"].get("/dashboard/").content.decode()
