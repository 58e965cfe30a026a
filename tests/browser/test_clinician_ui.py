"""A clinician finds, views and downloads a study in a real browser; another center cannot reach it."""

import hashlib
import io
import re
import zipfile

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD
from tests.dicomfiles import write_study
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration


def log_in(browser, portal, role):
    context = browser.new_context(viewport={"width": 1366, "height": 860}, accept_downloads=True)
    context.set_default_timeout(90_000)  # thumbnails and slices are rendered on demand, on a busy machine
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("response", lambda r: r.status >= 500 and page.errors.append(f"{r.status} {r.url}"))
    page.goto(f"{portal.stack.url}/received/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.fill("#id_username", portal.users[role])
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/received/$"))
    return page


def published_study(portal, tmp_path, patient_id):
    """The publisher's agent sends a CT series of 4 slices and an MR series of 2; wait until routed."""
    files = write_study(tmp_path / "outgoing", series={"CT": 4, "MR": 2}, patient_id=patient_id)
    result = portal.stack.agent(portal.keys["own"], "send", str(tmp_path / "outgoing"))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(
        lambda: (
            portal.stack.sql(
                "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
                f"partner-{portal.s}",
            )
            == [(6,)]
        ),
        what="the fan-out to the partner",
    )
    return files


def test_a_clinician_finds_views_and_downloads_a_study(browser, portal, tmp_path, artifacts):
    patient_id = f"PAT-{portal.s}"
    files = published_study(portal, tmp_path, patient_id)
    page = log_in(browser, portal, "partner")

    # Find the study by patient ID.
    page.fill("input[name=q]", patient_id)
    page.click("form.filters button[type=submit]")
    rows = page.locator("#received-studies tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(patient_id)
    expect(rows.first).to_contain_text("Shiraz Imaging")
    page.screenshot(path=artifacts / "received.png", full_page=True)

    # Open it: one card per series, each thumbnail really rendered.
    rows.first.locator("a").first.click()
    expect(page.locator(".series-card")).to_have_count(2)
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.series-card img')).every(i => i.complete && i.naturalWidth > 0)"
    )
    study_url = page.url
    page.screenshot(path=artifacts / "study.png", full_page=True)

    # The viewer: scroll by wheel and keys, presets and drag change the window.
    page.locator(".series-card", has_text="CT").locator("a").first.click()
    viewer, stage, image = page.locator("#viewer"), page.locator("#stage"), page.locator("#image")
    expect(viewer).to_have_attribute("data-index", "0")
    expect(page.locator("#overlay-slice")).to_have_text(re.compile(r"Image 1 / 4"))
    loaded = "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0 }"
    page.wait_for_function(loaded)
    first_src = image.get_attribute("src")
    stage.hover()
    page.mouse.wheel(0, 120)
    expect(viewer).to_have_attribute("data-index", "1")
    page.keyboard.press("ArrowDown")
    expect(viewer).to_have_attribute("data-index", "2")
    page.keyboard.press("End")
    expect(viewer).to_have_attribute("data-index", "3")
    page.keyboard.press("ArrowUp")
    expect(viewer).to_have_attribute("data-index", "2")
    page.wait_for_function(loaded)
    assert image.get_attribute("src") != first_src
    expect(page.locator("#attributes")).to_contain_text(patient_id)
    page.click(".presets button:has-text('Bone')")
    expect(image).to_have_attribute("src", re.compile(r"wc=300&ww=1500"))
    box = stage.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 40, steps=5)
    page.mouse.up()
    expect(page.locator("#overlay-window")).not_to_have_text(re.compile(r"WL 300\s+WW 1500"))
    page.wait_for_function(loaded)
    page.screenshot(path=artifacts / "viewer.png")

    # Download the whole study and check every file byte for byte.
    page.goto(study_url)
    with page.expect_download() as download_info:
        page.click("#download-study")
    download = download_info.value
    archive_path = tmp_path / "study.zip"
    download.save_as(archive_path)
    archive = zipfile.ZipFile(archive_path)
    names = archive.namelist()
    assert len(names) == 6 and all(name.endswith(".dcm") for name in names)
    assert {name.split("/")[0] for name in names} == {f"{patient_id}_Doe_Jane"}
    assert sorted(hashlib.sha256(archive.read(n)).hexdigest() for n in names) == sorted(
        hashlib.sha256(path.read_bytes()).hexdigest() for path in files
    )
    assert zipfile.ZipFile(io.BytesIO(archive_path.read_bytes())).testzip() is None

    page.goto(f"{portal.stack.url}/dashboard/")
    expect(page.locator("#incoming")).to_contain_text("Queued")
    expect(page.locator("#chart-hourly-instances rect").first).to_be_visible()
    page.screenshot(path=artifacts / "dashboard.png", full_page=True)
    assert page.errors == []

    # The audit log saw the views and the download, with this user and center.
    audited = dict(
        portal.stack.sql(
            "SELECT a.action, count(*) FROM centers_auditevent a JOIN auth_user u ON u.id = a.user_id "
            "WHERE u.username = %s GROUP BY a.action",
            portal.users["partner"],
        )
    )
    assert audited["study.view"] >= 2 and audited["series.view"] == 1 and audited["download.study"] == 1
    assert audited["image.view"] >= 5

    # Another center's clinician gets a 404 at the very same URLs.
    outsider = log_in(browser, portal, "outsider")
    assert outsider.goto(study_url).status == 404
    assert outsider.goto(study_url + "download.zip").status == 404
    outsider.goto(f"{portal.stack.url}/received/?q={patient_id}")
    expect(outsider.locator("#received-studies")).to_have_count(0)

    # The publisher sees whom it went to.
    publisher = log_in(browser, portal, "own")
    publisher.goto(f"{portal.stack.url}/sent/?q={patient_id}")
    expect(publisher.locator("#sent-studies")).to_contain_text("Tehran Hospital")
    publisher.screenshot(path=artifacts / "sent.png", full_page=True)


def test_the_login_page_and_a_user_without_a_center(browser, portal, artifacts):
    portal.stack.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        f"User.objects.create_user('loner-{portal.s}', password='{PASSWORD}')",
    )
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    context.set_default_timeout(90_000)
    page = context.new_page()
    page.goto(f"{portal.stack.url}/login/")
    page.screenshot(path=artifacts / "login.png")
    page.fill("#id_username", f"loner-{portal.s}")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Your account is not linked to a center")
