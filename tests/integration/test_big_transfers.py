"""A big instance goes through a web process without its bytes ever being held whole in memory."""

import hashlib
from pathlib import Path

import httpx
import pytest

from bench.dataset import big_instance
from tests.integration.stack import free_port, wait_for

pytestmark = pytest.mark.integration
MB = 1024 * 1024


def _workers(server_pid: int) -> list[int]:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peaks(pids: list[int]) -> dict[int, int]:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS
    return {pid: _kb(pid, "VmRSS") for pid in pids}


def _growth_mb(baseline: dict[int, int]) -> float:
    return max(_kb(pid, "VmHWM") - rss for pid, rss in baseline.items()) / 1024


def test_a_150_mb_upload_and_its_download_keep_the_web_process_small(postgres_stack, pg_network, tmp_path):
    stack = postgres_stack
    port = free_port()
    server = stack.start_server(port=port, name="server-big")
    url = f"http://127.0.0.1:{port}"
    workers = _workers(server.popen.pid)
    assert workers, "uvicorn started no worker processes"
    big = big_instance(tmp_path, seed=7, megabytes=150)
    digest = hashlib.sha256(big.read_bytes()).hexdigest()

    baseline = _reset_peaks(workers)
    sent = stack.agent(pg_network.keys["own"], "send", str(big), server=url, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    upload_growth = _growth_mb(baseline)

    headers = {"Authorization": f"Bearer {pg_network.keys['partner']}"}
    item = wait_for(
        lambda: httpx.get(f"{url}/api/v1/deliveries", params={"limit": 1}, headers=headers, timeout=30).json(),
        what="the big delivery",
    )[0]
    baseline = _reset_peaks(workers)
    sha = hashlib.sha256()
    with httpx.stream("GET", f"{url}/api/v1/deliveries/{item['id']}/file", headers=headers, timeout=300) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            sha.update(chunk)
    download_growth = _growth_mb(baseline)

    assert sha.hexdigest() == digest == item["sha256"]
    assert upload_growth < 50, f"a web process grew {upload_growth:.0f} MB during the upload"
    assert download_growth < 50, f"a web process grew {download_growth:.0f} MB during the download"
