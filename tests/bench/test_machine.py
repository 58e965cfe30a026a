from bench.machine import machine, memory_write_speeds
from bench.report import _memory


def test_it_measures_writing_fresh_memory_and_the_same_memory_again():
    fresh, again = memory_write_speeds(megabytes=8)

    assert fresh > 0 and again > 0


def test_the_machine_line_says_what_fresh_memory_cost_before_and_after_the_run():
    info = machine() | {"fresh_memory_mb_s_before": 1200, "fresh_memory_mb_s": 1400, "written_memory_mb_s": 16000}

    line = _memory(info)

    assert "1,200 MB/s before the run and 1,400 MB/s after" in line
    assert "16,000 MB/s" in line


def test_the_machine_line_names_free_page_reporting_only_where_the_kernel_has_it():
    info = {"fresh_memory_mb_s_before": 1, "fresh_memory_mb_s": 1, "written_memory_mb_s": 1}

    assert "free page reporting" not in _memory(info | {"page_reporting_order": None})
    assert "freed blocks of 2,048 KB" in _memory(info | {"page_reporting_order": 9})


def test_a_run_recorded_before_the_memory_figures_has_no_memory_line():
    assert _memory({"cpu": "x"}) == ""
