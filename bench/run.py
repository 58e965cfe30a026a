"""`make bench`: the exchange on its production stack, the floor and an Orthanc peer, in one run.

The portal runs as deployed: PostgreSQL (a fresh database), RabbitMQ (a queue of
its own), uvicorn with several workers behind nginx, Celery workers, and real
`python -m agent` processes. Each figure is the median of --repeats runs; the
results go to docs/benchmarks.json (raw) and the table in docs/benchmarks.md.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import httpx

from bench import dataset, isolation
from bench.clients import sha256_file
from bench.machine import MB, machine
from bench.orthanc_peer import in_private_network
from bench.report import log
from routing.links import nginx_location
from tests.integration.stack import PYTHON, ROOT, Process, Stack, base_env, free_port, stat_queue, wait_for

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/dicom_exchange")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
SUBSCRIBER_LEVELS = (1, 5, 50, 500)
REAL_AGENTS = 5
NGINX_CONF = """
user root;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 100000;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  default_type application/octet-stream;
  upstream portal {{ server 127.0.0.1:{app}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{web};
    client_max_body_size 3g;
    location / {{
      proxy_pass http://portal;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
    # The portal answers a download with X-Accel-Redirect into this internal
    # location; nginx then sends the stored file itself.
    location /_dicom/ {{
      internal;
      alias {storage}/;
    }}
    # Signed download links handed out with a lease (DICOM_DOWNLOAD_LINK_SECRET):
    # nginx checks them and sends the file, no request reaches the portal.
{links}
  }}
  server {{
    listen 127.0.0.1:{floor};
    location /files/ {{ alias {data}/; }}
    # The flood phase's control: a refusal that costs the portal nothing.
    location /refuse/ {{ return 429; }}
  }}
}}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.small = args.small
        self.parallel = args.parallel
        home = ROOT / "var" / "bench"
        self.data_root = home / f"data-{args.seed}-{'small' if self.small else 'full'}"
        self.tmp = home / f"run-{uuid.uuid4().hex[:6]}"
        self.tmp.mkdir(parents=True)
        self.raw: dict[str, list] = {}

    # -- the data set -----------------------------------------------------------
    def prepare_data(self) -> None:
        scale = 0.1 if self.small else 1.0
        started = time.monotonic()
        self.files = dataset.generate(self.data_root, seed=self.args.seed, scale=scale)
        self.big = dataset.big_instance(self.data_root, seed=self.args.seed, megabytes=100 if self.small else 500)
        sums = self.data_root / "sha256.json"
        if not sums.exists():
            sums.write_text(json.dumps({str(p): sha256_file(p) for ps in self.files.values() for p in ps}))
        self.sha = json.loads(sums.read_text())
        self.all_files = [p for ps in self.files.values() for p in ps]
        self.sizes = {m: sum(p.stat().st_size for p in ps) for m, ps in self.files.items()}
        self.total = sum(self.sizes.values())
        log(
            f"data set: {', '.join(f'{len(ps)} {m}' for m, ps in self.files.items())}, {self.total / MB:.0f} MB "
            f"({time.monotonic() - started:.1f} s)"
        )

    # -- the stack -------------------------------------------------------------
    def start_stack(self) -> None:
        # Imported here so a missing one fails the bench instead of uvicorn falling back to
        # asyncio's loop and h11, which would measure something else.
        import httptools  # noqa: F401
        import psycopg
        import uvloop  # noqa: F401

        base, _, _ = DATABASE_URL.rpartition("/")
        self.database = f"dx_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.database}"')
        self.queue = f"dx-bench-{uuid.uuid4().hex[:8]}"
        env = base_env(self.tmp)
        for name in ("SWEEP_INTERVAL_SECONDS", "SWEEP_GRACE_SECONDS", "DELIVERY_POLL_INTERVAL"):
            env.pop(name)  # the production defaults, not the tests' quick ones
        env.update(
            {
                "DATABASE_URL": f"{base}/{self.database}",
                "CELERY_BROKER_URL": BROKER_URL,
                "CELERY_QUEUE": self.queue,
                "LOG_LEVEL": "WARNING",
            }
        )
        if not self.args.no_accel:
            env["DICOM_ACCEL_REDIRECT"] = "/_dicom/"
        self.link_secret = "" if self.args.no_accel or self.args.no_links else secrets.token_urlsafe(32)
        if self.link_secret:
            env["DICOM_DOWNLOAD_LINK_SECRET"] = self.link_secret
        self.storage = Path(env["DICOM_STORAGE_DIR"])
        self.storage.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(tmp=self.tmp, env=env, with_worker=True)
        self.stack.manage("migrate", "--no-input", "-v0")
        self.app_port = self.stack.port
        self.server = self.stack.spawn(
            "server",
            # As README deploys it: each worker listening on a socket of its own (portal.serve).
            [PYTHON, "-m", "portal.serve", "--host", "127.0.0.1", "--port", str(self.app_port)]
            + ["--workers", str(self.args.web_workers), "--log-level", "warning"],
        )
        self.worker = self.stack.start_worker(
            concurrency=self.args.celery_workers, node=self.queue, env={**env, "LOG_LEVEL": "INFO"}
        )
        wait_for(
            lambda: self.worker.popen.poll() is not None or " ready." in self.worker.log(),
            timeout=60,
            what="the Celery worker",
        )
        if self.worker.popen.poll() is not None:
            raise SystemExit(f"the Celery worker died:\n{self.worker.log()[-3000:]}")
        # As deployed (deploy/systemd/dicom-exchange-stat-worker.service): slots of their own for stat fan-outs.
        self.stat_worker = self.stack.start_stat_worker(env={**env, "LOG_LEVEL": "INFO"})
        self.web_port, self.floor_port = free_port(), free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                tmp=self.tmp,
                app=self.app_port,
                web=self.web_port,
                floor=self.floor_port,
                storage=self.storage,
                data=self.data_root,
                links=nginx_location(prefix="/dl/", storage_dir=str(self.storage), secret=self.link_secret)
                if self.link_secret
                else "",
            )
        )
        nginx = ["/usr/sbin/nginx", "-c", str(conf), "-p", str(self.tmp), "-g", "daemon off;"]
        self.nginx = self.stack.spawn("nginx", nginx)
        self.stack.url = f"http://127.0.0.1:{self.web_port}"
        wait_for(lambda: self._healthy(self.stack.url), timeout=60, what="the portal behind nginx")
        self._network()

    def _healthy(self, url: str) -> bool:
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _network(self) -> None:
        count = max(SUBSCRIBER_LEVELS)
        subscribers = "\n".join(
            f"  - {{slug: sub-{i:03d}, name: Hospital {i:03d}, city: tehran/tehran, publish: false, subscribe: true,"
            f' subscriptions: ["fars.#"]}}'
            for i in range(count)
        )
        started = time.monotonic()
        self.stack.load_network(
            f"""
regions:
  - {{slug: fars, name: Fars, cities: [{{slug: shiraz, name: Shiraz}}]}}
  - {{slug: tehran, name: Tehran, cities: [{{slug: tehran, name: Tehran}}]}}
centers:
  - {{slug: publisher, name: Shiraz Imaging, city: fars/shiraz, publish: true, subscribe: false}}
{subscribers}
"""
        )
        self.publisher_key = self.stack.issue_key("publisher")
        self.receiver_keys = [self.stack.issue_key(f"sub-{i:03d}") for i in range(REAL_AGENTS)]
        self.subscriber_ids = [
            row[0] for row in self.stack.sql("SELECT id FROM centers_center WHERE slug LIKE 'sub-%%' ORDER BY slug")
        ]
        log(f"network: 1 publisher, {count} subscribing centers ({time.monotonic() - started:.1f} s)")

    def stop(self) -> None:
        import psycopg
        from kombu import Connection

        self.receivers_stop()
        if hasattr(self, "stack"):
            self.stack.stop()
        if hasattr(self, "database"):
            base, _, _ = DATABASE_URL.rpartition("/")
            with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        if hasattr(self, "queue"):
            with Connection(BROKER_URL) as connection:
                connection.channel().queue_delete(self.queue)
                connection.channel().queue_delete(stat_queue(self.stack.env))
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------
    def execute(self, query: str, *params) -> None:
        import psycopg

        with psycopg.connect(self.stack.env["DATABASE_URL"]) as connection:
            connection.execute(query, params)

    def subscribers_active(self, count: int) -> None:
        self.execute("UPDATE routing_subscription SET is_active = (center_id = ANY(%s))", self.subscriber_ids[:count])

    def reset(self) -> None:
        """Forget every instance, so the same files publish and fan out again."""
        # DELETE, not TRUNCATE: TRUNCATE waits for every session that touched the tables.
        for table in ("delivery", "routingdecision", "instance", "series", "study", "patient"):
            self.execute(f"DELETE FROM routing_{table}")  # noqa: S608 (fixed table names)
        shutil.rmtree(self.storage / "instances", ignore_errors=True)
        for inbox in self.tmp.glob("inbox-*"):
            for entry in inbox.iterdir():
                shutil.rmtree(entry, ignore_errors=True)
        self.connections = max(
            getattr(self, "connections", 0),
            self.sql_one("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", self.database)[0],
        )
        self.quiesce()

    def quiesce(self) -> None:
        """Let the earlier phase's leftovers finish before the next one is measured.

        reset() DELETEs what a phase made: up to about 200,000 delivery rows after the
        500-subscriber level. Left to autovacuum, the dead rows are cleaned while the next
        phase runs, and its lease and fan-out statements walk past them meanwhile: the
        phases after the subscriber-scale phase (runs 2 and 3) measured slower than run 1.
        The tables are vacuumed now and the broker's queues waited for, so every phase
        starts as the first one does.
        """
        import psycopg
        from kombu import Connection

        with psycopg.connect(self.stack.env["DATABASE_URL"], autocommit=True) as connection:
            for table in ("delivery", "routingdecision", "instance", "series", "study", "patient"):
                connection.execute(f"VACUUM ANALYZE routing_{table}")  # noqa: S608 (fixed table names)

        def queues_empty() -> bool:
            with Connection(BROKER_URL) as connection:
                channel = connection.channel()
                return all(
                    channel.queue_declare(queue=name, passive=True).message_count == 0
                    for name in (self.queue, stat_queue(self.stack.env))
                )

        wait_for(queues_empty, timeout=600, interval=0.5, what="the broker's queues to drain")

    def receivers_start(self, url: str | None = None) -> None:
        self.receivers: list[Process] = []
        for index, key in enumerate(self.receiver_keys):
            inbox = self.tmp / f"inbox-{index}"
            shutil.rmtree(inbox, ignore_errors=True)
            inbox.mkdir()
            self.receivers.append(
                self.stack.spawn(
                    f"receiver-{index}",
                    [
                        PYTHON,
                        "-m",
                        "agent",
                        "--server",
                        url or self.stack.url,
                        "--key",
                        key,
                        "receive",
                        "--inbox",
                        str(inbox),
                    ],
                    env={**self.stack.env, "TCP_NODELAY": "1"},
                )
            )
        time.sleep(1.5)  # let them reach their first long poll

    def receivers_stop(self) -> None:
        for process in getattr(self, "receivers", []):
            process.stop()
            self.stack.processes.remove(process)
        self.receivers = []

    def send(self, paths: list[Path], parallel: int, url: str | None = None) -> list[dict]:
        """The real agent uploads `paths`; returns each file's timing."""
        out = self.tmp / f"latency-{uuid.uuid4().hex[:6]}.jsonl"
        server = url or self.stack.url
        result = subprocess.run(
            [PYTHON, "-m", "bench.timed_agent", "--server", server, "--key", self.publisher_key, "send"]
            + ["--parallel", str(parallel), *map(str, paths)],
            cwd=ROOT,
            env={**self.stack.env, "TCP_NODELAY": "1", "BENCH_LATENCY_OUT": str(out)},
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if result.returncode != 0 or f"{len(paths)} sent" not in result.stdout:
            raise SystemExit(f"agent send failed:\n{result.stdout}\n{result.stderr[-3000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()]

    def record(self, name: str, value: float) -> None:
        self.raw.setdefault(name, []).append(value)

    def sql_one(self, query: str, *params):
        return self.stack.sql(query, *params)[0]

    # -- a. ingest ---------------------------------------------------------------
    def ingest(self) -> None:
        self.reset()
        self.subscribers_active(0)
        timings = []
        for run, (modality, paths) in enumerate(self.files.items()):
            rows = [{**row, "run": run} for row in self.send(paths, self.parallel)]
            span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
            self.record(f"ours.ingest.{modality}.mb_s", self.sizes[modality] / MB / span)
            timings += rows
        self._ingest_figures("ours", timings)

    def _ingest_figures(self, who: str, timings: list[dict]) -> None:
        busy = sum(max(r["end"] for r in group) - min(r["start"] for r in group) for group in self._by_run(timings))
        self.record(f"{who}.ingest.files_s", len(timings) / busy)
        self.record(f"{who}.ingest.mb_s", sum(r["size"] for r in timings) / MB / busy)
        latencies = [r["seconds"] * 1000 for r in timings]
        for q in (50, 95, 99):
            self.record(f"{who}.ingest.p{q}_ms", percentile(latencies, q))

    @staticmethod
    def _by_run(timings: list[dict]) -> list[list[dict]]:
        groups: dict[int, list[dict]] = {}
        for row in timings:
            groups.setdefault(row.get("run", 0), []).append(row)
        return list(groups.values())

    # -- b. end-to-end fan-out ---------------------------------------------------
    def fanout(self) -> None:
        self.reset()
        self.subscribers_active(REAL_AGENTS)
        self.receivers_start()
        try:
            timings = self.send(self.all_files, self.parallel)
            start = min(r["start"] for r in timings)
            expected = REAL_AGENTS * len(self.all_files)
            query = (
                "SELECT count(*), extract(epoch FROM max(delivered_at)) FROM routing_delivery"
                " WHERE status = 'delivered'"
            )
            wait_for(
                lambda: self.sql_one(query)[0] >= expected,
                timeout=1800,
                interval=0.5,
                what=f"{expected} deliveries acknowledged",
            )
            end = float(self.sql_one(query)[1])
        finally:
            self.receivers_stop()
        self.record("ours.fanout.seconds", end - start)
        self.record("ours.fanout.upload_seconds", max(r["end"] for r in timings) - start)
        self.record("ours.fanout.mb_s", REAL_AGENTS * self.total / MB / (end - start))

    # -- b'. the README's plain production command: uvicorn alone, no nginx -----------
    def direct(self) -> None:
        """`agent send` of the set, then five `agent receive` fetching it, on the portal's workers alone.

        No nginx: no X-Accel-Redirect, no signed links, every download goes to uvicorn
        (routing.fast_download). The receivers start once every delivery is queued, so
        the download figure is theirs alone.
        """
        self.reset()
        self.subscribers_active(REAL_AGENTS)
        port = free_port()
        env = {
            name: value
            for name, value in self.stack.env.items()
            if name not in ("DICOM_ACCEL_REDIRECT", "DICOM_DOWNLOAD_LINK_SECRET")
        }
        server = self.stack.spawn(
            "server-direct",
            [PYTHON, "-m", "portal.serve", "--host", "127.0.0.1", "--port", str(port)]
            + ["--workers", str(self.args.web_workers), "--log-level", "warning"],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: self._healthy(url), timeout=60, what="the portal without nginx")
            timings = self.send(self.all_files, self.parallel, url=url)
            span = max(r["end"] for r in timings) - min(r["start"] for r in timings)
            self.record("ours.direct.send.seconds", span)
            self.record("ours.direct.send.files_s", len(timings) / span)
            expected = REAL_AGENTS * len(self.all_files)
            wait_for(
                lambda: self.sql_one("SELECT count(*) FROM routing_delivery")[0] >= expected,
                timeout=1800,
                interval=0.2,
                what=f"{expected} deliveries queued",
            )
            self.receivers_start(url)
            # From the first lease to the last ack, as the Orthanc and nginx clients time
            # themselves: the agents' start-up (imports, first poll) is not the download.
            query = (
                "SELECT count(*) FILTER (WHERE status = 'delivered'),"
                " extract(epoch FROM max(delivered_at) - min(leased_at)) FROM routing_delivery"
            )
            wait_for(
                lambda: self.sql_one(query)[0] >= expected,
                timeout=1800,
                interval=0.2,
                what=f"{expected} deliveries acknowledged without nginx",
            )
            seconds = float(self.sql_one(query)[1])
            self.record("ours.direct.receive.seconds", seconds)
            self.record("ours.direct.receive.files_s", expected / seconds)
        finally:
            self.receivers_stop()
            server.stop()
            self.stack.processes.remove(server)

    # -- c. scale in subscribers -------------------------------------------------
    def scale(self) -> None:
        """The MR set uploaded to 1, 5, 50 and 500 subscribers; then the real agents among them receive it.

        The agents start once the set is routed: at 1 subscriber one agent receives, at the
        other levels five, and downloading beside the uploads their CPU on the same 2 cores
        set the upload p99 (at 5 subscribers 2.5 to 2.8 times the p99 at 500, measured), not the fan-out's cost.
        """
        paths = self.files["MR"]
        for level in SUBSCRIBER_LEVELS:
            self.reset()
            self.subscribers_active(level)
            log(f"scale: {level} subscribers")
            log_offset = len(self.worker.log())
            timings = self.send(paths, self.parallel)
            wait_for(
                lambda: (
                    self.sql_one("SELECT count(*) FROM routing_instance WHERE routed_at IS NOT NULL")[0] >= len(paths)
                ),
                timeout=600,
                what=f"fan-out to {level} centers",
            )
            self.receivers_start()
            try:
                real = self.subscriber_ids[: min(level, REAL_AGENTS)]
                wait_for(
                    lambda real=real: (
                        self.sql_one(
                            "SELECT count(*) FROM routing_delivery WHERE status = 'delivered' AND center_id = ANY(%s)",
                            real,
                        )[0]
                        >= len(real) * len(paths)
                    ),
                    timeout=600,
                    what=f"the real agents' deliveries at {level} subscribers",
                )
            finally:
                self.receivers_stop()
            latencies = [r["seconds"] * 1000 for r in timings]
            self.record(f"ours.scale.{level}.p50_ms", percentile(latencies, 50))
            self.record(f"ours.scale.{level}.p99_ms", percentile(latencies, 99))
            # A batch upload is routed by one route_instances task: its time is the whole batch's.
            tasks = [
                float(s) * 1000
                for s in re.findall(
                    r"routing\.tasks\.route_instances?\[[^\]]+\] succeeded in ([0-9.]+)s",
                    self.worker.log()[log_offset:],
                )
            ]
            self.record(f"ours.scale.{level}.task_p50_ms", percentile(tasks, 50))
            self.record(f"ours.scale.{level}.task_p99_ms", percentile(tasks, 99))

    # -- d. request rate -----------------------------------------------------------
    def request_rate(self) -> None:
        self.reset()  # the tables vacuumed and the queues empty (quiesce)
        self.subscribers_active(REAL_AGENTS)
        load = os.getloadavg()[0]
        self.record("ours.rate.load_1min_at_start", load)
        log(f"rate: tables vacuumed, queues empty, load average {load:.2f}")
        seconds = 3 if self.small else 10
        targets = {
            "longpoll": ("/api/v1/deliveries?wait=0&limit=10", self.receiver_keys[0]),
            "health": ("/api/v1/health", None),
        }
        for name, (path, key) in targets.items():
            for via, base in (("nginx", self.stack.url), ("direct", f"http://127.0.0.1:{self.app_port}")):
                command = ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "--timeout", "5s"]
                if key:
                    command += ["-H", f"Authorization: Bearer {key}"]
                # Unmeasured: a fresh worker's first requests import Django's URL conf and open
                # its database connections, which is not the steady rate. One request first records
                # the key's first use, as an agent's first poll does: 50 at once would all go the
                # full way while it is unrecorded (wrk's p99 at 0.7 s instead of 25 ms).
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                httpx.get(base + path, headers=headers, timeout=30).raise_for_status()
                warm_up = [*command[:3], "-d1s", *command[4:]]
                subprocess.run([*warm_up, base + path], capture_output=True, check=True, timeout=60)
                # nginx's pooled upstream connections are there too: only wrk's are counted.
                before = self._connections(self.app_port) if via == "direct" else {}
                wrk = subprocess.Popen([*command, base + path], stdout=subprocess.PIPE, text=True)
                if via == "direct":
                    # wrk's connections are all open by now; the kernel gave each to one worker.
                    time.sleep(seconds / 2)
                    held = {pid: 0 for pid in self._web_workers()}
                    for peer, pid in self._connections(self.app_port).items():
                        if peer not in before and pid in held:
                            held[pid] += 1
                    spread = sorted(held.values(), reverse=True)
                    self.record(f"ours.rate.{name}.direct.busiest_worker_share", max(spread) / max(1, sum(spread)))
                    log(f"rate {name} direct: wrk's connections per uvicorn worker {spread}")
                output, _ = wrk.communicate(timeout=seconds + 60)
                if wrk.returncode:
                    raise SystemExit(f"wrk {name} failed ({wrk.returncode})")
                rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))
                value, unit = re.search(r"99%\s+([0-9.]+)(us|ms|s)\b", output).groups()
                p99 = float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
                if errors:
                    raise SystemExit(f"wrk {name}: {errors.group(1)} error answers\n{output}")
                self.record(f"ours.rate.{name}.{via}.rps", rate)
                self.record(f"ours.rate.{name}.{via}.p99_ms", p99)

    def _connections(self, port: int) -> dict[str, int]:
        """The established connections to `port`: each client's address and port -> the pid holding it (ss -p)."""
        listing = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
        ).stdout
        found = {}
        for line in listing.splitlines():
            fields = line.split()
            owner = re.search(r"pid=(\d+)", line)
            if len(fields) >= 4 and owner:
                found[fields[3]] = int(owner.group(1))
        return found

    # -- e. memory -----------------------------------------------------------------
    def memory(self) -> None:
        self.reset()
        self.subscribers_active(0)
        workers = self._web_workers()
        baseline = {}
        for pid in workers:
            # Writing 5 resets the kernel's peak-RSS mark (VmHWM) to the current RSS.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            baseline[pid] = _status_kb(pid, "VmRSS")
        self.send([self.big], 1)
        growth = max(_status_kb(pid, "VmHWM") - baseline[pid] for pid in workers)
        self.record("ours.memory.rss_growth_mb", growth / 1024)
        self.record("ours.memory.instance_mb", self.big.stat().st_size / MB)

    def _web_workers(self) -> list[int]:
        master = self.server.popen.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        # uvicorn's master also starts multiprocessing's resource tracker, which serves nothing.
        return [int(pid) for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]

    # -- f. the floor and Orthanc ----------------------------------------------------
    def floor(self) -> None:
        target = self.tmp / "cp"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        cp = 0.0
        # One modality after the other, as the ingest phase sends them, so each set has its floor.
        for modality in self.files:
            start = time.monotonic()
            subprocess.run(["cp", "-r", str(self.data_root / modality), str(target)], check=True)
            # The exchange promises durability before it answers; so must the floor.
            copied = [str(p) for p in (target / modality).rglob("*.dcm")]
            subprocess.run(["sync", *copied], check=True)
            seconds = time.monotonic() - start
            self.record(f"floor.ingest.{modality}.mb_s", self.sizes[modality] / MB / seconds)
            cp += seconds
        shutil.rmtree(target)
        self.record("floor.cp.seconds", cp)
        self.record("floor.ingest.files_s", len(self.all_files) / cp)
        self.record("floor.ingest.mb_s", self.total / MB / cp)
        listing = [
            (f"http://127.0.0.1:{self.floor_port}/files/{p.relative_to(self.data_root)}", self.sha[str(p)])
            for p in self.all_files
        ]
        download = self._clients(listing, "nginx")
        self.record("floor.download.seconds", download)
        self.record("floor.fanout.seconds", cp + download)
        self.record("floor.fanout.mb_s", REAL_AGENTS * self.total / MB / (cp + download))

    def _clients(self, listing: list, name: str) -> float:
        listing_path = self.tmp / f"listing-{name}.json"
        listing_path.write_text(json.dumps(listing))
        clients = [
            subprocess.Popen(
                [PYTHON, "-m", "bench.clients", str(listing_path), str(self.tmp / f"{name}-client-{i}")],
                cwd=ROOT,
                stdout=subprocess.PIPE,
            )
            for i in range(REAL_AGENTS)
        ]
        reports = [json.loads(c.communicate()[0]) for c in clients]
        if any(c.returncode for c in clients):
            raise SystemExit(f"a {name} download client failed")
        for i in range(REAL_AGENTS):
            shutil.rmtree(self.tmp / f"{name}-client-{i}")
        return max(r["end"] for r in reports) - min(r["start"] for r in reports)

    def orthanc(self) -> None:
        manifest = self.tmp / "orthanc-files.json"
        manifest.write_text(json.dumps({m: [(str(p), self.sha[str(p)]) for p in ps] for m, ps in self.files.items()}))
        work = self.tmp / "orthanc"
        shutil.rmtree(work, ignore_errors=True)
        report = in_private_network(
            "bench.orthanc_peer",
            [str(manifest), str(work), "--parallel", str(self.parallel), "--clients", str(REAL_AGENTS)],
            what="the Orthanc peer",
            timeout=3600,
        )
        shutil.rmtree(work, ignore_errors=True)
        timings = []
        for run, (modality, part) in enumerate(report["ingest"].items()):
            self.record(f"orthanc.ingest.{modality}.mb_s", self.sizes[modality] / MB / (part["end"] - part["start"]))
            timings += [{"start": 0, "end": 0, **t, "run": run} for t in part["timings"]]
        ingest = sum(part["end"] - part["start"] for part in report["ingest"].values())
        self.record("orthanc.ingest.files_s", len(self.all_files) / ingest)
        self.record("orthanc.ingest.mb_s", self.total / MB / ingest)
        for q in (50, 95, 99):
            self.record(f"orthanc.ingest.p{q}_ms", percentile([t["seconds"] * 1000 for t in timings], q))
        download = max(r["end"] for r in report["download"]) - min(r["start"] for r in report["download"])
        self.record("orthanc.download.seconds", download)
        self.record("orthanc.fanout.seconds", ingest + download)
        self.record("orthanc.fanout.mb_s", REAL_AGENTS * self.total / MB / (ingest + download))

    # -- the run -------------------------------------------------------------------
    def run(self) -> dict:
        self.prepare_data()
        self.start_stack()
        phases = [
            ("floor", self.floor),
            ("orthanc", self.orthanc),
            ("ingest", self.ingest),
            ("fan-out", self.fanout),
            ("direct", self.direct),
            ("scale", self.scale),
            ("rate", self.request_rate),
            ("flood", partial(isolation.flood, self)),
            ("stat", partial(isolation.stat, self, agents=REAL_AGENTS)),
        ]
        if self.args.only:
            phases = [(name, phase) for name, phase in phases if name in self.args.only]
        for repeat in range(self.args.repeats):
            try:
                for name, phase in phases:
                    started = time.monotonic()
                    phase()
                    log(f"run {repeat + 1}/{self.args.repeats}: {name} done in {time.monotonic() - started:.1f} s")
            except Exception as exc:
                if repeat == 0:
                    raise
                # Keep the complete runs: a late failure should not cost the whole measurement.
                log(f"run {repeat + 1} failed ({exc!r}); keeping the {repeat} complete run(s)")
                self.args.repeats = repeat
                break
        if not self.args.only or "memory" in self.args.only:
            self.memory()
            log("memory done")
        return self.raw


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--small", action="store_true", help="a tenth of the data set and one run (under two minutes)")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3, 1 with --small)")
    parser.add_argument("--parallel", type=int, default=4, help="parallel uploads (agent send --parallel)")
    parser.add_argument("--web-workers", type=int, default=4, help="uvicorn --workers")
    parser.add_argument("--celery-workers", type=int, default=2, help="celery --concurrency")
    parser.add_argument("--seed", type=int, default=20221003)
    parser.add_argument(
        "--out", type=Path, help="where benchmarks.md/.json go (default docs/; var/bench/ for --small or --only)"
    )
    parser.add_argument("--label", default="", help="a note kept with the figures (e.g. the change measured)")
    parser.add_argument(
        "--only",
        type=lambda text: {part.strip() for part in text.split(",")},
        help="comma-separated phases: floor, orthanc, ingest, fan-out, direct, scale, rate, flood, stat, memory",
    )
    parser.add_argument(
        "--no-accel", action="store_true", help="downloads through Python instead of nginx (X-Accel-Redirect off)"
    )
    parser.add_argument(
        "--no-links", action="store_true", help="downloads authorised by the portal per file instead of signed links"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs) under var/bench")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.small else 3)
    args.out = args.out or (ROOT / "var" / "bench" if args.small or args.only else ROOT / "docs")
    # A terminated bench still stops its processes and drops its database.
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args)
    started = time.monotonic()
    before = machine()
    try:
        raw = bench.run()
    except BaseException:
        if hasattr(bench, "stack"):
            print(bench.stack.logs()[-8000:], file=sys.stderr)
        raise
    finally:
        bench.stop()
    from bench.report import write

    command = "make bench" + (" BENCH_ARGS=--small" if args.small else "")
    info = machine()
    info["load_average_before"] = before["load_average"]
    info["fresh_memory_mb_s_before"] = before["fresh_memory_mb_s"]
    write(
        args.out,
        raw=raw,
        machine=info,
        command=command,
        small=args.small or bool(args.only),
        repeats=args.repeats,
        parallel=args.parallel,
        label=args.label,
        seconds=time.monotonic() - started,
    )
    written = "benchmarks-small.json" if args.small or args.only else "benchmarks.md"
    log(f"done in {time.monotonic() - started:.0f} s; see {args.out / written}")
    return 0
