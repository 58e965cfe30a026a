"""In a real browser: the publisher sees a backfilled recipient for what it is, and the receiver sees it too."""

from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import expect

from tests.browser.test_clinician_ui import log_in, published_study

pytestmark = pytest.mark.integration


def test_backfilled_deliveries_are_marked_on_the_sent_received_and_dashboard_pages(
    browser, portal, tmp_path, artifacts
):
    patient_id = f"PAT-BF-{portal.s}"
    published_study(portal, tmp_path, patient_id)
    since = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    # The outsider subscribes to nothing of this region's CT: a backfill by pattern hands it the 4 CT slices.
    done = portal.stack.manage(
        "backfill", f"outsider-{portal.s}", "--since", since, "--pattern", f"{portal.region}.*.ct"
    )
    assert done.stdout.strip().splitlines()[-1] == f"Queued 4 deliveries for outsider-{portal.s}."

    publisher = log_in(browser, portal, "own")
    publisher.goto(f"{portal.stack.url}/sent/?q={patient_id}")
    outsider = publisher.locator("#sent-studies .recipient", has_text="Tehran Outsider")
    expect(outsider.locator(".mark.backfill")).to_have_text("4 backfill")
    expect(outsider).to_contain_text("0/4 delivered, 4 queued")
    expect(publisher.locator("#sent-studies .recipient", has_text="Tehran Hospital").locator(".mark")).to_have_count(0)
    publisher.screenshot(path=artifacts / "sent-backfill.png", full_page=True)
    publisher.goto(f"{portal.stack.url}/dashboard/")
    expect(publisher.locator("#outgoing-waiting .mark.backfill")).to_have_text("4 backfill")

    receiver = log_in(browser, portal, "outsider")
    receiver.goto(f"{portal.stack.url}/received/?q={patient_id}")
    expect(receiver.locator("#received-studies tbody tr .mark.backfill")).to_have_text("backfill")
    receiver.goto(f"{portal.stack.url}/dashboard/")
    expect(receiver.locator("#incoming-waiting .mark.backfill")).to_have_text("4 backfill")
    receiver.screenshot(path=artifacts / "dashboard-backfill.png", full_page=True)
    assert publisher.errors == [] and receiver.errors == []
