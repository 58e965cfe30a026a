"""The agent's own folder when none is configured, and the documented `scp` command that needs it."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from agent import config
from agent.config import default_state_dir
from tests.integration.stack import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_a_user_gets_the_xdg_state_folder():
    assert default_state_dir({"HOME": "/home/ana"}, euid=1000) == Path("/home/ana/.local/state/exchange-agent")
    assert default_state_dir({"HOME": "/home/ana", "XDG_STATE_HOME": "/srv/state"}, euid=1000) == Path(
        "/srv/state/exchange-agent"
    )
    # The XDG spec: a relative value is invalid and ignored.
    assert default_state_dir({"HOME": "/home/ana", "XDG_STATE_HOME": "state"}, euid=1000) == Path(
        "/home/ana/.local/state/exchange-agent"
    )


def test_root_and_a_systemd_service_get_var_lib(tmp_path, monkeypatch):
    assert default_state_dir({"HOME": "/root"}, euid=0) == Path("/var/lib/exchange-agent")
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/exchange-agent:/var/lib/other"}, euid=998) == Path(
        "/var/lib/exchange-agent"
    )
    system = tmp_path / "var-lib-exchange-agent"
    monkeypatch.setattr(config, "SYSTEM_STATE_DIR", system)
    service = {"HOME": "/nonexistent", "INVOCATION_ID": "0f3c"}
    # A desktop terminal runs under systemd too: without the system folder, the user's own.
    assert default_state_dir(service, euid=1000) == Path("/nonexistent/.local/state/exchange-agent")
    system.mkdir()
    assert default_state_dir(service, euid=1000) == system


def echo(port: int) -> int | None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="EXCHANGE")
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_documented_scp_command_runs_as_written_and_answers_c_echo(tmp_path):
    """`python -m agent scp --ae-title EXCHANGE --port 11112`, with only the server and key in the environment.

    A free port rather than 11112, which another test may hold. As a user, HOME is a
    temporary folder. As root the default is /var/lib/exchange-agent: the command then runs
    in a mount namespace of its own with an empty /var/lib, so nothing is left on the machine.
    """
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("EXCHANGE_", "XDG_")) and key not in ("INVOCATION_ID", "STATE_DIRECTORY")
    }
    env.update({"HOME": str(home), "EXCHANGE_SERVER": "http://127.0.0.1:9", "EXCHANGE_KEY": "k"})
    command = [sys.executable, "-m", "agent", "scp", "--ae-title", "EXCHANGE", "--port", str(port)]
    if os.geteuid() == 0:
        expected = Path("/var/lib/exchange-agent/spool")
        command = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /var/lib && exec "$@"', "sh", *command]
    else:
        expected = home / ".local" / "state" / "exchange-agent" / "spool"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: listening(port) or process.poll() is not None, what="the listener")
        assert process.poll() is None, process.communicate()[0]
        assert echo(port) == 0x0000
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert f"spooling into {expected}" in output
    assert "C-ECHO from ECHOSCU@127.0.0.1" in output
