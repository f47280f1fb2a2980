"""Debug aid: tracemalloc snapshots of a running agent, for finding leaks.

Off unless the environment variable ``MPVPN_TRACEMALLOC`` names a directory:
then the agent starts :mod:`tracemalloc` (``MPVPN_TRACEMALLOC_FRAMES``
frames per allocation, default 8) and dumps a snapshot there every
``MPVPN_TRACEMALLOC_EVERY`` seconds (default 60) as ``snap-NNNN.tm``.  Diff
two with ``tracemalloc.Snapshot.load(a).compare_to(Snapshot.load(b),
"lineno")`` (``bench/soak.py --tracemalloc`` does).  Tracing costs CPU and
memory: never on a router in production.
"""

from __future__ import annotations

import os
import tracemalloc


class MemTrace:
    """Periodic snapshots into ``directory``; :meth:`poll` from the main loop."""

    def __init__(self, directory: str, every: float = 60.0, frames: int = 8):
        self.directory = directory
        self.every = every
        self.frames = frames
        self.count = 0
        self._next: float | None = None

    @classmethod
    def from_env(cls, env=os.environ) -> "MemTrace | None":
        directory = env.get("MPVPN_TRACEMALLOC")
        if not directory:
            return None
        return cls(directory, float(env.get("MPVPN_TRACEMALLOC_EVERY", "60")),
                   int(env.get("MPVPN_TRACEMALLOC_FRAMES", "8")))

    def poll(self, now: float) -> None:
        if self._next is None:
            os.makedirs(self.directory, exist_ok=True)
            tracemalloc.start(self.frames)
            self._next = now + self.every
            return
        if now >= self._next:
            self._next = now + self.every
            self.dump()

    def stop(self) -> None:
        if self._next is not None:
            tracemalloc.stop()
            self._next = None

    def dump(self) -> str:
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        path = os.path.join(self.directory, f"snap-{self.count:04d}.tm")
        snap.dump(path + ".tmp")
        os.replace(path + ".tmp", path)
        self.count += 1
        return path
