"""The prebuilt OHIF Viewer from the npm registry, served statically on loopback.

`npm pack` fetches the published package (its dist/ is the built viewer) once
into var/cache; node_modules are never involved. A small static server gives
it our app-config.js, pointing at the portal's /dicomweb, and answers the
viewer's client-side routes (/viewer, ...) with index.html.
"""

import functools
import json
import shutil
import subprocess
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.integration.stack import ROOT, free_port

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CACHE = ROOT / "var" / "cache" / "ohif"


def ohif_dist() -> Path:
    """The viewer's dist/ folder, fetched with npm on first use."""
    target = CACHE / OHIF_VERSION
    dist = target / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the OHIF viewer (apt-get install npm)")
    download = CACHE / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    result = subprocess.run(
        [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", str(download), "--silent"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {result.stderr}")
    (tarball,) = download.glob("*.tgz")
    unpacked = CACHE / f"{OHIF_VERSION}.partial"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(unpacked, filter="data")
    if not (unpacked / "package" / "dist" / "index.html").exists():
        raise RuntimeError(f"{OHIF_PACKAGE}@{OHIF_VERSION} has no prebuilt dist/index.html")
    shutil.rmtree(target, ignore_errors=True)
    unpacked.rename(target)
    shutil.rmtree(download, ignore_errors=True)
    return dist


def app_config(portal_url: str) -> str:
    """The viewer's configuration: one DICOMweb data source, the portal."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "exchange",
        "configuration": {
            "friendlyName": "DICOM Exchange",
            "name": "exchange",
            "wadoUriRoot": f"{portal_url}/dicomweb/wado",
            "qidoRoot": f"{portal_url}/dicomweb",
            "wadoRoot": f"{portal_url}/dicomweb",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "defaultDataSourceName": "exchange",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(SimpleHTTPRequestHandler):
    config_js = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            self.wfile.write(self.config_js)
            return
        if not Path(self.translate_path(path)).exists():
            # A route of the single-page app: the app itself answers it.
            self.path = "/index.html"
        super().do_GET()


class OhifServer:
    def __init__(self, dist: Path, portal_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        handler = type("Handler", (_Handler,), {"config_js": app_config(portal_url).encode()})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), functools.partial(handler, directory=str(dist)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "OhifServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
