"""A real HTTP server on loopback that receives webhooks and verifies their signature."""

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def verifies(self, secret: str) -> bool:
        """What a receiver does: HMAC-SHA256 of `<timestamp>.<body>` with the secret, compared in constant time."""
        timestamp = self.headers.get("x-exchange-timestamp", "")
        expected = hmac.new(secret.encode(), timestamp.encode() + b"." + self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-exchange-signature", ""), f"sha256={expected}")


@dataclass
class WebhookServer:
    """Answers each POST with the next of `statuses` (the last one repeats); `location` goes with a 3xx."""

    statuses: list[int] = field(default_factory=lambda: [200])
    location: str = ""
    received: list[Received] = field(default_factory=list)

    def __enter__(self) -> "WebhookServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                status = owner.statuses[min(len(owner.received), len(owner.statuses)) - 1]
                self.send_response(status)
                if owner.location:
                    self.send_header("Location", owner.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/exchange"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
