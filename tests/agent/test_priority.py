"""STAT first in the agent: `send --priority`, stat calling AE titles for scp, stat folders for watch."""

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from agent.cli import build_parser
from agent.config import ConfigError, load_settings
from agent.retry import Ledger, RetryPolicy
from agent.send import send_paths, upload_file
from agent.spool import Spool
from agent.state import State
from agent.uploads import Drainer
from agent.watch import Outbox
from tests.dicomfiles import dicom_bytes

BASE = {"server": "https://x.example.org", "key": "k"}


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('server = "https://x.example.org"\nkey = "k"\n' + text)
    path.chmod(0o600)
    return path


def flags(argv: list[str]) -> dict:
    from agent.cli import _FLAGS

    args = build_parser().parse_args(argv)
    return {name: getattr(args, name, None) for name in (*_FLAGS, "roles")}


def test_the_config_file_names_stat_calling_ae_titles_and_stat_folders(tmp_path):
    config = write_config(
        tmp_path,
        '[scp]\nstat_calling_aets = ["ER_CT", "TRAUMA"]\n[watch]\noutbox = "out"\nstat_folders = ["stat", "er/ct"]\n',
    )

    settings = load_settings({"config": config}, {})

    assert settings.stat_calling_aets == ("ER_CT", "TRAUMA")
    assert settings.stat_folders == (Path("stat"), Path("er/ct"))
    assert settings.priority == "routine"


def test_nothing_is_stat_by_default():
    settings = load_settings(BASE, {})

    assert (settings.priority, settings.stat_calling_aets, settings.stat_folders) == ("routine", (), ())


def test_the_command_line_gives_the_same_settings(tmp_path):
    send = load_settings({**flags(["send", "--priority", "stat", "x.dcm"]), **BASE}, {})
    scp = load_settings({**flags(["scp", "--stat-ae", "ER_CT", "--stat-ae", "CATH"]), **BASE}, {})
    watch = load_settings({**flags(["watch", "--stat-folder", "stat"]), **BASE}, {})

    assert send.priority == "stat"
    assert scp.stat_calling_aets == ("ER_CT", "CATH")
    assert watch.stat_folders == (Path("stat"),)


def test_send_refuses_an_unknown_priority(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["send", "--priority", "urgent", "x.dcm"])

    assert "invalid choice: 'urgent'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ('[scp]\nstat_calling_aets = "ER_CT"\n', "stat_calling_aets must be a list of strings"),
        ('[scp]\nstat_calling_aets = ["A_TITLE_FAR_TOO_LONG"]\n', "stat_calling_aets: an AE title is 1-16"),
        ('[watch]\nstat_folders = ["/srv/stat"]\n', "stat_folders: a folder inside the outbox"),
        ('[watch]\nstat_folders = ["../elsewhere"]\n', "stat_folders: a folder inside the outbox"),
        ('[watch]\nstat_folders = [""]\n', "stat_folders: a folder inside the outbox"),
        ('[watch]\nstat_folders = ["sent/ct"]\n', "stat_folders: a folder inside the outbox"),
        ('[watch]\nstat_folder = ["stat"]\n', "unknown key 'stat_folder' at [watch]"),
    ],
)
def test_it_explains_a_wrong_stat_setting(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings({"config": write_config(tmp_path, text)}, {})


def test_the_spool_remembers_stat_files_and_hands_them_out_first(tmp_path):
    spool = Spool(tmp_path / "spool")
    routine = spool.put(b"routine", "1.2.3")
    stat = spool.put(b"stat", "1.2.4", stat=True)

    # A restarted agent finds them as they were.
    again = Spool(tmp_path / "spool")

    assert again.pending() == [stat, routine]
    assert [again.priority(p) for p in again.pending()] == ["stat", "routine"]
    assert again.stats().count == 2


def test_the_outbox_hands_out_stat_folders_files_first_and_says_so(tmp_path):
    outbox = Outbox(tmp_path, settle=0, stat_folders=(Path("stat"),))
    outbox.prepare()
    old = tmp_path / "routine.dcm"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    stat = tmp_path / "stat" / "ct" / "urgent.dcm"
    stat.parent.mkdir(parents=True)
    stat.write_bytes(b"y")

    outbox.ready()  # the first scan only notes the files
    ready = outbox.ready()

    assert ready == [stat, old]
    assert [outbox.priority(p) for p in ready] == ["stat", "routine"]


def recording_client(asked: list[httpx.Request]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        request.read()
        asked.append(request)
        return httpx.Response(201, json={"sop_instance_uid": "1.2.3"})

    return httpx.Client(base_url="https://x.example.org", transport=httpx.MockTransport(answer))


def test_a_stat_upload_asks_the_portal_for_stat_and_a_routine_one_asks_nothing_new(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(dicom_bytes("CT"))
    asked: list[httpx.Request] = []

    with recording_client(asked) as client:
        upload_file(client, path, priority="stat")
        upload_file(client, path)
        send_paths(client, [path], 1, priority="stat")

    assert [str(r.url) for r in asked] == [
        "https://x.example.org/api/v1/instances?priority=stat",
        "https://x.example.org/api/v1/instances",
        "https://x.example.org/api/v1/instances?priority=stat",
    ]


def test_the_spool_drainer_uploads_stat_files_first_asking_for_stat(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.put(dicom_bytes("CT", instance_number=1), "1.2.3.1")
    spool.put(dicom_bytes("CT", instance_number=2), "1.2.3.2")
    spool.put(dicom_bytes("CT", instance_number=3), "1.2.3.3", stat=True)
    asked: list[httpx.Request] = []

    with recording_client(asked) as client:
        drainer = Drainer(
            client,
            spool,
            State(tmp_path),
            stop=threading.Event(),
            interval=1,
            parallel=1,  # one at a time: the order of the requests is the order of the queue
            policy=RetryPolicy(10, 3600),
            ledger=Ledger(None),
        )
        assert drainer.drain_once() is True

    # The two routine files may go up as one batch or one by one (this stand-in portal answers a batch
    # like a single upload, so the agent sends them again singly); the stat one goes first, alone, as stat.
    asked_for = [r.url.params.get("priority") for r in asked]
    assert asked_for[0] == "stat" and set(asked_for[1:]) == {None}
    assert spool.pending() == []
