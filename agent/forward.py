"""Forwarding: send received files on to the local PACS by DICOM C-STORE."""

import logging
import time
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from agent.client import backoff_delay
from agent.config import parse_peer

log = logging.getLogger(__name__)

# Send each file's dataset exactly as it is on disk, read in chunks: byte-identical,
# never decompressed or re-encoded, and a large file is never held in memory whole.
_config.STORE_SEND_CHUNKED_DATASET = True

ATTEMPTS = 3
# Success, and the storage warnings after which the PACS has stored the instance (PS3.4 B.2.3).
ACCEPTED = {0x0000, 0xB000, 0xB006, 0xB007}
TIMEOUT_SECONDS = 60


class ForwardError(Exception):
    """The PACS did not accept the file; the delivery must stay unacknowledged."""


class Forwarder:
    """A C-STORE client for one PACS, written AET@host:port."""

    def __init__(self, peer: str, *, calling_ae_title: str, attempts: int = ATTEMPTS) -> None:
        self.peer = peer
        self.called, self.host, self.port = parse_peer(peer)
        self.calling = calling_ae_title
        self.attempts = attempts

    def store(self, path: Path, what: str) -> None:
        """Store `path` on the PACS, retrying; raises ForwardError when it never accepts it."""
        for attempt in range(self.attempts):
            try:
                self._store_once(path)
                return
            except ForwardError as exc:
                if attempt + 1 >= self.attempts:
                    raise ForwardError(f"PACS {self.peer}: {exc}") from exc
                delay = backoff_delay(attempt, 1.0, 8.0)
                log.warning(
                    "%s: forward to %s: %s; retry %d/%d in %.1f s",
                    what,
                    self.peer,
                    exc,
                    attempt + 1,
                    self.attempts - 1,
                    delay,
                )
                time.sleep(delay)

    def _store_once(self, path: Path) -> None:
        try:
            meta = read_file_meta_info(path)
            sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
        except (OSError, AttributeError, ValueError) as exc:
            raise ForwardError(f"cannot read {path}: {exc}") from exc
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_SECONDS
        ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate(self.host, self.port, ae_title=self.called)
        if not assoc.is_established:
            raise ForwardError("association rejected, aborted or the PACS is unreachable")
        try:
            if not assoc.accepted_contexts:
                raise ForwardError(f"the PACS accepts neither SOP class {sop_class} nor transfer syntax {syntax}")
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
        if "Status" not in status:
            raise ForwardError("no answer to the C-STORE (timeout or aborted association)")
        if status.Status not in ACCEPTED:
            raise ForwardError(f"C-STORE refused with status 0x{status.Status:04X}")
        if status.Status != 0:
            log.warning("%s: PACS stored it with warning status 0x%04X", path.name, status.Status)
