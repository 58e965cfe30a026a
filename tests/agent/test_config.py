import os

import pytest

from agent.cli import build_parser
from agent.config import ConfigError, load_settings

NO_FLAGS: dict = {}


def write_config(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


FULL_TOML = """
server = "https://toml.example.org"
key = "toml-key"
ca_bundle = "ca.pem"

[send]
parallel = 8

[receive]
inbox = "inbox"
wait = 10
limit = 50
"""


def test_it_reads_every_key_of_the_toml_file(tmp_path):
    (tmp_path / "ca.pem").write_text("pem")
    settings = load_settings({"config": write_config(tmp_path, FULL_TOML)}, {})
    assert settings.server == "https://toml.example.org"
    assert settings.key == "toml-key"
    assert settings.ca_bundle == tmp_path / "ca.pem"  # relative to the file, not the working folder
    assert settings.inbox == tmp_path / "inbox"
    assert (settings.parallel, settings.wait, settings.limit) == (8, 10, 50)


def test_the_environment_beats_the_toml_file(tmp_path):
    config = write_config(tmp_path, 'server = "https://toml.example.org"\nkey = "toml-key"\n')
    environ = {"EXCHANGE_SERVER": "https://env.example.org", "EXCHANGE_KEY": "env-key"}
    settings = load_settings({"config": config}, environ)
    assert (settings.server, settings.key) == ("https://env.example.org", "env-key")


def test_a_flag_beats_the_environment_and_the_toml_file(tmp_path):
    config = write_config(tmp_path, 'server = "https://toml.example.org"\nkey = "toml-key"\n[receive]\nwait = 5\n')
    environ = {"EXCHANGE_SERVER": "https://env.example.org", "EXCHANGE_KEY": "env-key"}
    flags = {"config": config, "server": "https://flag.example.org/", "wait": 0}
    settings = load_settings(flags, environ)
    assert settings.server == "https://flag.example.org"
    assert settings.key == "env-key"
    assert settings.wait == 0


def test_an_empty_environment_variable_counts_as_unset(tmp_path):
    config = write_config(tmp_path, 'server = "https://toml.example.org"\nkey = "toml-key"\n')
    settings = load_settings({"config": config}, {"EXCHANGE_KEY": ""})
    assert settings.key == "toml-key"


def test_the_ca_bundle_comes_from_the_environment(tmp_path):
    bundle = tmp_path / "private-ca.pem"
    bundle.write_text("pem")
    environ = {"EXCHANGE_SERVER": "https://x.example.org", "EXCHANGE_KEY": "k", "EXCHANGE_CA_BUNDLE": str(bundle)}
    assert load_settings(NO_FLAGS, environ).ca_bundle == bundle


def test_defaults_apply_without_a_file():
    settings = load_settings({"server": "https://x.example.org", "key": "k"}, {})
    assert (settings.parallel, settings.wait, settings.limit, settings.inbox) == (4, 30, 50, None)


def test_the_key_stays_out_of_the_settings_repr():
    assert "s3cret" not in repr(load_settings({"server": "https://x.example.org", "key": "s3cret"}, {}))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"key": "k"}, "no portal address"),
        ({"server": "https://x.example.org"}, "no center key"),
        ({"server": "ftp://x.example.org", "key": "k"}, "http(s) URL"),
        ({"server": "https://x.example.org", "key": "k", "limit": 101}, "limit"),
        ({"server": "https://x.example.org", "key": "k", "wait": 61}, "wait"),
        ({"server": "https://x.example.org", "key": "k", "ca_bundle": "/nonexistent/ca.pem"}, "CA bundle"),
    ],
)
def test_it_explains_missing_or_wrong_settings(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(flags, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('servr = "https://x.example.org"\n', "unknown key 'servr'"),
        ("[receive]\nwait = true\n", "wait must be a whole number"),
        ('[send]\nparallel = "4"\n', "parallel must be a whole number"),
        ("server = [1]\n", "server must be a string"),
        ("send = 3\n", "send must be a table"),
        ("server = \n", "not valid TOML"),
    ],
)
def test_it_rejects_a_bad_toml_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({"config": write_config(tmp_path, text), "server": "https://x.example.org", "key": "k"}, {})


def test_it_reports_a_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({"config": tmp_path / "nope.toml"}, {})


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_it_warns_when_others_can_read_the_key(tmp_path, caplog):
    config = write_config(tmp_path, 'server = "https://x.example.org"\nkey = "k"\n')
    config.chmod(0o644)
    load_settings({"config": config}, {})
    assert "chmod 600" in caplog.text


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "https://x.example.org", "--key", "k", "-v", "send", "a.dcm"],
        ["send", "a.dcm", "--server", "https://x.example.org", "--key", "k", "-v"],
        ["--server", "https://x.example.org", "send", "--key", "k", "a.dcm", "-v"],
    ],
)
def test_global_options_work_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert (args.server, args.key, args.verbose, args.command) == ("https://x.example.org", "k", True, "send")


def test_receive_options_parse():
    args = build_parser().parse_args(["receive", "--inbox", "in", "--once", "--limit", "5", "--wait", "0"])
    assert (str(args.inbox), args.once, args.limit, args.wait) == ("in", True, 5, 0)
