"""The first ten minutes: `make run`, log in with the printed clinician login, see the demo study."""

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from demo.studies import STUDY_UID
from tests.integration.stack import ROOT, base_env, free_port, wait_for

pytestmark = pytest.mark.integration


def group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group, as "pid command line"."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the fields follow its last ")".
            state, _ppid, group = (proc / "stat").read_text().rpartition(")")[2].split()[:3]
            if int(group) == pgid and state != "Z":
                members.append(f"{proc.name} {(proc / 'cmdline').read_bytes().replace(b'\0', b' ').decode()}")
        except (FileNotFoundError, ProcessLookupError):
            continue
    return members


def printed_login(log: Path, center: str) -> tuple[str, str] | None:
    match = re.search(rf"^  {center}\s+(\S+) / (\S+)", log.read_text(errors="replace"), re.MULTILINE)
    return (match.group(1), match.group(2)) if match else None


def received_page(url: str, username: str, password: str) -> str:
    """What a newcomer sees who opens / and logs in on the page it leads to."""
    with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as browser:
        form = browser.get("/")
        assert form.url.path == "/login/", form.url
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        response = browser.post(
            str(form.url),
            data={"username": username, "password": password, "csrfmiddlewaretoken": token},
            follow_redirects=False,
        )
        assert response.status_code == 302 and response.headers["location"] == "/received/", response.text
        return browser.get("/received/").text


def test_make_run_serves_the_demo_study_to_the_printed_clinician_login(tmp_path):
    env = base_env(tmp_path)
    # A `make test` around this test must not hand its own flags to this make.
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(key, None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "make-run.log"
    # -o: the shared venv is installed already; the worktree's requirement files may look newer.
    args = ["make", "--no-print-directory", "-o", ".venv/.installed", "HOST=127.0.0.1", f"PORT={port}", "run"]
    with log.open("wb") as out:
        make = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        login = wait_for(
            lambda: printed_login(log, "tehran-hospital") or make.poll() is not None,
            timeout=240,
            what="make run to print the Tehran Hospital clinician login",
        )
        assert make.poll() is None, log.read_text()
        output = log.read_text()
        assert "Administrator: admin / " in output and "dx_" in output
        assert "published by Shiraz Imaging Center: 32 new instance(s), 0 already stored" in output
        assert "routed to: Marvdasht Clinic Imaging (12), Tehran Hospital (32)" in output

        def demo_study_received() -> bool:
            try:
                return f'data-study-uid="{STUDY_UID}"' in received_page(url, *login)
            except httpx.TransportError:
                return False  # uvicorn is still starting

        wait_for(demo_study_received, timeout=60, interval=1, what="the demo study on /received/")
        assert len(list((tmp_path / "storage").rglob("*.dcm"))) == 32
        # The demo study waits for Tehran Hospital's agent: the scrape from this machine says so.
        metrics = httpx.get(f"{url}/metrics", timeout=30)
        assert metrics.status_code == 200, metrics.text
        assert 'dicom_exchange_deliveries_queued{center="tehran-hospital"} 32.0' in metrics.text
        running = " ".join(group_members(make.pid))
        assert "manage.py run_periodic" in running and "uvicorn portal.asgi" in running
    finally:
        # What Ctrl-C in the terminal does: SIGINT to the whole foreground process group.
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)
        try:
            wait_for(
                lambda: make.poll() is not None and not group_members(make.pid),
                timeout=60,
                what="make, run_periodic and every uvicorn process to exit on Ctrl-C",
            )
        finally:
            for line in group_members(make.pid):
                os.kill(int(line.split()[0]), signal.SIGKILL)
            make.wait(timeout=30)
