"""Private network namespaces for the DICOM peers that cannot bind to loopback alone.

dcmtk's storescp and Orthanc listen on every interface. Each runs in its own network
namespace, which has nothing but loopback, so no traffic can leave the machine. The
portal and the agent stay in the test's namespace and reach the peer through a relay
in this process: it listens on 127.0.0.1 here and, for each connection, opens one to
the peer's port from a thread that has entered the peer's namespace (os.setns switches
the calling thread only). A peer that calls out (Orthanc's DICOMweb client calling the
portal) gets the reverse: a listener made inside its namespace, whose connections are
carried to a port here. Real bytes pass through unchanged; only the TCP hop is added.
"""

import os
import socket
import subprocess
import threading

from tests.integration.stack import free_port


class Namespace:
    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
        )
        line = self.holder.stdout.readline()
        if line != b"up\n":
            self.holder.kill()
            raise AssertionError("cannot create a network namespace (unshare -n needs root or CAP_SYS_ADMIN)")
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self._fd = os.open(self.path, os.O_RDONLY)
        self._listeners: list[socket.socket] = []

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *args]

    def relay(self, port: int) -> int:
        """A port on this namespace's 127.0.0.1 that leads to `port` inside the private one."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(16)
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, port, True), daemon=True).start()
        return listener.getsockname()[1]

    def expose(self, port: int) -> int:
        """A port on the private namespace's 127.0.0.1 that leads to `port` on this one's."""
        made: list[socket.socket] = []

        def listen() -> None:
            # A socket belongs to the namespace it was made in, whichever thread uses it later.
            os.setns(self._fd, os.CLONE_NEWNET)
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            made.append(listener)

        thread = threading.Thread(target=listen)
        thread.start()
        thread.join()
        listener = made[0]
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, port, False), daemon=True).start()
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket, port: int, inward: bool) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client, port, inward), daemon=True).start()

    def _connect(self, client: socket.socket, port: int, inward: bool) -> None:
        if inward:
            os.setns(self._fd, os.CLONE_NEWNET)  # this thread only, and it ends with the connection
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self.holder.kill()
        self.holder.wait()
        os.close(self._fd)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
