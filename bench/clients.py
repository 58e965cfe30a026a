"""The clients the floor and the Orthanc peer are measured with.

They do the same per-file work as the site agent: uploads stream the file with
keep-alive connections, downloads go through the agent's own atomic writer
(temporary file, SHA-256, fsync, rename), so the comparison is of servers, not
of clients.
"""

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from agent.atomic import write_verified

DOWNLOAD_ATTEMPTS = 3


def upload_all(base_url: str, path: str, files: list[Path], parallel: int) -> tuple[list[dict], list[dict]]:
    """POST every file's bytes to base_url+path, `parallel` at a time; return (timings, answers)."""
    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    with httpx.Client(base_url=base_url, limits=limits, timeout=120) as client:

        def one(file: Path) -> tuple[dict, dict]:
            start = time.monotonic()
            with file.open("rb") as body:
                response = client.post(path, content=body, headers={"Content-Type": "application/dicom"})
            response.raise_for_status()
            return {"size": file.stat().st_size, "seconds": time.monotonic() - start}, response.json()

        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(one, files))
    return [r[0] for r in results], [r[1] for r in results]


def fetch_all(urls: list[tuple[str, str]], dest: Path, threads: int) -> int:
    """Download (url, sha256) pairs into dest with the agent's writer; return the bytes written."""
    dest.mkdir(parents=True, exist_ok=True)
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    with httpx.Client(limits=limits, timeout=120) as client:

        def fetch(index: int, url: str, sha256: str) -> int:
            with client.stream("GET", url) as response:
                response.raise_for_status()
                write_verified(dest / f"{index:05d}.dcm", response.iter_bytes(), sha256)
            return int(response.headers.get("content-length", 0))

        def one(item: tuple[int, tuple[str, str]]) -> int:
            index, (url, sha256) = item
            # The agent retries a transport error; so does this client, or one such error (an
            # httpx ReadError, EBADF, stopped a whole full run on 2026-11-29) ends the bench.
            for _ in range(DOWNLOAD_ATTEMPTS - 1):
                try:
                    return fetch(index, url, sha256)
                except httpx.TransportError:
                    continue
            return fetch(index, url, sha256)

        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, enumerate(urls)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.clients fetch LIST DEST THREADS`: one of the floor's parallel downloading clients."""
    parser = argparse.ArgumentParser()
    parser.add_argument("listing", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    urls = [tuple(pair) for pair in json.loads(args.listing.read_text())]
    start = time.time()
    size = fetch_all(urls, args.dest, args.threads)
    print(json.dumps({"bytes": size, "start": start, "end": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
