"""The secret and signature of a center's webhook.

The secret is never stored: it is derived from SECRET_KEY and the center's salt, shown to
the center's administrators, and changed by giving the center a new salt.
"""

import hashlib
import hmac

from django.utils.crypto import salted_hmac

from centers.models import Center

SIGNATURE_HEADER = "X-Exchange-Signature"
TIMESTAMP_HEADER = "X-Exchange-Timestamp"


def webhook_secret(center: Center) -> str:
    return salted_hmac("centers.webhook", f"{center.pk}:{center.webhook_salt}", algorithm="sha256").hexdigest()


def webhook_signature(*, secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256, keyed with the secret, of `<timestamp>.<body>`.

    The timestamp is signed with the body so that a captured request cannot be replayed
    later under a fresh timestamp.
    """
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"
