import os
from pathlib import Path

import pytest

from agent.paths import MAX_COMPONENT_BYTES, MAX_COMPONENT_CHARS, UnsafePathError, delivery_path, safe_component


def assert_single_component(name: str) -> None:
    assert name not in ("", ".", "..")
    assert not name.startswith(".")
    assert "/" not in name and "\\" not in name and os.sep not in name
    assert Path(name).name == name


def test_it_keeps_an_ordinary_uid_unchanged():
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    assert safe_component(uid) == uid


@pytest.mark.parametrize("value", ["..", ".", "...", " .. "])
def test_it_replaces_dot_dot_with_a_safe_name(value):
    name = safe_component(value)
    assert_single_component(name)
    assert set(name) == {"_"}


def test_it_replaces_leading_dots_so_nothing_is_hidden():
    assert safe_component(".bashrc") == "_bashrc"
    assert safe_component("..secret") == "__secret"


@pytest.mark.parametrize("value", ["a/b", "../../etc/passwd", "/abs/path", "a\\b", "..\\..\\windows", "C:\\x"])
def test_it_replaces_separators_so_the_value_stays_one_component(value):
    assert_single_component(safe_component(value))


def test_it_replaces_nul_and_control_characters():
    assert safe_component("a\x00b\x1fc\x7fd\ne\tf\u202eg") == "a_b_c_d_e_f_g"


def test_it_replaces_characters_windows_refuses():
    assert safe_component('a<b>c:d"e|f?g*h') == "a_b_c_d_e_f_g_h"


def test_it_guards_trailing_dots_and_windows_device_names():
    assert safe_component("abc.") == "abc_"
    assert safe_component("CON") == "_CON"
    assert safe_component("nul.txt") == "_nul.txt"
    assert safe_component("CONSOLE") == "CONSOLE"


def test_it_bounds_the_length():
    assert len(safe_component("9" * 500)) == MAX_COMPONENT_CHARS


def test_it_bounds_the_encoded_length_of_wide_characters():
    name = safe_component("\U0001f600" * 64)
    assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert name


@pytest.mark.parametrize("value", ["", "   ", None])
def test_it_falls_back_when_nothing_is_left(value):
    assert safe_component(value) == "UNKNOWN"
    assert safe_component(value, fallback="NO_ID") == "NO_ID"


def test_it_keeps_unicode_names():
    assert safe_component("Müller^Jürgen") == "Müller^Jürgen"
    assert safe_component("محمدی") == "محمدی"
    assert safe_component("山田 太郎") == "山田 太郎"


def test_it_strips_surrounding_whitespace():
    assert safe_component("  PID-7 \n") == "PID-7"


def delivery(**fields):
    base = {
        "id": 7,
        "patient_id": "PID1",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "sop_instance_uid": "1.2.3.4.5",
    }
    return base | fields


def test_it_lays_out_patient_study_series_sop(tmp_path):
    assert delivery_path(tmp_path, delivery()) == tmp_path / "PID1" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


def test_it_keeps_hostile_values_inside_the_inbox(tmp_path):
    path = delivery_path(
        tmp_path,
        delivery(patient_id="../../..", study_instance_uid="/etc", series_instance_uid="..", sop_instance_uid="../x"),
    )
    assert path.resolve().is_relative_to(tmp_path.resolve())
    assert len(path.relative_to(tmp_path).parts) == 4


def test_it_names_a_file_without_sop_uid_after_the_delivery(tmp_path):
    path = delivery_path(tmp_path, delivery(sop_instance_uid="", patient_id=None))
    assert path.relative_to(tmp_path).parts == ("UNKNOWN", "1.2.3", "1.2.3.4", "delivery-7.dcm")


def test_it_refuses_a_symlinked_folder_that_leads_out_of_the_inbox(tmp_path):
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    elsewhere.mkdir()
    (inbox / "PID1").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        delivery_path(inbox, delivery())
