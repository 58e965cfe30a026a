import io
import json

import pytest

# The real stack of the integration tests (processes, PostgreSQL, RabbitMQ), for the client tests.
from tests.integration.conftest import pg_network, postgres_stack, pytest_runtest_makereport  # noqa: F401

BOUNDARY = "test-boundary-7d3f"


def stow_body(*parts: bytes, boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def stow_type(boundary: str = BOUNDARY) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


class Web:
    """The Django test client speaking DICOMweb as one center (its API key as Bearer)."""

    def __init__(self, client, secret: str, on_commit) -> None:
        self.client = client
        self.auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
        self.on_commit = on_commit

    def stow(self, *parts: bytes, study: str | None = None, body: bytes | None = None, content_type=None):
        path = "/dicomweb/studies" + (f"/{study}" if study else "")
        content_type = content_type or stow_type()
        with self.on_commit(execute=True):
            return self.client.post(
                path,
                data=stow_body(*parts) if body is None else body,
                content_type=content_type,
                CONTENT_TYPE=content_type,
                **self.auth,
            )

    def get(self, path: str, accept: str | None = None, **params):
        extra = {"HTTP_ACCEPT": accept} if accept else {}
        return self.client.get(path, params, **self.auth, **extra)

    def search(self, path: str, **params) -> list[dict]:
        response = self.get(path, **params)
        assert response.status_code == 200, response.content
        assert response["Content-Type"] == "application/dicom+json"
        return json.loads(response.content)


@pytest.fixture
def web(client, keys, storage_dir, django_capture_on_commit_callbacks):
    return {name: Web(client, secret, django_capture_on_commit_callbacks) for name, secret in keys.items()}


def values(document: dict, tag: str) -> list:
    return document.get(tag, {}).get("Value", [])


def parts_of(response) -> list[tuple[dict, bytes]]:
    """Split a multipart/related answer into (headers, content) pairs."""
    from dicomweb.multipart import MultipartReader, media_type_params

    _, params = media_type_params(response["Content-Type"])
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return [(part.headers, part.read()) for part in MultipartReader(io.BytesIO(body), params["boundary"])]
