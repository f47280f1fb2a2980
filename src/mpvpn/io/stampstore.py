"""The server's handshake freshness records on disk (``HandshakeGuard.records``),
so that a captured first message is not answered again after an agent restart.

One JSON file in the agent's run directory, written whole and renamed into
place (never half-written), mode 0600.  On OpenWrt the run directory is on
tmpfs: the records outlive a restart of the agent, not a reboot
(docs/security.md says what that leaves)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mpvpn.io import atomicfile

FILENAME = "handshake-stamps.json"
VERSION = 1
MAX_BYTES = 4 << 20  # far above 4096 records; a bigger file is not ours


def load(path: str | os.PathLike) -> list[tuple[str | None, bytes, int]]:
    """The records in ``path`` ([] when there is none).  Raises ValueError
    when the file is there but is not a records file of this version."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return []
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{p}: larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("records"), list):
        raise ValueError(f"{p}: not a version {VERSION} records file")
    out = []
    for rec in doc["records"]:
        if isinstance(rec, list) and len(rec) == 3 and isinstance(rec[1], str):
            try:
                out.append((rec[0], bytes.fromhex(rec[1]), rec[2]))
            except ValueError:
                continue  # HandshakeGuard.restore checks the rest
    return out


def save(path: str | os.PathLike, records) -> None:
    """Write ``records`` to ``path`` atomically (temporary file + rename)."""
    p = Path(path)
    doc = {"version": VERSION,
           "records": [[site, sender.hex(), counter] for site, sender, counter in records]}
    atomicfile.replace(p, json.dumps(doc, separators=(",", ":")).encode(), 0o600, prefix=".stamps-")
