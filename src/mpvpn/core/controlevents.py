"""Control connection: the events the machines emit (and their data keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpvpn.core.controlmsg import PeerInfo
from mpvpn.core.pairing import PlanDiff


@dataclass(frozen=True)
class DataKeys:
    """Per-direction data-plane keys (32 bytes each) for one key epoch."""

    epoch: int
    send: bytes = field(repr=False)
    recv: bytes = field(repr=False)


@dataclass(frozen=True)
class HandshakeComplete:
    version: int
    handshake_hash: bytes = field(repr=False)


@dataclass(frozen=True)
class SessionEstablished:
    session_id: int
    peer: PeerInfo
    plan: list  # list[SubflowSpec], our orientation (local = our uplink)
    keys: DataKeys
    epoch: int
    version: int
    cipher: str = "chacha20-poly1305"  # the data-plane AEAD (mpvpn.core.seal.CIPHERS)


@dataclass(frozen=True)
class PeerUpdated:
    """The plan and/or the peer's info changed (``origin`` 'peer': the peer
    sent UPDATE; 'local': our own send_update re-planned)."""

    peer: PeerInfo
    plan: list
    diff: PlanDiff
    origin: str = "peer"


@dataclass(frozen=True)
class KeysRotated:
    """New data keys for ``epoch``.  Install them for receiving at once and
    keep ``previous_epoch``'s.  If ``sending`` is true, send with them from
    now on; otherwise keep sending with the previous epoch until
    :class:`KeysActivated` (we answered the peer's rekey and do not yet know
    that the peer has the new keys)."""

    epoch: int
    keys: DataKeys
    previous_epoch: int
    sending: bool


@dataclass(frozen=True)
class KeysActivated:
    """Start sending with ``epoch`` (the peer confirmed it holds the keys)."""

    epoch: int


@dataclass(frozen=True)
class KeysRetired:
    """Drop the keys of ``epoch``: the overlap after a rotation is over."""

    epoch: int


@dataclass(frozen=True)
class ConnectionClosed:
    """Terminal.  Flush ``data_to_send()`` (it may hold a BYE or ERROR),
    then close the socket.  ``retry_after`` (seconds) is set when the server
    answered BUSY: it holds our key but had no handshake budget left, so
    try again that soon rather than backing off."""

    reason: str
    text: str
    by_peer: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class ProtocolError:
    """An ERROR: detected by us and sent (``by_peer`` False) or received
    from the peer (``by_peer`` True).  Always followed by ConnectionClosed."""

    code: str
    text: str
    by_peer: bool


@dataclass(frozen=True)
class SessionFreed:
    """(ServerSessions) a session is gone: free its session ID, keys,
    routes and subflows."""

    session_id: int
    name: str
    reason: str
    conn: object = field(default=None, repr=False, compare=False)  # its ServerConnection, if any




@dataclass(frozen=True)
class PeerMessage:
    """A message about a direct site-to-site path (PEER_OFFER, PEER_HS,
    PEER_END; parsed and bounded by :mod:`mpvpn.core.controlmsg`): the hub's
    broker or the site's direct peers (:mod:`mpvpn.core.peerdirect`) decide."""

    message: dict
