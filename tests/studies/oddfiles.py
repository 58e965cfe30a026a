"""Accepted-but-odd files, and every page and DICOMweb answer that reads them again.

Ingest stores any file whose header reads and whose five required attributes are
valid, byte for byte. The clinician pages and DICOMweb then read the stored file
with pydicom, which meets what ingest let through. `Visit` opens all of them as
the receiving center and records every answer that is a server error, a broken
stream, or a retrieve that does not give back the uploaded bytes.
"""

import io
import json
import random
import re
import zipfile
from dataclasses import dataclass, field

import pydicom

from tests.dicomweb.conftest import parts_of

_UID_ELEMENTS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def renamed(data: bytes, seed: object) -> bytes:
    """The file with new study, series and instance UIDs of the same lengths, so nothing else moves.

    Real odd samples share UIDs with their siblings (pydicom's variants of one
    image), and one test stores many mutations of one file.
    """
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=list(_UID_ELEMENTS))
    chooser = random.Random(str(seed))
    olds = {str(ds.get(keyword) or "").strip("\x00 ") for keyword in _UID_ELEMENTS}
    # The longest first: a series UID often extends its study's UID.
    for old in sorted((uid for uid in olds if len(uid) >= 8), key=len, reverse=True):
        new = "2.25." + str(chooser.randrange(1, 10)) + "".join(str(chooser.randrange(10)) for _ in range(len(old) - 6))
        pattern = re.compile(rb"(?<![0-9.])" + re.escape(old.encode()) + rb"(?![0-9.])")
        data = pattern.sub(new.encode(), data)
    return data


@dataclass
class Stored:
    data: bytes
    study: str
    series: str
    sop: str


@dataclass
class Visit:
    """Every view a clinician or a DICOMweb viewer opens for one stored instance, as the partner center."""

    browser: object  # the partner clinician's logged-in Django test client
    web: object  # a Django test client
    key: str
    stored: Stored
    problems: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)

    def run(self) -> list[str]:
        self._clinician()
        self._dicomweb()
        return self.problems

    # -- plumbing -------------------------------------------------------------------

    def _get(self, client, path: str, *, params=None, accept: str | None = None, dicomweb: bool = False, **extra):
        headers = dict(extra)
        if accept:
            headers["HTTP_ACCEPT"] = accept
        if dicomweb:
            headers["HTTP_AUTHORIZATION"] = f"Bearer {self.key}"
        response = client.get(path, params or {}, **headers)
        label = f"{path}{'?' + '&'.join(f'{k}={v}' for k, v in (params or {}).items()) if params else ''}"
        if accept:
            label += f" [{accept}]"
        self.answers[label] = response.status_code
        try:
            body = b"".join(response.streaming_content) if response.streaming else response.content
        except Exception as exc:  # a stream that breaks half-way is a server error the client sees as a cut
            self.problems.append(f"{label}: the body broke off with {exc.__class__.__name__}: {exc}")
            return response, None
        if response.status_code >= 500:
            self.problems.append(f"{label}: {response.status_code} {body[:200]!r}")
        elif dicomweb and response.status_code >= 400:
            try:
                assert json.loads(body)["error"]
            except Exception:
                self.problems.append(f"{label}: {response.status_code} without a JSON error: {body[:200]!r}")
        return response, body

    def _expect(self, label: str, response, body, statuses: tuple[int, ...]) -> bool:
        if body is not None and response.status_code not in statuses and response.status_code < 500:
            self.problems.append(f"{label}: {response.status_code}, expected one of {statuses}: {body[:200]!r}")
        return body is not None and response.status_code in statuses

    def _same_bytes(self, label: str, got: bytes) -> None:
        if got != self.stored.data:
            self.problems.append(f"{label}: the retrieved file differs from the upload ({len(got)} bytes)")

    # -- the clinician's pages --------------------------------------------------------

    def _clinician(self) -> None:
        s, get = self.stored, self._get
        for path in ("/received/", f"/studies/{s.study}/"):
            response, body = get(self.browser, path)
            self._expect(path, response, body, (200,))
        response, body = get(self.browser, f"/series/{s.series}/")
        self._expect("viewer", response, body, (200,))
        frames = 1
        if response.status_code == 200 and response.context is not None:
            frames = len(response.context["viewer"]["slices"]) or 1
        response, body = get(self.browser, f"/series/{s.series}/thumbnail.jpg")
        self._expect("thumbnail", response, body, (200, 404))
        for frame in sorted({0, frames - 1, frames}):
            for params in ({}, {"fmt": "jpeg", "size": "64"}, {"wc": "40", "ww": "400"}):
                response, body = get(self.browser, f"/instances/{s.sop}/frames/{frame}", params=params)
                self._expect(f"frame {frame}", response, body, (200, 404))
        response, body = get(self.browser, f"/instances/{s.sop}/download")
        if self._expect("download", response, body, (200,)):
            self._same_bytes("download", body)
        for path in (f"/series/{s.series}/download.zip", f"/studies/{s.study}/download.zip"):
            response, body = get(self.browser, path)
            if self._expect(path, response, body, (200,)):
                with zipfile.ZipFile(io.BytesIO(body)) as archive:
                    (name,) = archive.namelist()
                    self._same_bytes(path, archive.read(name))

    # -- DICOMweb ---------------------------------------------------------------------

    def _dicomweb(self) -> None:
        s = self.stored

        def get(path, **kwargs):
            return self._get(self.web, path, dicomweb=True, **kwargs)

        study = f"/dicomweb/studies/{s.study}"
        series = f"{study}/series/{s.series}"
        instance = f"{series}/instances/{s.sop}"
        for path, params in (
            ("/dicomweb/studies", {"StudyInstanceUID": s.study}),
            (f"{study}/series", {}),
            (f"{series}/instances", {}),
            ("/dicomweb/instances", {"SOPInstanceUID": s.sop, "includefield": "all"}),
        ):
            response, body = get(path, params=params)
            self._expect(path, response, body, (200,))

        document = {}
        for path in (f"{study}/metadata", f"{series}/metadata", f"{instance}/metadata"):
            response, body = get(path)
            if self._expect(path, response, body, (200,)):
                (document,) = json.loads(body)
                if document.get("00080018", {}).get("Value") != [s.sop]:
                    self.problems.append(f"{path}: the metadata lacks the SOP Instance UID")

        for path, accept in (
            (instance, "application/dicom"),
            (instance, 'multipart/related; type="application/dicom"'),
            (series, None),
            (study, None),
        ):
            response, body = get(path, accept=accept)
            if self._expect(path, response, body, (200,)):
                if response["Content-Type"] == "application/dicom":
                    self._same_bytes(path, body)
                else:
                    self._same_bytes(path, _single_part(response, body))
        params = {"requestType": "WADO", "studyUID": s.study, "seriesUID": s.series, "objectUID": s.sop}
        response, body = get("/dicomweb/wado", params={**params, "contentType": "application/dicom"})
        if self._expect("WADO-URI application/dicom", response, body, (200,)):
            self._same_bytes("WADO-URI", body)

        frames = _frame_count(document)
        rendered = [
            (f"{instance}/rendered", "image/png"),
            (f"{instance}/rendered", "image/jpeg"),
            (f"{instance}/thumbnail", None),
            (f"{series}/thumbnail", None),
        ]
        rendered += [(f"{instance}/frames/{n}/rendered", None) for n in sorted({1, frames, frames + 1})]
        for path, accept in rendered:
            response, body = get(path, accept=accept)
            self._expect(path, response, body, (200, 404, 406))
        for extra in ({}, {"frameNumber": str(frames)}, {"contentType": "image/png"}):
            response, body = get("/dicomweb/wado", params={**params, **extra})
            self._expect("WADO-URI image", response, body, (200, 404, 406))

        octets = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        wanted = sorted({"1", str(frames), ",".join(str(n) for n in range(1, frames + 1)), str(frames + 1)})
        for numbers in wanted:
            response, body = get(f"{instance}/frames/{numbers}", accept=octets)
            self._expect(f"frames {numbers}", response, body, (200, 404, 406))
        for tag, element in document.items():
            if isinstance(element, dict) and "BulkDataURI" in element:
                path = element["BulkDataURI"].split("/dicomweb/", 1)[-1]
                response, body = get(f"/dicomweb/{path}", accept=octets)
                self._expect(f"bulk {tag}", response, body, (200, 404, 406))


def _single_part(response, body: bytes) -> bytes:
    class Buffered:
        streaming = False

        def __init__(self) -> None:
            self.content = body

        def __getitem__(self, name):
            return response[name]

    ((_, content),) = parts_of(Buffered())
    return content


def _frame_count(document: dict) -> int:
    try:
        return max(int(document["00280008"]["Value"][0]), 1)
    except (KeyError, IndexError, TypeError, ValueError):
        return 1
