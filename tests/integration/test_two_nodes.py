"""Two portal nodes behind nginx: one dies mid-transfer, and every instance still arrives exactly once.

Each node is its own group of uvicorn workers on its own port, sharing PostgreSQL,
the storage folder and the broker. The agents only know nginx; when a node is
killed, nginx sends new requests to the other one, and the agents' retries of
what was cut off (uploads, leases, downloads, acks) land there too.
"""

import hashlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.batches import MAX_FILES
from tests.dicomfiles import write_study
from tests.integration.nginx import NGINX, nginx_start
from tests.integration.stack import PYTHON, ROOT, free_port, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (Debian package nginx)"),
]

# Enough that the batched upload (50 files a request, one at a time) is still under way when node A dies.
CT, MR = 600, 300
# A lease taken by a request the dead node never answered is offered again after this.
LEASE_SECONDS = 10
# Batch uploads under way at once, each of up to MAX_FILES files. One, not the agent's default
# of 4: with 4, the upload could end before the first delivery was received (it did in CI),
# and node A must die with uploads and downloads both under way.
PARALLEL = 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count(stack, query: str, *params) -> int:
    return stack.sql(query, *params)[0][0]


def test_killing_one_node_mid_transfer_loses_and_duplicates_nothing(postgres_stack, pg_network, tmp_path):
    stack, net = postgres_stack, pg_network
    env = {**stack.env, "DELIVERY_LEASE_SECONDS": str(LEASE_SECONDS)}
    node_a, node_b = free_port(), free_port()
    a = stack.start_server(port=node_a, env=env, name="node-a")
    stack.start_server(port=node_b, env=env, name="node-b")
    nginx, url = nginx_start(stack, tmp_path, upstreams=[node_a, node_b])

    study = write_study(tmp_path / "outbox", series={"CT": CT, "MR": MR})
    digests = {uid: _sha256(path) for path, uid in study.items()}
    mr_uids = {uid for path, uid in study.items() if path.name.startswith("MR-")}
    # partner subscribes to the whole region, mr to its MR only, outsider to none of it.
    expected = {"partner": set(digests), "mr": mr_uids, "outsider": set()}

    def agent(role: str, *args: str):
        state = tmp_path / f"state-{role}"
        return stack.spawn(
            f"agent-{role}",
            [PYTHON, "-m", "agent", "--server", url, "--key", net.keys[role], "--state-dir", str(state), *args],
        )

    inboxes = {}
    receivers = []
    for role in expected:
        inboxes[role] = tmp_path / f"inbox-{role}"
        inboxes[role].mkdir()
        receivers.append(agent(role, "receive", "--inbox", str(inboxes[role]), "--wait", "5"))
    sender = agent("own", "send", "--parallel", str(PARALLEL), str(tmp_path / "outbox"))

    source = f"own-{net.s}"
    stored = (
        "SELECT count(*) FROM routing_instance i JOIN centers_center c ON c.id = i.source_center_id WHERE c.slug = %s"
    )
    received = (
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id"
        " WHERE c.slug = %s AND d.status = 'delivered'"
    )
    # Mid-transfer: part of the study is stored and part of it is already received.
    started = time.monotonic()
    wait_for(
        lambda: _count(stack, stored, source) >= len(digests) // 6 and _count(stack, received, f"partner-{net.s}") > 0,
        timeout=120,
        what="the transfer to be under way",
    )
    print(f"under way after {time.monotonic() - started:.1f} s: {_count(stack, stored, source)} stored")
    assert sender.popen.poll() is None, "the upload ended before node A could be killed mid-transfer"
    a.stop(signal.SIGKILL)

    assert sender.popen.wait(timeout=600) == 0, sender.log()
    for role, uids in expected.items():
        wait_for(
            lambda role=role, uids=uids: _count(stack, received, f"{role}-{net.s}") == len(uids),
            timeout=300,
            interval=0.5,
            what=f"{len(uids)} deliveries to {role}",
        )
    for receiver in receivers:
        receiver.stop()
    nginx.stop()
    # What node A's death cut off, as nginx saw it: POSTs it answered 502 (the agent resent
    # them), GETs it re-sent to node B itself.
    cut = Counter(
        re.sub(r"/\d+/", "/<id>/", line.split('request: "')[1].split("?")[0].split(" HTTP")[0])
        for line in nginx.log().splitlines()
        if "[error]" in line and 'request: "' in line
    )
    print(f"requests node A cut off: {dict(cut)}")
    released = _count(
        stack,
        "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id"
        " WHERE c.slug LIKE %s AND d.attempts > 1",
        f"%-{net.s}",
    )
    print(f"deliveries leased more than once: {released}")

    # Stored once: one row per SOP Instance UID, each naming its own file with the sent bytes.
    rows = stack.sql(
        "SELECT i.sop_instance_uid, i.sha256, i.file FROM routing_instance i"
        " JOIN centers_center c ON c.id = i.source_center_id WHERE c.slug = %s",
        source,
    )
    assert Counter(uid for uid, _, _ in rows) == Counter(digests.keys())
    assert {uid: sha for uid, sha, _ in rows} == digests
    storage = Path(stack.env["DICOM_STORAGE_DIR"])
    assert len({name for _, _, name in rows}) == len(rows)
    assert all(_sha256(storage / name) == digests[uid] for uid, _, name in rows)

    # An upload the dead node had written but not committed leaves a file no row names: at
    # most a batch's files per upload under way. The orphan sweep removes such files once they are older
    # than its grace, which the test skips by ageing them; then the study is stored exactly once.
    named = {name for (name,) in stack.sql("SELECT file FROM routing_instance")}
    orphans = [p for p in (storage / "instances").rglob("*.dcm") if p.relative_to(storage).as_posix() not in named]
    print(f"node A left {len(orphans)} uncommitted upload(s) in storage")
    assert len(orphans) <= PARALLEL * MAX_FILES
    hours_ago = time.time() - 7200
    for orphan in orphans:
        os.utime(orphan, (hours_ago, hours_ago))
    sweep = subprocess.run(
        [PYTHON, "manage.py", "shell", "-c", "from routing.tasks import sweep_orphan_files; sweep_orphan_files()"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    on_disk = {p.relative_to(storage).as_posix() for p in (storage / "instances").rglob("*.dcm")}
    assert on_disk == named

    ids = {uid: pk for pk, uid in stack.sql("SELECT id, sop_instance_uid FROM routing_instance")}
    for role, uids in expected.items():
        center = f"{role}-{net.s}"
        deliveries = stack.sql(
            "SELECT d.instance_id, d.status FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id"
            " WHERE c.slug = %s",
            center,
        )
        # Exactly one delivered delivery per (instance, center), and none for what it does not subscribe to.
        assert Counter(pk for pk, _ in deliveries) == Counter(ids[uid] for uid in uids)
        assert {status for _, status in deliveries} <= {"delivered"}

        files = [p for p in inboxes[role].rglob("*") if p.is_file() and not p.name.startswith(".")]
        got = Counter(_sha256(p) for p in files)
        want = Counter(digests[uid] for uid in uids)
        lost = sum((want - got).values())
        duplicated = sum((got - want).values())
        print(f"{center}: {len(uids)} expected, {len(files)} in the inbox, lost={lost} duplicated={duplicated}")
        assert (lost, duplicated) == (0, 0)
        assert all(p.suffix == ".dcm" for p in files)
