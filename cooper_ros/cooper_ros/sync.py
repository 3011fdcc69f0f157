"""Pairing messages with a camera frame by header stamp (what message_filters does; it is not in
the pip wheels)."""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["StampBuffer", "stamp_ns"]


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampBuffer:
    """The last ``size`` messages of a topic; :meth:`nearest` finds the one whose stamp is
    closest to a frame's, within a tolerance. Filled by the executor thread, read by the model
    worker."""

    def __init__(self, size: int = 30):
        self._msgs: deque = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, msg: Any) -> None:
        with self._lock:
            self._msgs.append((stamp_ns(msg.header.stamp), msg))

    def clear(self) -> None:
        with self._lock:
            self._msgs.clear()

    def __len__(self) -> int:
        return len(self._msgs)

    def nearest(self, stamp, tolerance_s: float):
        """The message nearest in stamp to ``stamp`` (a Time message or ns) if it is within
        ``tolerance_s``, else None."""
        t = stamp if isinstance(stamp, int) else stamp_ns(stamp)
        with self._lock:
            best = min(self._msgs, key=lambda m: abs(m[0] - t), default=None)
        if best is None or abs(best[0] - t) > tolerance_s * 1e9:
            return None
        return best[1]
