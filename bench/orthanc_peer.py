"""The Orthanc peer, run inside a private network namespace (Orthanc cannot bind to loopback alone).

`unshare -n` gives Orthanc and its clients a namespace whose only interface is
loopback, so nothing it listens on is reachable from outside. It ingests the
set over the REST API (POST /instances) with the same parallelism as the agent,
then five clients download every instance back (GET /instances/{id}/file).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.clients import upload_all


def in_private_network(module: str, args: list[str], *, what: str, timeout: int) -> dict:
    """`python -m module args` inside `unshare -n` (which needs root): its last line of output, as JSON."""
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _start(work: Path) -> subprocess.Popen:
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": 8042,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "StorageCompression": False,
        "HttpThreadsCount": 50,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    process = subprocess.Popen(["/usr/sbin/Orthanc", str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get("http://127.0.0.1:8042/system", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("Orthanc did not start; see " + str(work / "orthanc.log"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest", type=Path, help="JSON {modality: [[path, sha256], ...]}")
    parser.add_argument("work", type=Path)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args(argv)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    files = json.loads(args.manifest.read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    orthanc = _start(args.work)
    result: dict = {"ingest": {}}
    try:
        listing = []
        for modality, entries in files.items():
            paths = [Path(p) for p, _ in entries]
            start = time.time()
            timings, answers = upload_all("http://127.0.0.1:8042", "/instances", paths, args.parallel)
            result["ingest"][modality] = {"start": start, "end": time.time(), "timings": timings}
            for answer, (_, sha) in zip(answers, entries, strict=True):
                listing.append((f"http://127.0.0.1:8042/instances/{answer['ID']}/file", sha))
        listing_path = args.work / "listing.json"
        listing_path.write_text(json.dumps(listing))
        clients = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.clients", str(listing_path), str(args.work / f"client-{i}")],
                stdout=subprocess.PIPE,
            )
            for i in range(args.clients)
        ]
        reports = [json.loads(c.communicate()[0]) for c in clients]
        if any(c.returncode for c in clients):
            raise SystemExit("an Orthanc download client failed")
        result["download"] = reports
    finally:
        orthanc.terminate()
        orthanc.wait(30)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
