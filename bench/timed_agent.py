"""`python -m bench.timed_agent <agent arguments>`: the real site agent, timing each upload.

The agent's own code runs unchanged; its upload function is wrapped so every
file's latency (request start to answer) lands in $BENCH_LATENCY_OUT as JSON lines.
"""

import json
import os
import sys
import threading
import time

from agent import cli, send

_lock = threading.Lock()
_upload = send.upload_file


def _timed(client, path, *args, **kwargs):
    start = time.time()
    outcome = _upload(client, path, *args, **kwargs)
    end = time.time()
    line = json.dumps(
        {"size": path.stat().st_size, "start": start, "end": end, "seconds": end - start, "status": outcome.status_code}
    )
    with _lock, open(os.environ["BENCH_LATENCY_OUT"], "a") as out:
        out.write(line + "\n")
    return outcome


send.upload_file = _timed

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
