"""`python -m bench.profile`: where an upload's CPU goes, per instance, on the production stack.

Runs PostgreSQL (a fresh database), RabbitMQ (a queue of its own), uvicorn and a
Celery worker, then one real `agent send` of generated CT files to a network of
five subscribers, with py-spy recording the web and worker processes. Prints the
CPU seconds each part of the stack spent per instance (web, worker, the database's
backends, the agent) and writes py-spy's flame graphs next to --out. With --receivers N,
N subscribers run `agent receive` as `make bench` does, and their CPU per file received
is printed too (from their first long poll to the last ack). With --orthanc, Orthanc then
takes the same files from the benchmark's client, and its CPU and the client's are printed
the same way (bench.orthanc_cpu).
"""

import argparse
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench import dataset, orthanc_cpu
from bench.machine import cpu_seconds, cpu_times, idle_shares, user_system_seconds
from bench.orthanc_peer import in_private_network
from tests.integration.stack import BIN, PYTHON, ROOT, Stack, base_env, wait_for

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/dicom_exchange")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
NETWORK = """
regions:
  - {slug: fars, name: Fars, cities: [{slug: shiraz, name: Shiraz}]}
centers:
  - {slug: publisher, name: Publisher, city: fars/shiraz, publish: true, subscribe: false}
""" + "".join(
    f"  - {{slug: sub-{n}, name: Subscriber {n}, city: fars/shiraz, publish: false, subscribe: true, "
    "subscriptions: ['#']}\n"
    for n in range(5)
)
# Files sent and routed before the measured send: start-up is not per file.
WARM_UP_FILES = 100


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found.append(current)
        children = Path(f"/proc/{current}/task/{current}/children")
        if children.exists():
            frontier += [int(c) for c in children.read_text().split()]
    return found


def backends(stack: Stack, database: str) -> list[int]:
    return [pid for (pid,) in stack.sql("SELECT pid FROM pg_stat_activity WHERE datname = %s", database)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "profile" / "profile")
    parser.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "dx-profile-data", help="the generated files (kept)"
    )
    parser.add_argument("--no-py-spy", action="store_true", help="CPU figures only, without the sampling profiler")
    parser.add_argument("--receivers", type=int, default=0, help="subscribers running `agent receive` (at most 5)")
    parser.add_argument(
        "--orthanc", action="store_true", help="then Orthanc's CPU per instance for the same files (bench.orthanc_cpu)"
    )
    args = parser.parse_args(argv)
    import psycopg

    tmp = Path(tempfile.mkdtemp(prefix="dx-profile-"))
    base, _, _ = DATABASE_URL.rpartition("/")
    database = f"dx_profile_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    env = base_env(tmp)
    for name in ("SWEEP_INTERVAL_SECONDS", "SWEEP_GRACE_SECONDS", "DELIVERY_POLL_INTERVAL"):
        # The production defaults, as make bench runs: the tests' one-second sweeps would
        # cost the worker about as much CPU as the fan-out being measured.
        env.pop(name)
    env.update(
        {
            "DATABASE_URL": f"{base}/{database}",
            "CELERY_BROKER_URL": BROKER_URL,
            "CELERY_QUEUE": f"dx-profile-{uuid.uuid4().hex[:8]}",
            "LOG_LEVEL": "WARNING",
        }
    )
    stack = Stack(tmp=tmp, env=env, with_worker=True)
    spies = []
    try:
        stack.start()
        stack.load_network(NETWORK)
        key = stack.issue_key("publisher")
        generated = dataset.generate(args.data, seed=7, scale=0.5)
        files = generated["CT"][: args.files]
        server, worker = stack.processes[0], stack.processes[1]

        def send(paths: list[Path]) -> None:
            agent = subprocess.run(
                [PYTHON, "-m", "agent", "--server", stack.url, "--key", key, "send", "--parallel", str(args.parallel)]
                + [str(f) for f in paths],
                cwd=ROOT,
                env={**env, "TCP_NODELAY": "1"},
                capture_output=True,
                text=True,
            )
            if f"{len(paths)} sent" not in agent.stdout:
                raise SystemExit(f"agent send failed:\n{agent.stdout}\n{agent.stderr[-3000:]}")

        for n in range(min(args.receivers, 5)):
            (tmp / f"inbox-{n}").mkdir()
        receivers = [
            stack.spawn(
                f"receiver-{n}",
                [PYTHON, "-m", "agent", "--server", stack.url, "--key", stack.issue_key(f"sub-{n}"), "receive"]
                + ["--inbox", str(tmp / f"inbox-{n}"), "--state-dir", str(tmp / f"state-{n}")],
                env={**env, "TCP_NODELAY": "1"},
            )
            for n in range(min(args.receivers, 5))
        ]
        # Start-up is not per file: the receivers' imports and first poll, and the web workers'
        # and the worker's first requests and tasks (a connection, lazily built caches).
        warm_up = generated["MR"][:WARM_UP_FILES]
        send(warm_up)
        expected = 5 * (len(files) + len(warm_up))
        wait_for(
            lambda: stack.sql("SELECT count(*) FROM routing_delivery")[0][0] >= 5 * len(warm_up),
            timeout=300,
            what="the warm-up's fan-out",
        )
        if receivers:
            wait_for(
                lambda: (
                    stack.sql("SELECT count(*) FROM routing_delivery WHERE status = 'delivered'")[0][0]
                    >= len(warm_up) * len(receivers)
                ),
                timeout=300,
                what="the warm-up's acks",
            )
        time.sleep(1)
        receivers_before = cpu_seconds([pid for r in receivers for pid in tree(r.popen.pid)])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not args.no_py_spy:
            for name, process in (("web", server), ("worker", worker)):
                spies.append(
                    subprocess.Popen(
                        [str(BIN / "py-spy"), "record", "--subprocesses", "--rate", "200", "--pid"]
                        + [str(process.popen.pid), "--format", "flamegraph", "-o", f"{args.out}-{name}.svg"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1)
        before_pg = {pid: cpu_seconds([pid]) for pid in backends(stack, database)}
        web_before = user_system_seconds(tree(server.popen.pid))
        worker_before = cpu_seconds(tree(worker.popen.pid))
        machine_before = cpu_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        agent_before = children.ru_utime + children.ru_stime
        started = time.monotonic()
        send(files)
        sent = time.monotonic() - started
        idle = idle_shares(machine_before, cpu_times())
        wait_for(
            lambda: stack.sql("SELECT count(*) FROM routing_delivery")[0][0] >= expected,
            timeout=300,
            what="the fan-out",
        )
        routed = time.monotonic() - started
        after_pg = {pid: cpu_seconds([pid]) for pid in backends(stack, database)}
        web_after = user_system_seconds(tree(server.popen.pid))
        web_user, web_system = web_after[0] - web_before[0], web_after[1] - web_before[1]
        figures = {
            "web": web_user + web_system,
            "worker": cpu_seconds(tree(worker.popen.pid)) - worker_before,
            "postgresql": sum(after_pg[pid] - before_pg.get(pid, 0.0) for pid in after_pg),
        }
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures["agent"] = children.ru_utime + children.ru_stime - agent_before
        if receivers:
            wait_for(
                lambda: (
                    stack.sql("SELECT count(*) FROM routing_delivery WHERE status = 'delivered'")[0][0]
                    >= len(receivers) * (len(files) + len(warm_up))
                ),
                timeout=600,
                what="the receivers' acks",
            )
            received = cpu_seconds([pid for r in receivers for pid in tree(r.popen.pid)]) - receivers_before
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} CT files, {size / 1024 / 1024:.1f} MB: sent in {sent:.2f} s, routed in {routed:.2f} s")
        print(f"{len(files) / sent:.0f} files/s, {size / 1024 / 1024 / sent:.1f} MB/s")
        # The send's time includes the agent's start (about 0.4 s of one core), in its CPU too.
        print(f"machine over the send: {idle['idle']:.0%} idle, {idle['iowait']:.0%} waiting for I/O")
        for name, seconds in figures.items():
            print(f"  {name:<11} {seconds:6.2f} s CPU, {seconds / len(files) * 1000:5.1f} ms per instance")
            if name == "web":
                print(f"  {'':<11} ({web_user:.2f} s in its own code, {web_system:.2f} s in the kernel)")
        total = sum(v for k, v in figures.items() if k != "agent")
        print(f"  {'portal':<11} {total:6.2f} s CPU, {total / len(files) * 1000:5.1f} ms per instance")
        if receivers:
            per_file = received / len(receivers) / len(files) * 1000
            print(f"  {'receivers':<11} {received:6.2f} s CPU, {per_file:5.1f} ms per file received ({len(receivers)})")
        if args.orthanc:
            orthanc_report(files, args.parallel)
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
        stack.stop()
        with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def orthanc_report(files: list[Path], parallel: int) -> None:
    """The same files into Orthanc (inside `unshare -n`, which needs root), its CPU per instance printed as ours."""
    report = in_private_network(
        "bench.orthanc_cpu", ["--parallel", str(parallel), *map(str, files)], what="bench.orthanc_cpu", timeout=600
    )
    count, megabytes, seconds = report["files"], report["bytes"] / 1024 / 1024, report["seconds"]
    print(f"Orthanc, {count} of the same files (after {orthanc_cpu.WARM_UP_FILES}): {seconds:.2f} s")
    print(f"{count / seconds:.0f} files/s, {megabytes / seconds:.1f} MB/s")
    print(f"machine over the upload: {report['idle']:.0%} idle, {report['iowait']:.0%} waiting for I/O")
    for name in ("orthanc", "client"):
        cpu = report[f"{name}_cpu"]
        print(f"  {name:<11} {cpu:6.2f} s CPU, {cpu / count * 1000:5.1f} ms per instance")


if __name__ == "__main__":
    raise SystemExit(main())
