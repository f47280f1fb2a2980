"""The master TCP control connection (seed 001, step 1): the public API in
one place.

The code lives in modules named for their concept (``docs/control.md``,
"Where the code is"):

* :mod:`mpvpn.controlmsg`: framing, the data model (:class:`Vnc`,
  :class:`PeerInfo`) and the message schema with its bounds checks;
* :mod:`mpvpn.peercheck`: does what a peer announces fit with our side;
* :mod:`mpvpn.admission`: the gate in front of the handshake (stamp, MAC,
  BUSY, handshake budget) and the per-source :class:`RateLimiter`;
* :mod:`mpvpn.controlconn`: :class:`ControlConfig` and the client and
  server machines (one transition table);
* :mod:`mpvpn.controlevents`: the events the machines emit;
* :mod:`mpvpn.registry`: the server's :class:`ServerSessions`;
* :mod:`mpvpn.reconnect`: the client's :class:`ClientReconnect` policy.

This module only re-exports their public names (the importers of
``mpvpn.control`` need no change).  All of it is sans-I/O.
"""

from __future__ import annotations

from mpvpn import seal  # noqa: F401  (tests patch control.seal.choose_cipher)
from mpvpn.admission import (BUSY_LEN, MAC_LEN, PREAUTH_FAILURES, STAMP_LEN, HandshakeGuard,
                             HandshakeStamps, RateLimiter, busy_reply, mac_key,
                             stamp_first_message)
from mpvpn.controlconn import (TRANSITIONS, ClientConnection, ControlConfig, Ev, Role,
                               ServerConnection, State)
from mpvpn.controlevents import (ConnectionClosed, DataKeys, HandshakeComplete, KeysActivated,
                                 KeysRetired, KeysRotated, PeerUpdated, ProtocolError,
                                 SessionEstablished, SessionFreed)
from mpvpn.controlmsg import (ERROR_CODES, MAX_FRAME, MAX_LANS, MAX_MESSAGE, MAX_UPLINKS,
                              POSTAUTH_MAX_FRAME, PREAUTH_MAX_FRAME, PROLOGUE, REKEY_PROLOGUE,
                              VERSIONS, FrameDecoder, PeerInfo, Vnc, decode_message,
                              encode_frame)
from mpvpn.peercheck import check_peer, peer_problem
from mpvpn.reconnect import CONFIG_FAILURES, ClientReconnect
from mpvpn.registry import DETACH_REASONS, ServerSession, ServerSessions

__all__ = [
    "PROLOGUE", "VERSIONS", "ControlConfig", "Vnc", "PeerInfo", "DataKeys",
    "FrameDecoder", "encode_frame", "decode_message", "check_peer", "peer_problem",
    "ServerSession",
    "ClientConnection", "ServerConnection", "ServerSessions", "RateLimiter",
    "HandshakeStamps", "HandshakeGuard", "ClientReconnect", "State",
    "HandshakeComplete", "SessionEstablished", "PeerUpdated", "KeysRotated",
    "KeysActivated", "KeysRetired", "ConnectionClosed", "ProtocolError", "SessionFreed",
    # constants importers use
    "REKEY_PROLOGUE", "MAX_FRAME", "MAX_MESSAGE", "PREAUTH_MAX_FRAME", "POSTAUTH_MAX_FRAME",
    "MAX_UPLINKS", "MAX_LANS", "ERROR_CODES", "BUSY_LEN", "STAMP_LEN", "MAC_LEN",
    "PREAUTH_FAILURES", "DETACH_REASONS", "CONFIG_FAILURES", "TRANSITIONS", "Role", "Ev",
    "mac_key", "stamp_first_message", "busy_reply",
]
