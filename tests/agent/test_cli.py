"""The command as a user runs it, in a subprocess; none of these reach a network."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_agent(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_it_never_imports_django():
    code = "import sys, agent.cli; sys.exit(any(m.split('.')[0] == 'django' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_it_exits_2_with_a_clear_error_without_a_server():
    result = run_agent("send", "x.dcm", "--key", "k")
    assert result.returncode == 2
    assert "no portal address" in result.stderr


def test_receive_needs_an_existing_inbox(tmp_path):
    result = run_agent("receive", "--server", "https://x.example.org", "--key", "k", "--inbox", tmp_path / "nope")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_send_skips_non_dicom_files_and_fails_missing_ones(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    missing = tmp_path / "gone.dcm"
    # A closed local port: nothing here may need the network.
    result = run_agent("send", tmp_path, missing, "--server", "http://127.0.0.1:9", "--key", "k")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "0 sent, 0 already present, 1 skipped, 1 failed",
        f"failed: {missing}: No such file or directory",
    ]
    assert "notes.txt: skipped: not a DICOM file" in result.stderr


def test_only_non_dicom_files_is_not_a_failure(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run_agent("--server", "http://127.0.0.1:9", "--key", "k", "send", tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == "0 sent, 0 already present, 1 skipped, 0 failed"


def test_version():
    result = run_agent("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("exchange-agent ")
