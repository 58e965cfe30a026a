"""Headless Chromium (Debian's /usr/bin/chromium, never a downloaded browser) against the real stack."""

import shutil
from pathlib import Path

import pytest

from tests.chromium import CHROMIUM, FLAGS
from tests.integration.conftest import Network, postgres_stack  # noqa: F401 - fixtures used by the tests

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "a long clinician password"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium is needed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    # Playwright's 5 s for an expectation is short when thumbnails are rendered on a busy machine;
    # a page that is right passes at once, only a wrong one waits this long.
    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def artifacts(request) -> Path:
    folder = ARTIFACTS / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def portal(postgres_stack):  # noqa: F811 - the imported fixture
    """The running stack with its static files collected, and a test's own network of centers."""
    if not getattr(postgres_stack, "static_collected", False):
        # WhiteNoise indexes the static files when the server starts, as after `make run`'s collectstatic.
        postgres_stack.manage("collectstatic", "--no-input", "-v0")
        postgres_stack.server.stop()
        postgres_stack.server = postgres_stack.start_server()
        postgres_stack.static_collected = True
    network = Network(postgres_stack)
    network.users = {}
    for role in ("own", "partner", "outsider"):
        username = f"dr-{role}-{network.s}"
        postgres_stack.manage("create_clinician", username, f"{role}-{network.s}", "--password", PASSWORD)
        network.users[role] = username
    return network
