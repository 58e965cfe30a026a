"""A three-node RabbitMQ cluster on this machine, for the tests that are about losing a broker node.

Each node is a real `rabbitmq-server` with its own name, ports, data, logs and configuration in
a temporary folder; the three share one Erlang cookie (a `.erlang.cookie` in the HOME each node
and each `rabbitmqctl` runs with) and are joined with `rabbitmqctl join_cluster`. The machine's
own RabbitMQ (rabbit@<host> on 5672) is never touched: Debian's /etc/rabbitmq files are not read,
and every command names its node.
"""

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

from tests.integration.stack import Process, wait_for

# Debian's /usr/sbin wrappers switch to the rabbitmq user (and its HOME, with the machine's cookie)
# when run as root: the scripts behind them run as the caller, with this cluster's HOME.
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports below 30000: the command-line tools use the distribution port + 10000 and up."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 29999)
        if port not in chosen and _port_is_free(port) and _port_is_free(port + 10000):
            chosen.append(port)
    return chosen


class RabbitNode:
    def __init__(self, *, name: str, port: int, dist_port: int, root: Path, cookie: str) -> None:
        self.name = name
        self.port = port
        self.dist_port = dist_port
        self.root = root
        self.url = f"amqp://guest:guest@127.0.0.1:{port}//"
        self.process: Process | None = None
        home = root / "home"
        home.mkdir(parents=True)
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)
        config = root / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.1 = 127.0.0.1:{port}\n"
            "loopback_users.guest = true\n"
            # The test machine's disk may be nearly full of other helpers' files; a node that
            # blocks publishers on a free-disk alarm would stall the test, not fail it.
            "disk_free_limit.absolute = 1MB\n"
        )
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(home),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def spawn(self) -> None:
        self.process = Process(self.name.partition("@")[0], [str(RABBIT_BIN / "rabbitmq-server")], self.env, self.root)

    def wait_started(self) -> None:
        # await_startup waits for a node that epmd knows; until then it fails at once.
        wait_for(self._started, timeout=120, interval=1, what=f"RabbitMQ node {self.name}")

    def _started(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"RabbitMQ node {self.name} exited:\n{self.log()[-4000:]}")
        return self.ctl("await_startup", "--timeout", "10", timeout=30, check=False).returncode == 0

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def kill(self) -> None:
        """The node dies at once, as on a power cut: no clean hand-over of its queue leaders."""
        if self.process is not None:
            self.process.stop(signal.SIGKILL)

    def stop(self) -> None:
        if self.process is None or self.process.popen.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        self.process.stop()

    def log(self) -> str:
        return self.process.log() if self.process else ""


class RabbitCluster:
    """Three nodes joined into one cluster; `url` is the failover list Celery is given."""

    def __init__(self, root: Path, *, size: int = 3) -> None:
        self.root = root
        suffix = uuid.uuid4().hex[:6]
        cookie = secrets.token_hex(20).upper()
        ports = _free_ports(2 * size)
        self.nodes = [
            RabbitNode(
                name=f"dx{i + 1}-{suffix}@localhost",
                port=ports[2 * i],
                dist_port=ports[2 * i + 1],
                root=root / f"dx{i + 1}",
                cookie=cookie,
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_started()
        first, *others = self.nodes
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        wait_for(lambda: len(self.running_nodes()) == len(self.nodes), timeout=60, what="all nodes in the cluster")

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        """The cluster's running nodes as one of its live members sees them."""
        node = via or next(n for n in self.nodes if n.process and n.process.popen.poll() is None)
        result = node.ctl("cluster_status", "--formatter", "json", check=False)
        if result.returncode != 0:
            return []
        return json.loads(result.stdout).get("running_nodes", [])

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"===== {node.name} =====\n{node.log()[-4000:]}" for node in self.nodes)
