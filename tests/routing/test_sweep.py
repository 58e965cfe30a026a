"""The orphan sweep: stored files whose row never committed are removed once they are older
than the grace, and nothing else is touched."""

import os
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from centers.models import AuditEvent
from portal.celery import app
from routing.models import Instance
from routing.upkeep import storage_sweep_orphans
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db

GRACE = timedelta(hours=1)


def stored(storage_dir, *, age: timedelta, day=None, name: str | None = None):
    """A file as instance_ingest writes it, with no row, last modified `age` ago."""
    day = day or timezone.now()
    relative = f"instances/{day:%Y/%m/%d}/{name or uuid.uuid4().hex + '.dcm'}"
    path = storage_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes("CT"))
    modified = time.time() - age.total_seconds()
    os.utime(path, (modified, modified))
    return relative, path


def sweep(**overrides):
    return storage_sweep_orphans(**{"grace": GRACE, "lookback_days": 1, "batch": 100, **overrides})


def test_a_file_no_row_names_older_than_the_grace_is_removed_and_audited(storage_dir):
    name, path = stored(storage_dir, age=GRACE + timedelta(minutes=5))
    assert sweep() == [name]
    assert not path.exists()
    event = AuditEvent.objects.get(action="storage.orphan_delete")
    assert event.object_id == name and event.object_type == "file"


def test_a_file_younger_than_the_grace_is_kept(storage_dir):
    # An upload in flight: written, its row not committed yet.
    _, path = stored(storage_dir, age=GRACE - timedelta(minutes=5))
    assert sweep() == []
    assert path.exists()


def test_a_file_an_instance_names_is_kept_however_old(agents, storage_dir):
    agents["own"].upload(dicom_bytes("CT"))
    path = storage_dir / Instance.objects.get().file
    old = time.time() - 10 * 24 * 3600
    os.utime(path, (old, old))
    assert sweep() == []
    assert path.exists()


def test_a_file_not_named_as_ingest_names_them_is_kept(storage_dir):
    _, path = stored(storage_dir, age=GRACE * 5, name="notes.txt")
    assert sweep() == []
    assert path.exists()


def test_only_the_recent_day_folders_are_walked(storage_dir):
    _, yesterday = stored(storage_dir, age=GRACE * 30, day=timezone.now() - timedelta(days=1))
    _, last_month = stored(storage_dir, age=GRACE * 30, day=timezone.now() - timedelta(days=30))
    sweep(lookback_days=1)
    assert not yesterday.exists() and last_month.exists()
    sweep(lookback_days=31)
    assert not last_month.exists()


def test_one_run_removes_at_most_a_batch(storage_dir):
    paths = [stored(storage_dir, age=GRACE * 2)[1] for _ in range(5)]
    assert len(sweep(batch=2)) == 2
    assert sum(p.exists() for p in paths) == 3
    assert len(sweep(batch=10)) == 3


def test_the_periodic_work_runs_the_orphan_sweep(storage_dir, settings):
    settings.ORPHAN_GRACE_SECONDS = GRACE.total_seconds()
    [entry] = [e for e in django_settings.CELERY_BEAT_SCHEDULE.values() if e["task"].endswith("sweep_orphan_files")]
    assert entry["schedule"] == django_settings.ORPHAN_SWEEP_INTERVAL_SECONDS
    _, path = stored(storage_dir, age=GRACE * 2)
    assert app.tasks[entry["task"]].apply(throw=True).get() == 1
    assert not path.exists()


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_sweep_while_an_upload_is_between_its_write_and_its_commit_leaves_its_files(
    agents, storage_dir, monkeypatch, path
):
    """The in-flight guard on real uploads: the sweep runs at the moment a killed process would leave orphans."""
    from routing import batch, services
    from tests.routing.test_ingest_batch import upload_batch

    module = services if path == "single" else batch
    real_upload_row = module.upload_row
    swept = []

    def sweep_first(**row):
        if not swept:
            # Written and durable, no row names it yet: exactly what the sweep looks for, but for its age.
            assert (storage_dir / row["name"]).exists()
            assert not Instance.objects.filter(file=row["name"]).exists()
            # The shortest grace ORPHAN_GRACE_SECONDS allows.
            swept.append(sweep(grace=timedelta(seconds=60)))
        return real_upload_row(**row)

    monkeypatch.setattr(module, "upload_row", sweep_first)
    files = [dicom_bytes("CT", study_uid="1.2.3.77", series_uid="1.2.3.77.1", instance_number=n) for n in (1, 2)]
    if path == "single":
        response = agents["own"].upload(files[0])
        files = files[:1]
        assert response.status_code == 201, response.content
    else:
        response = upload_batch(agents["own"], files)
        assert [r["status"] for r in response.json()["results"]] == [201, 201], response.content
    assert swept == [[]]
    stored = {(storage_dir / name).read_bytes() for name in Instance.objects.values_list("file", flat=True)}
    assert stored == set(files)
