"""tests/services.sh, `make test`'s set-up: which Debian packages it finds missing, and what it does about them.

It runs with a PATH of its own, in which the tools it looks up by name are absent, `id` answers the
user the test plays and `apt-get` only records what it was asked. PostgreSQL's and RabbitMQ's
start commands are absent from that PATH too, so the machine's own servers are left alone.
"""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Looked up on the PATH by the script: missing from the test's.
BY_NAME = ["npm", "dcmtk", "iproute2", "util-linux", "prometheus", "systemd", "openssl"]
# Looked up at fixed paths: missing only when this machine lacks them.
AT_PATHS = {
    "chromium": "/usr/bin/chromium",
    "orthanc": "/usr/sbin/Orthanc",
    "orthanc-dicomweb": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "nginx": "/usr/sbin/nginx",
    "rabbitmq-server": "/usr/lib/rabbitmq/bin/rabbitmq-server",
}
# What the script itself needs besides bash's builtins (the policy-rc.d guard, the wait loop).
TOOLS = ["chmod", "rm", "seq", "sleep", "ls", "head"]


def run_services(tmp_path: Path, *, uid: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in TOOLS:
        (stubs / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    (stubs / "id").write_text(f'#!/bin/bash\n[ "$1" = -u ] && echo {uid}\n')
    calls = tmp_path / "apt-get.calls"
    (stubs / "apt-get").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    for stub in ("id", "apt-get"):
        (stubs / stub).chmod(0o755)
    result = subprocess.run(
        ["/bin/bash", str(ROOT / "tests" / "services.sh")],
        env={"PATH": str(stubs), "LANG": "C"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, calls.read_text().splitlines() if calls.exists() else []


def expected_missing() -> list[str]:
    at_paths = [package for package, path in AT_PATHS.items() if not os.path.exists(path)]
    postgresql = [] if list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) else ["postgresql"]
    return BY_NAME + at_paths + postgresql


def test_without_root_it_installs_nothing_and_names_every_missing_package(tmp_path):
    result, apt_calls = run_services(tmp_path, uid=1000)

    assert result.returncode == 0, result.stderr
    assert apt_calls == []
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Missing for some tests")]
    assert sorted(line.partition("): ")[2].split()) == sorted(expected_missing())


def test_as_root_it_installs_the_missing_packages_with_apt_get(tmp_path):
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()

    result, apt_calls = run_services(tmp_path, uid=0)

    assert result.returncode == 0, result.stderr
    [update, install] = apt_calls
    assert update == "update -q"
    options, packages = install.split()[:4], install.split()[4:]
    assert options == ["install", "-y", "-q", "--no-install-recommends"]
    assert sorted(packages) == sorted(expected_missing())
    # The guard that keeps the packages' daemons from starting is gone again, if the script put it there.
    assert policy.exists() == had_policy
