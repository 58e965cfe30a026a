import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test of the running installation shows its processes' logs (portal, worker, beat, nginx)."""
    outcome = yield
    report = outcome.get_result()
    installation = item.funcargs.get("installation") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and installation is not None:
        report.sections.append(("logs of the installation", installation.stack.logs()))
