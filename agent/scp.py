"""`scp`: the DICOM listener (C-STORE and C-ECHO) that modalities and the local PACS send to."""

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from agent.spool import Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Storage service "Refused: Out of Resources" (PS3.4 B.2.3): the sender keeps the image and may retry.
OUT_OF_RESOURCES = 0xA700
# A stalled sender must not hold an association thread forever.
NETWORK_TIMEOUT_SECONDS = 60


def _address_filter(allowed: Sequence[str]) -> Callable[[str], bool]:
    networks = [ipaddress.ip_network(entry, strict=False) for entry in allowed]

    def permitted(host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in networks)

    return permitted


class _Server(ThreadedAssociationServer):
    """The association server, refusing connections from addresses outside the allow-list."""

    permitted: Callable[[str], bool] | None = None

    def verify_request(self, request, client_address) -> bool:
        if self.permitted is None:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if self.permitted(host):
            return True
        log.warning("refused a DICOM connection from %s: not in allowed_addresses", host)
        return False


class StoreListener:
    """Accepts instances into the spool; success goes back only once the file is fsynced there."""

    def __init__(
        self,
        spool: Spool,
        *,
        ae_title: str,
        bind: str,
        port: int,
        allowed_ae_titles: Sequence[str] = (),
        allowed_addresses: Sequence[str] = (),
        stat_calling_aets: Sequence[str] = (),
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.spool = spool
        self.stat_calling_aets = frozenset(stat_calling_aets)
        self.on_stored = on_stored
        self.address = (bind, port)
        self.ae = AE(ae_title=ae_title)
        self.ae.network_timeout = NETWORK_TIMEOUT_SECONDS
        self.ae.maximum_pdu_size = 0  # no limit: large PDUs are far faster for big images
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        if allowed_ae_titles:
            self.ae.require_calling_aet = list(allowed_ae_titles)
        self.permitted = _address_filter(allowed_addresses) if allowed_addresses else None
        self.server: _Server | None = None

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            server = self.ae.make_server(self.address, evt_handlers=handlers, server_class=_Server)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on port {self.address[1]}: {exc.strerror}") from exc
        server.permitted = self.permitted
        # What start_server(block=False) does, which cannot take a server class: its shutdown()
        # expects to find itself among the AE's servers.
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        self.server = server
        host = self.address[0] or socket.gethostname()
        log.info("DICOM listener %s on %s:%d, spooling into %s", self.ae.ae_title, host, self.port, self.spool.folder)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.address[1]

    def stop(self) -> None:
        if self.server is not None:
            # Associations still open are aborted: whatever they had acknowledged is already on disk.
            self.server.shutdown()
            self.server = None

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", _peer(event))
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        peer = _peer(event)
        stat = event.assoc.requestor.ae_title.strip() in self.stat_calling_aets
        try:
            data = event.encoded_dataset(include_meta=True)
            path = self.spool.put(data, sop, stat=stat)
        except OSError as exc:
            log.error(
                "SOP %s from %s: cannot write to the spool %s: %s; refused with Out of Resources, the sender keeps it",
                sop,
                peer,
                self.spool.folder,
                exc.strerror or exc,
            )
            return OUT_OF_RESOURCES
        log.info(
            "SOP %s from %s: spooled as %s (%d bytes%s)", sop, peer, path.name, len(data), ", stat" if stat else ""
        )
        self.on_stored()
        return SUCCESS


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"
