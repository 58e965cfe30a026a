"""Signed download links: the same MD5 nginx's secure_link_md5 computes."""

import base64
import hashlib
from datetime import UTC, datetime

from routing.links import signed_download_path

EXPIRES = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def sign(**overrides) -> str:
    arguments = {
        "prefix": "/dl/",
        "delivery_id": 7,
        "file_name": "instances/2026/11/25/ab.dcm",
        "expires": EXPIRES,
        "secret": "s3cret",
    }
    return signed_download_path(**(arguments | overrides))


def test_the_link_carries_the_expiry_and_nginx_s_md5():
    stamp = int(EXPIRES.timestamp())
    expected = base64.urlsafe_b64encode(
        hashlib.md5(f"{stamp}/dl/7/instances/2026/11/25/ab.dcm s3cret".encode()).digest()
    ).decode()
    assert sign() == f"/dl/7/instances/2026/11/25/ab.dcm?expires={stamp}&md5={expected.rstrip('=')}"


def test_a_link_is_good_for_one_delivery_only():
    assert sign().split("md5=")[1] != sign(delivery_id=8).split("md5=")[1]


def test_another_secret_gives_another_link():
    assert sign() != sign(secret="other")
