"""One file the portal cannot take stops no other: the agent against a real portal that answers 500 for chosen files.

The portal runs with the test-only fault injection (portal/faults.py): every upload of
one of the BAD SOP Instance UIDs gets Django's HTML 500 page, as a bug in ingest would.
"""

import json
import re
import socket

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from agent.retry import ledger_path
from tests.dicomfiles import dicom_bytes
from tests.integration.stack import PYTHON, free_port, wait_for

pytestmark = pytest.mark.integration

BAD = {"watch": generate_uid(), "scp": generate_uid(), "send": generate_uid()}
MAX_ATTEMPTS = 3
GIVE_UP_AFTER = 4


@pytest.fixture(scope="module")
def faulty_portal(postgres_stack):
    """The URL of a portal web process that answers 500 to the uploads of the BAD instances."""
    port = free_port()
    postgres_stack.start_server(
        port=port,
        env={**postgres_stack.env, "DICOM_FAULT_500_SOP_UIDS": ",".join(BAD.values())},
        name="server-faulty",
    )
    return f"http://127.0.0.1:{port}"


def stored(stack, sop_uids) -> set[str]:
    rows = stack.sql("SELECT sop_instance_uid FROM routing_instance WHERE sop_instance_uid = ANY(%s)", list(sop_uids))
    return {uid for (uid,) in rows}


def retrying(state, kind: str, folder) -> dict:
    path = ledger_path(state, kind, folder)
    return json.loads(path.read_text()) if path.exists() else {}


def c_store(port: int, files) -> list[int]:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="EXCHANGE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()


def write(folder, name: str, sop_uid: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(dicom_bytes("CT", sop_uid=sop_uid or generate_uid()))
    return path


def test_a_file_the_portal_keeps_failing_is_set_aside_while_the_files_after_it_go_on(
    postgres_stack, pg_network, faulty_portal, tmp_path
):
    stack = postgres_stack
    state, outbox, modality = tmp_path / "state", tmp_path / "outbox", tmp_path / "modality"
    outbox.mkdir()
    scp_port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'server = "{faulty_portal}"\nkey = "{pg_network.keys["own"]}"\nstate_dir = "state"\n'
        f'[run]\nroles = ["scp", "watch"]\nheartbeat = 5\n'
        f'[scp]\nport = {scp_port}\nbind = "127.0.0.1"\n'
        f'[watch]\noutbox = "outbox"\ninterval = 1\nsettle = 1\n'
        f'[upload]\nparallel = 4\nmax_attempts = {MAX_ATTEMPTS}\ngive_up_after = "{GIVE_UP_AFTER}s"\n'
    )
    config.chmod(0o600)
    agent = stack.spawn("agent-faulty", [PYTHON, "-m", "agent", "--config", str(config), "run"])
    try:
        # The bad file first, into each queue, and only once it has failed, the good ones behind it.
        write(outbox, "0-bad.dcm", BAD["watch"])
        wait_for(lambda: listening(scp_port), what="the agent's DICOM listener")
        assert c_store(scp_port, [write(modality, "bad.dcm", BAD["scp"])]) == [0]
        spool = state / "spool"
        wait_for(lambda: retrying(state, "outbox", outbox), what="the outbox's bad file to fail once")
        wait_for(lambda: retrying(state, "spool", spool), what="the spool's bad file to fail once")

        dropped = {f"{n}-good.dcm": generate_uid() for n in range(1, 7)}
        for name, uid in dropped.items():
            write(outbox, name, uid)
        spooled = {generate_uid(): f"good-{n}.dcm" for n in range(12)}
        files = [write(modality, name, uid) for uid, name in spooled.items()]
        assert c_store(scp_port, files) == [0] * len(files)
        good_uids = set(dropped.values()) | set(spooled)

        wait_for(lambda: stored(stack, good_uids) == good_uids, what="every good file at the portal")
        wait_for(
            lambda: {p.name for p in (outbox / "sent").glob("*.dcm")} == set(dropped), what="the good files in sent/"
        )
        # Then the bad ones reach the bounds and are set aside, each with its reason.
        wait_for(lambda: (outbox / "failed" / "0-bad.dcm.reason").exists(), what="the outbox's set aside")
        [spool_failed] = wait_for(lambda: list((spool / "failed").glob("*.dcm")), what="the spool's")
        wait_for(
            lambda: (
                stack.sql(
                    "SELECT a.spool_failed, a.outbox_failed FROM centers_agentheartbeat a "
                    "JOIN centers_center c ON c.id = a.center_id WHERE c.slug = %s",
                    f"own-{pg_network.s}",
                )
                == [(1, 1)]
            ),
            what="a heartbeat counting both files set aside",
        )
        status = stack.agent(pg_network.keys["own"], "--config", str(config), "status", server=faulty_portal)
    finally:
        agent.stop()
    assert agent.popen.returncode == 0, agent.log()
    assert not stored(stack, BAD.values())
    assert not list(spool.glob("*.dcm"))
    assert BAD["scp"] in spool_failed.name
    for reason in (outbox / "failed" / "0-bad.dcm.reason", spool_failed.with_name(spool_failed.name + ".reason")):
        text = reason.read_text()
        assert text.startswith("HTTP 500 Internal Server Error"), text
        attempts = int(re.search(r"gave up after (\d+) failed attempts over", text).group(1))
        assert attempts >= MAX_ATTEMPTS, text
    assert not retrying(state, "outbox", outbox) and not retrying(state, "spool", spool)

    assert re.search(r"^spool: 0 waiting .*, 0 retrying, 1 set aside in failed/", status.stdout, re.M), status.stdout
    assert re.search(r"^outbox: 0 waiting, 0 retrying, 1 set aside in failed/", status.stdout, re.M), status.stdout
    assert re.search(r"^last set aside: \d{4}-", status.stdout, re.M)

    agents = httpx.get(
        f"{faulty_portal}/api/v1/agents/heartbeat", headers={"Authorization": f"Bearer {pg_network.keys['own']}"}
    ).json()["agents"]
    assert [a["failed"] for a in agents] == [{"spool": 1, "outbox": 1}]
    assert "2 files failed at this center" in dashboard(stack, faulty_portal, pg_network)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def dashboard(stack, portal: str, network) -> str:
    """The center's dashboard as one of its clinicians sees it after logging in."""
    username, password = f"dr-own-{network.s}", "correct horse battery staple"
    stack.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; from centers.models import Center, Membership;"
        f" user = User.objects.create_user({username!r}, password={password!r});"
        f" Membership.objects.create(user=user, center=Center.objects.get(slug='own-{network.s}'))",
    )
    with httpx.Client(base_url=portal, follow_redirects=True) as browser:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', browser.get("/login/").text).group(1)
        browser.post("/login/", data={"username": username, "password": password, "csrfmiddlewaretoken": token})
        page = browser.get("/dashboard/")
    assert page.status_code == 200 and "Site agent" in page.text, page.text[:500]
    return page.text


def test_send_sends_the_good_files_and_exits_1_naming_the_one_the_portal_keeps_failing(
    postgres_stack, pg_network, faulty_portal, tmp_path
):
    folder = tmp_path / "study"
    bad = write(folder, "a-bad.dcm", BAD["send"])
    good = {write(folder, f"b-{n}.dcm").name for n in range(4)}
    result = postgres_stack.agent(pg_network.keys["own"], "send", str(folder), server=faulty_portal)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "4 sent, 0 already present, 0 skipped, 1 failed", result.stdout
    assert lines[1:] == [f"failed: {bad}: HTTP 500 Internal Server Error"], result.stdout
    for name in good:
        assert re.search(rf"{name}: sent: SOP", result.stderr)
    # Tried five times in all, each retry on its own backoff.
    assert result.stderr.count(f"{bad}: HTTP 500 Internal Server Error; retry") == 4, result.stderr
    assert not stored(postgres_stack, [BAD["send"]])
