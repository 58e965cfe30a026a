"""`python -m bench.timed_agent <agent arguments>`: the real site agent, timing each upload.

The agent's own code runs unchanged; its upload function (a batch of files, or a lone
file) is wrapped so every file's latency (request start to answer) lands in
$BENCH_LATENCY_OUT as JSON lines. A file sent in a batch waits for the batch's answer.
"""

import json
import os
import sys
import threading
import time

from agent import batches, cli

_lock = threading.Lock()
_upload = batches.upload_batch


def _timed(client, paths, *args, **kwargs):
    start = time.time()
    outcomes = _upload(client, paths, *args, **kwargs)
    end = time.time()
    lines = [
        json.dumps(
            {
                "size": path.stat().st_size,
                "start": start,
                "end": end,
                "seconds": end - start,
                "status": outcome.status_code,
                "batch": len(paths),
            }
        )
        for path, outcome in zip(paths, outcomes, strict=True)
    ]
    with _lock, open(os.environ["BENCH_LATENCY_OUT"], "a") as out:
        out.write("".join(line + "\n" for line in lines))
    return outcomes


batches.upload_batch = _timed

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
