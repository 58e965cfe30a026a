"""`manage.py run_periodic` as `make run` starts it: a real process, stopped by a real signal."""

import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.stack import PYTHON, ROOT, base_env, wait_for

# A bound on how long stopping may take, far above the "within a second" it is meant to
# take on a busy machine, and far below the hour the process would otherwise sleep.
STOP_BOUND_SECONDS = 10


@pytest.fixture
def env(tmp_path):
    env = base_env(tmp_path)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    # Its tasks run once at start, then it sleeps an hour before the next round.
    env["SWEEP_INTERVAL_SECONDS"] = "3600"
    migrate = subprocess.run(
        [PYTHON, "manage.py", "migrate", "--no-input", "-v0"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr
    return env


def asleep(pid: int) -> bool:
    """The process's main thread sleeps in select(2)/poll(2), as StopRequest.wait does between rounds."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().startswith("poll_schedule_timeout")
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_it_stops_at_once_on_a_signal_even_mid_sleep(env, tmp_path, signum):
    log = tmp_path / "run_periodic.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [PYTHON, "manage.py", "run_periodic"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "run_periodic: running" in log.read_text(), what="run_periodic to start", timeout=60)
        # Its first round of tasks done, it sleeps until the next: the sleep that used to ignore the signal.
        wait_for(lambda: asleep(process.pid), what="run_periodic to sleep after its first round", timeout=60)
        process.send_signal(signum)
        try:
            code = process.wait(STOP_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run_periodic still runs {STOP_BOUND_SECONDS}s after {signum.name}:\n{log.read_text()}")
        assert code == 0, log.read_text()
        assert "run_periodic: stopped" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
