"""Replace a file whole or not at all (``uci commit``'s way): a temporary
file in the same directory, fsync, the mode, rename over the real path,
fsync of the directory.  A reader sees the old file or the new one, never a
half-written one, also after a crash."""

from __future__ import annotations

import os
import tempfile


def replace(path: str | os.PathLike, data: bytes, mode: int, prefix: str = ".tmp-") -> None:
    """Write ``data`` to ``path`` (symlinks followed) with ``mode``."""
    target = os.path.realpath(path)
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
