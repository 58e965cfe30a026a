"""Two `make bench` phases about one center's trouble not reaching the others.

- STAT first: a stat instance's upload to its lease, behind a routine backlog and
  beside agents uploading routine files (issue "STAT first").
- Flood isolation: a steady center's upload latency beside a center flooding uploads
  on a portal with a per-key limit (issue 11), and a control where nginx refuses the
  flood, so what is left is the flooding client's own use of the machine.

Each is a function of the running Bench (bench.run), which records the figures.
"""

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench.report import log
from tests.integration.stack import BIN, PYTHON, ROOT, free_port, wait_for

if TYPE_CHECKING:
    from bench.run import Bench

# The STAT line: routine deliveries queued for the receiving center before each stat upload.
STAT_BACKLOG = 2000
# The flood phase's web server: a per-key limit well under this machine's upload rate, counted in Redis.
FLOOD_RATE_LIMIT = "10/s"
FLOOD_CACHE_URL = os.environ.get("BENCH_CACHE_URL", "redis://127.0.0.1:6379/0")


def stat(bench: "Bench", *, agents: int) -> None:
    """Upload to lease of a stat instance, with STAT_BACKLOG routine deliveries queued for the
    receiving center and five agents uploading routine files meanwhile.

    The receiving center is polled as an agent with a backlog polls (a lease, its files, the
    next lease): every 50 ms, 10 at a time. The figure is from the stat upload's start to the
    answer of the first lease holding it, which must hold it first.
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    bench.reset()
    bench.subscribers_active(agents)
    center, key = bench.subscriber_ids[0], bench.receiver_keys[0]
    template = bench.files["MR"][0]
    publisher = {"Authorization": f"Bearer {bench.publisher_key}", "Content-Type": "application/dicom"}
    with httpx.Client(base_url=bench.stack.url, timeout=60) as client:
        client.post("/api/v1/instances", content=template.read_bytes(), headers=publisher).raise_for_status()
        wait_for(
            lambda: bench.sql_one("SELECT count(*) FROM routing_instance WHERE routed_at IS NOT NULL")[0] == 1,
            what="the template instance routed",
        )
        _routine_backlog(bench, center, STAT_BACKLOG)
        # Five agents upload the data set's routine files (a fifth each) while the stat uploads are
        # measured, each sending its fifth again as soon as it is done, so that every sample is
        # taken beside uploads under way: a fifth takes only a few seconds, fewer than the samples.
        # The first pass publishes new instances, routed to the five centers; later ones are
        # re-uploads, answered 200 (each body still received, hashed, written and read).
        shares = [bench.all_files[i::agents] for i in range(agents)]
        senders = [
            bench.stack.spawn(
                f"routine-agent-{i}",
                ["bash", "-c", f"while {_agent_send(bench, share)} > /dev/null; do :; done; exit 1"],
                env={**bench.stack.env, "TCP_NODELAY": "1"},
            )
            for i, share in enumerate(shares)
        ]
        samples = 3 if bench.small else 10
        try:
            time.sleep(1)  # the five agents under way
            for _ in range(samples):
                dataset = dcmread(template)
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                path = bench.tmp / "stat.dcm"
                dataset.save_as(path, enforce_file_format=True)
                uploading = sum(p.popen.poll() is None for p in senders)
                if uploading < agents:
                    failed = next(p for p in senders if p.popen.poll() is not None)
                    raise SystemExit(f"stat: a routine agent failed:\n{failed.log()[-3000:]}")
                queued = bench.sql_one(
                    "SELECT count(*) FROM routing_delivery WHERE center_id = %s AND status = 'queued'", center
                )[0]
                started = time.perf_counter()
                answer = client.post(
                    "/api/v1/instances", params={"priority": "stat"}, content=path.read_bytes(), headers=publisher
                )
                answer.raise_for_status()
                answered = time.perf_counter() - started
                sop = answer.json()["sop_instance_uid"]
                leases = 0
                while True:
                    lease = client.get(
                        "/api/v1/deliveries", params={"limit": 10}, headers={"Authorization": f"Bearer {key}"}
                    )
                    lease.raise_for_status()
                    leases += 1
                    items = lease.json()
                    if any(item["sop_instance_uid"] == sop for item in items):
                        break
                    if time.perf_counter() - started > 60:
                        raise SystemExit(f"stat: {sop} was not leased within 60 s")
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
                if items[0]["sop_instance_uid"] != sop:
                    raise SystemExit(f"stat: {sop} was leased, but not first: {items}")
                bench.record("ours.stat.upload_to_lease_ms", seconds * 1000)
                bench.record("ours.stat.upload_ms", answered * 1000)
                bench.record("ours.stat.leases_until_leased", leases)
                bench.record("ours.stat.routine_queued", queued)
                bench.record("ours.stat.agents_uploading", uploading)
                log(
                    f"stat: leased {seconds * 1000:.0f} ms after its upload began (answered in "
                    f"{answered * 1000:.0f} ms), in lease {leases}, "
                    f"{queued} routine deliveries queued, {uploading} agents uploading"
                )
                time.sleep(0.5)
        finally:
            for process in senders:
                process.stop()
                bench.stack.processes.remove(process)


def _agent_send(bench: "Bench", files: list[Path]) -> str:
    """The shell command of one `agent send` of `files` as the publisher."""
    return shlex.join(
        [PYTHON, "-m", "agent", "--server", bench.stack.url, "--key", bench.publisher_key, "send"]
        + ["--parallel", str(bench.parallel), *map(str, files)]
    )


def _routine_backlog(bench: "Bench", center: int, count: int) -> None:
    """`count` routine deliveries queued for `center`: rows copied from the one routed instance
    under new UIDs (a lease reads rows, never files)."""
    columns = [
        name
        for (name,) in bench.stack.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'routing_instance' "
            "AND column_name NOT IN ('id', 'sop_instance_uid', 'file', 'routed_at') ORDER BY ordinal_position"
        )
    ]
    names = ", ".join(columns)
    bench.execute(
        f"INSERT INTO routing_instance (sop_instance_uid, file, routed_at, {names}) "  # noqa: S608 (the schema's names)
        f"SELECT '2.25.' || g || '0' || t.id, 'backlog/' || g, now(), {', '.join('t.' + c for c in columns)} "
        "FROM routing_instance t, generate_series(1, %s) g WHERE t.id = (SELECT min(id) FROM routing_instance)",
        count,
    )
    bench.execute(
        "INSERT INTO routing_delivery (instance_id, center_id, status, created_at, attempts, last_error) "
        "SELECT id, %s, 'queued', now(), 0, '' FROM routing_instance WHERE file LIKE 'backlog/%%'",
        center,
    )


def flood(bench: "Bench") -> None:
    """A steady center's upload p95 alone and beside a center flooding uploads from 8 threads.

    On a web server of its own (direct, 2 processes) whose per-key limit (API_RATE_LIMIT)
    is well under what the machine takes, its counters in Redis as in production.
    """
    import statistics

    bench.reset()
    bench.subscribers_active(0)
    bench.stack.load_network(
        """
regions:
  - {slug: fars, name: Fars, cities: [{slug: shiraz, name: Shiraz}]}
centers:
  - {slug: flooder, name: Shiraz Flooding Imaging, city: fars/shiraz, publish: true, subscribe: false}
"""
    )
    flood_key = bench.stack.issue_key("flooder")
    port = free_port()
    env = {**bench.stack.env, "API_RATE_LIMIT": FLOOD_RATE_LIMIT, "CACHE_URL": FLOOD_CACHE_URL}
    server = bench.stack.spawn(
        "server-flood",
        [str(BIN / "uvicorn"), "portal.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "2", "--loop", "uvloop", "--http", "httptools", "--no-access-log"],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: bench._healthy(url), timeout=60, what="the rate-limited portal")
    steady_files = [p.read_bytes() for p in bench.files["MR"]]
    per_run = min(150, len(steady_files) // 3)  # new files in each run: none answered "already stored"

    def steady(offset: int) -> list[float]:
        latencies = []
        headers = {"Authorization": f"Bearer {bench.publisher_key}", "Content-Type": "application/dicom"}
        with httpx.Client(base_url=url, timeout=60) as client:
            for body in steady_files[offset : offset + per_run]:
                started = time.perf_counter()
                client.post("/api/v1/instances", content=body, headers=headers).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.1)  # an agent at an ordinary pace, far under the limit
        return latencies

    workers = [
        int(pid) for pid in Path(f"/proc/{server.popen.pid}/task/{server.popen.pid}/children").read_text().split()
    ]

    def beside_flood(target: str, offset: int) -> tuple[list[float], dict[int, int], float, float]:
        """The steady uploads while the flooder posts to target; its answers, rate and the web CPU."""
        flooder = subprocess.Popen(
            [PYTHON, "-m", "bench.flooder", target, flood_key, *map(str, bench.files["CT"][:100])],
            cwd=ROOT,
            env={**bench.stack.env, "TCP_NODELAY": "1"},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert flooder.stdout.readline().strip() == "flooding"
            started, cpu_before = time.monotonic(), _cpu_seconds(workers)
            time.sleep(1)  # the flood at full strength before measuring
            latencies = steady(offset)
        finally:
            flooder.terminate()
            counted = json.loads(flooder.communicate(timeout=120)[0].splitlines()[-1])
        seconds = time.monotonic() - started
        answers = {int(status): count for status, count in counted.items()}
        return latencies, answers, sum(answers.values()) / seconds, (_cpu_seconds(workers) - cpu_before) / seconds

    try:
        alone = steady(0)
        flooded, answers, flood_rps, web_cpu = beside_flood(url, per_run)
        # The control: the same flooder against nginx answering 429 itself, the portal untouched.
        # What the steady center loses here is this machine's CPU going to the flooding client.
        control, _, control_rps, _ = beside_flood(f"http://127.0.0.1:{bench.floor_port}/refuse", 2 * per_run)
    finally:
        server.stop()
        bench.stack.processes.remove(server)
    bench.record("ours.flood.alone.p95_ms", statistics.quantiles(alone, n=20)[-1])
    bench.record("ours.flood.flooded.p95_ms", statistics.quantiles(flooded, n=20)[-1])
    bench.record("ours.flood.refused_share", answers.get(429, 0) / max(1, sum(answers.values())))
    # How hard the flood pushed, and what the web processes spent on it (the steady uploads included).
    bench.record("ours.flood.flood_rps", flood_rps)
    bench.record("ours.flood.web_cpu_share", web_cpu)
    bench.record("ours.flood.control.p95_ms", statistics.quantiles(control, n=20)[-1])
    bench.record("ours.flood.control.flood_rps", control_rps)


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
