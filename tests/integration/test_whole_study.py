"""deliver: study on the real stack: a receiving agent's inbox never shows half a study, later instances
follow, and the center's webhook hears of each complete study, signed."""

import os
import threading
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.dicomfiles import dicom_bytes
from tests.integration.conftest import _broker_and_database, _delete_queue, _drop_database
from tests.integration.stack import Stack, base_env, wait_for
from tests.webhookserver import WebhookServer

pytestmark = pytest.mark.integration

STABLE_SECONDS = 2


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def stack(request, tmp_path_factory):
    """PostgreSQL + RabbitMQ + a real worker with beat, or the embedded default (run_periodic)."""
    tmp = tmp_path_factory.mktemp(f"whole-study-{request.param}")
    env = base_env(tmp)
    env.update({"STUDY_STABLE_SECONDS": str(STABLE_SECONDS), "WEBHOOK_RETRY_SECONDS": "0.5"})
    database = queue = None
    if request.param == "postgres":
        database, queue = _broker_and_database(env)
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp / 'var' / 'db.sqlite3'}"
    running = Stack(tmp=tmp, env=env, with_worker=request.param == "postgres")
    running.backend = request.param
    try:
        running.start()
        yield running
    finally:
        running.stop()
        if database:
            _drop_database(database)
        if queue:
            _delete_queue(queue)


class InboxWatcher(threading.Thread):
    """What a PACS import watching the inbox sees: the .dcm files per study folder, polled without pause."""

    def __init__(self, inbox: Path) -> None:
        super().__init__(daemon=True)
        self.inbox = inbox
        self.seen: dict[str, set[int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            counts: dict[str, int] = {}
            for root, dirs, names in os.walk(self.inbox):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # as importers skip hidden folders
                parts = Path(root).relative_to(self.inbox).parts
                if len(parts) >= 2:
                    study = parts[1]
                    counts[study] = counts.get(study, 0) + sum(1 for n in names if n.endswith(".dcm"))
            for study, count in counts.items():
                self.seen.setdefault(study, set()).add(count)


def write_series(folder: Path, *, study: str, series: dict[str, int], patient_id: str = "PAT-WS") -> None:
    for modality, count in series.items():
        series_uid = generate_uid()
        for number in range(1, count + 1):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{modality}-{series_uid[-8:]}-{number:03d}.dcm").write_bytes(
                dicom_bytes(
                    modality, study_uid=study, series_uid=series_uid, instance_number=number, patient_id=patient_id
                )
            )


def as_datetime(value) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def test_a_whole_study_appears_at_once_later_instances_follow_and_the_webhook_is_signed(stack, tmp_path):
    s = generate_uid()[-6:].replace(".", "")
    stack.load_network(
        f"""
regions:
  - {{slug: ws-{s}, name: WS {s}, cities: [{{slug: shiraz, name: Shiraz}}]}}
centers:
  - {{slug: own-{s}, name: Publisher, city: ws-{s}/shiraz, publish: true, subscribe: false}}
  - {{slug: partner-{s}, name: Receiver, city: ws-{s}/shiraz, publish: false, subscribe: true,
     subscriptions: [{{pattern: "ws-{s}.#", deliver: study}}]}}
"""
    )
    own, partner = stack.issue_key(f"own-{s}"), stack.issue_key(f"partner-{s}")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    study = generate_uid()
    with WebhookServer(statuses=[500, 200]) as hooks:
        # As an administrator registers it, and gives the center's IT staff the secret.
        secret = stack.manage(
            "shell",
            "-c",
            "from centers.models import Center; from centers.webhooks import webhook_secret; "
            f"Center.objects.filter(slug='partner-{s}').update(webhook_url='{hooks.url}'); "
            f"print(webhook_secret(Center.objects.get(slug='partner-{s}')))",
        ).stdout.split()[-1]
        watcher = InboxWatcher(inbox)
        watcher.start()
        # Fewer per lease than the study holds: the portal leases the whole study anyway.
        stack.agent_process(partner, "receive", "--inbox", str(inbox), "--limit", "3", "--wait", "1", name="receiver")
        try:
            write_series(tmp_path / "outbox", study=study, series={"CT": 6, "MR": 4})
            sent = stack.agent(own, "send", "--parallel", "4", str(tmp_path / "outbox"))
            assert sent.returncode == 0, sent.stdout + sent.stderr

            wait_for(lambda: 10 in watcher.seen.get(study, ()), what="the study's 10 files in the inbox")
            assert watcher.seen[study] == {10}, "the inbox showed part of the study"
            # Leased only once stable: not before STUDY_STABLE_SECONDS after the study's last instance.
            [(first_lease, last_arrival)] = stack.sql(
                "SELECT min(d.leased_at), max(i.received_at) FROM routing_delivery d "
                "JOIN routing_instance i ON i.id = d.instance_id JOIN centers_center c ON c.id = d.center_id "
                "WHERE c.slug = %s",
                f"partner-{s}",
            )
            assert (as_datetime(first_lease) - as_datetime(last_arrival)).total_seconds() >= STABLE_SECONDS
            # The first POST failed (500): the second, after the backoff, is the one that counts.
            wait_for(lambda: len(hooks.received) == 2, what="the webhook, retried once")

            write_series(tmp_path / "later", study=study, series={"CT": 1})
            sent = stack.agent(own, "send", str(tmp_path / "later"))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_for(lambda: 11 in watcher.seen.get(study, ()), what="the later instance in the inbox")
            wait_for(lambda: len(hooks.received) == 3, what="the webhook of the study complete again")
        finally:
            watcher.stop.set()
            watcher.join()

    # Never a partial study: the study folder was absent, then whole, then whole plus the later instance.
    assert watcher.seen[study] == {10, 11}
    assert not [p for p in (inbox / ".staging").rglob("*") if p.is_file()]
    assert [r.json()["instances"] for r in hooks.received] == [10, 10, 11]
    assert {r.json()["study_instance_uid"] for r in hooks.received} == {study}
    assert all(r.verifies(secret) for r in hooks.received)
    assert stack.sql(
        "SELECT count(*) FROM routing_studywebhook w JOIN centers_center c ON c.id = w.center_id "
        "WHERE c.slug = %s AND w.status = 'sent'",
        f"partner-{s}",
    ) == [(2,)]
