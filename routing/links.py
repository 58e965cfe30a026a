"""Download links that nginx checks itself (its secure_link module), with no request to the portal.

A link names the delivery and the stored file and carries an expiry and an
MD5 over "<expires><path> <secret>", the one form `secure_link_md5` can
check. The delivery id in the path makes a link good for that delivery only;
the expiry is the lease's, so a link dies with the lease it came with.
"""

import base64
import hashlib
from datetime import datetime
from urllib.parse import quote


def signed_download_path(*, prefix: str, delivery_id: int, file_name: str, expires: datetime, secret: str) -> str:
    """The path and query of a signed link, e.g. /dl/42/instances/2026/11/25/ab.dcm?expires=...&md5=..."""
    path = f"{prefix.rstrip('/')}/{delivery_id}/{file_name}"
    stamp = int(expires.timestamp())
    digest = hashlib.md5(f"{stamp}{path} {secret}".encode(), usedforsecurity=False).digest()
    token = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return f"{quote(path)}?expires={stamp}&md5={token}"


def nginx_location(*, prefix: str, storage_dir: str, secret: str) -> str:
    """The nginx location that serves signed links, for the docs, the tests and the bench."""
    prefix = prefix.rstrip("/")
    return (
        f"location ~ ^{prefix}/\\d+/(?<dicom_file>instances/.+)$ {{\n"
        "  secure_link $arg_md5,$arg_expires;\n"
        f'  secure_link_md5 "$secure_link_expires$uri {secret}";\n'
        '  if ($secure_link = "") { return 403; }\n'
        '  if ($secure_link = "0") { return 410; }\n'
        "  types { } default_type application/dicom;\n"
        f"  alias {storage_dir.rstrip('/')}/$dicom_file;\n"
        "}\n"
    )
