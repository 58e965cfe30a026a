"""`python -m bench.stow`: STOW-RS ingest through dicomweb-client against the real stack.

The portal runs as README deploys it (`python -m portal.serve`, a Celery worker on
RabbitMQ, a fresh PostgreSQL database); one subscribing center makes every instance
fan out. Each run stores --files new CT instances of 512x512 16-bit (0.5 MB) in
requests of --per-request with dicomweb-client's store_instances, one request after
another, and prints files/s, MB/s and /proc/loadavg (the machine is shared).
"""

import argparse
import io
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pydicom
from dicomweb_client.api import DICOMwebClient
from kombu import Connection
from pydicom.uid import generate_uid

from bench.machine import MB
from tests.dicomfiles import sample_path
from tests.integration.stack import PYTHON, ROOT, Stack, base_env, stat_queue, wait_for

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/dicom_exchange")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def ct_instances(count: int) -> list[pydicom.Dataset]:
    """`count` CT instances of one new series, each 512x512 16-bit."""
    template = pydicom.dcmread(sample_path("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.PixelData = os.urandom(512 * 512 * 2)
    study, series = generate_uid(), generate_uid()
    instances = []
    for number in range(1, count + 1):
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        instances.append(ds)
    return instances


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def size_of(ds: pydicom.Dataset) -> int:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return len(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--per-request", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--web-workers", type=int, default=2)
    args = parser.parse_args(argv)

    base, _, _ = DATABASE_URL.rpartition("/")
    database = f"dx_stow_bench_{uuid.uuid4().hex[:8]}"
    queue = f"dx-stow-bench-{uuid.uuid4().hex[:8]}"
    tmp = ROOT / "var" / "bench" / f"stow-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    env = base_env(tmp)
    env.update({"DATABASE_URL": f"{base}/{database}", "CELERY_BROKER_URL": BROKER_URL, "CELERY_QUEUE": queue})
    env["LOG_LEVEL"] = "WARNING"
    stack = Stack(tmp=tmp, env=env, with_worker=True)
    try:
        stack.manage("migrate", "--no-input", "-v0")
        stack.spawn(
            "server",
            [PYTHON, "-m", "portal.serve", "--host", "127.0.0.1", "--port", str(stack.port)]
            + ["--workers", str(args.web_workers), "--log-level", "warning"],
        )
        stack.start_worker()
        stack.start_stat_worker()
        wait_for(lambda: stack._healthy(stack.port), what="the portal")
        stack.load_network(
            """
regions:
  - {slug: fars, name: Fars, cities: [{slug: shiraz, name: Shiraz}]}
  - {slug: tehran, name: Tehran, cities: [{slug: tehran, name: Tehran}]}
centers:
  - {slug: publisher, name: Shiraz Imaging, city: fars/shiraz, publish: true, subscribe: false}
  - {slug: partner, name: Tehran Hospital, city: tehran/tehran, publish: false, subscribe: true,
     subscriptions: ["fars.#"]}
"""
        )
        client = DICOMwebClient(
            url=f"{stack.url}/dicomweb", headers={"Authorization": f"Bearer {stack.issue_key('publisher')}"}
        )
        client.store_instances(datasets=ct_instances(1))  # warm: connections, the workers' first request
        for run in range(1, args.runs + 1):
            instances = ct_instances(args.files)
            total = sum(size_of(ds) for ds in instances[:1]) * len(instances)
            load = loadavg()
            started = time.perf_counter()
            for first in range(0, len(instances), args.per_request):
                client.store_instances(datasets=instances[first : first + args.per_request])
            seconds = time.perf_counter() - started
            print(
                f"run {run}: {len(instances)} files, {total / MB:.0f} MB in {seconds:.2f} s: "
                f"{len(instances) / seconds:.1f} files/s, {total / MB / seconds:.1f} MB/s "
                f"(loadavg before {load}, after {loadavg()})",
                flush=True,
            )
    finally:
        stack.stop()
        with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        with Connection(BROKER_URL) as connection:
            connection.channel().queue_delete(queue)
            connection.channel().queue_delete(stat_queue(env))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
