"""`python -m bench.flooder URL KEY FILE...`: upload the files over and over from 8 threads until SIGTERM.

A process of its own, so the flood's client work never slows the measured client's
threads. Prints {status: count} as JSON when stopped.
"""

import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx

THREADS = 8


def main() -> None:
    url, key, *paths = sys.argv[1:]
    bodies = [Path(p).read_bytes() for p in paths]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    answers: Counter[int] = Counter()
    lock = threading.Lock()

    def flood() -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"}
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                for body in bodies:
                    if stop.is_set():
                        return
                    status = client.post("/api/v1/instances", content=body, headers=headers).status_code
                    with lock:
                        answers[status] += 1

    threads = [threading.Thread(target=flood) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    print("flooding", flush=True)
    for thread in threads:
        thread.join()
    print(json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
