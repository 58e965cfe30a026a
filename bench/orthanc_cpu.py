"""`unshare -n python -m bench.orthanc_cpu FILES...`: Orthanc's CPU per instance, as bench.profile prints ours.

Started as bench.orthanc_peer starts it (inside a private network namespace), Orthanc
takes the files over POST /instances from the benchmark's client, `--parallel` at a
time, after a warm-up of a few files. Prints one JSON line: the time, Orthanc's CPU and
the client's (this process), and the machine's idle and I/O wait shares over the upload.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.clients import upload_all
from bench.machine import cpu_seconds, cpu_times, idle_shares
from bench.orthanc_peer import _start

WARM_UP_FILES = 20


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orthanc_cpu", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args(argv)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="dx-orthanc-cpu-"))
    orthanc = _start(work)
    try:
        warm_up, files = args.files[:WARM_UP_FILES], args.files[WARM_UP_FILES:]
        upload_all("http://127.0.0.1:8042", "/instances", warm_up, args.parallel)
        machine, server, client = cpu_times(), cpu_seconds([orthanc.pid]), _own_cpu()
        started = time.monotonic()
        upload_all("http://127.0.0.1:8042", "/instances", files, args.parallel)
        report = {
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": time.monotonic() - started,
            "orthanc_cpu": cpu_seconds([orthanc.pid]) - server,
            "client_cpu": _own_cpu() - client,
            **idle_shares(machine, cpu_times()),
        }
    finally:
        orthanc.terminate()
        orthanc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
