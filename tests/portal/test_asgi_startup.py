"""The production ASGI application is ready when its module is imported: a worker's first
request does not wait for Django to import the URLconf and every view module."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_application_loads_the_urlconf_and_the_views(tmp_path):
    views = ("portal.urls", "routing.api", "dicomweb.views")
    probe = f"import sys, portal.asgi; print(sorted(m for m in {views!r} if m in sys.modules))"
    env = {**os.environ, "PORTAL_VAR_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['dicomweb.views', 'portal.urls', 'routing.api']"
