"""Camera input taken when the model wants it, not delivered by callbacks.

A 60 Hz camera delivered by callbacks costs the executor thread a wake-up, a deserialisation and
the GIL every 16 ms, for frames the model never uses: it takes one frame per perception step.
Measured with ``python -m cooper_ros.bench --contention`` on a 2-core machine, such a subscription
slowed a one-thread model by a third. So the node's inputs (image, compressed image, camera_info,
sparse metric source) are subscriptions of a helper node that no executor spins; the model worker
takes from them when it starts a step or a question (:meth:`Intake.poll`), and the middleware
keeps only the newest image meanwhile (KEEP_LAST 1). Nothing wakes the executor for a frame.

The helper node has a hidden name (``_<node>_intake``) and no remapping of its own: it subscribes
to the topic names the main node resolved, so the main node's ``-r image:=...`` remaps apply.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ["Intake"]


class _Source:
    def __init__(self, sub, on_message: Callable[[Any], None], newest_only: bool):
        self.sub = sub
        self.on_message = on_message
        self.newest_only = newest_only
        self.last_seq: dict[bytes, int] = {}   # per publisher: its last publication sequence number

    def superseded(self, got: list[tuple[Any, dict]]) -> int:
        """Of a take, the frames that reached the reader and were replaced by newer ones before it
        (or were lost on the way): all but the newest, and the gaps in each publisher's sequence
        numbers since the last take."""
        count = len(got) - 1
        for _msg, info in got:
            seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid") or {}
            if seq is None or seq <= 0:   # a middleware without sequence numbers
                continue
            key = bytes(gid.get("data", b""))
            last = self.last_seq.get(key)
            if last is not None and seq > last + 1:
                count += seq - last - 1
            self.last_seq[key] = seq
        return count

    def take_all(self) -> list[tuple[Any, dict]]:
        out = []
        with self.sub.handle:
            while True:
                got = self.sub.handle.take_message(self.sub.msg_type, self.sub.raw)
                if got is None:
                    return out
                out.append(got)


class Intake:
    """Subscriptions the model worker takes from (see the module docstring)."""

    def __init__(self, parent_node, count_gap: Callable[[int], None]):
        from rclpy.node import Node

        self._count_gap = count_gap
        self._lock = threading.Lock()   # polls (model worker) vs destroy (lifecycle teardown)
        self._sources: list[_Source] = []
        self.node = Node(f"_{parent_node.get_name()}_intake", namespace=parent_node.get_namespace(),
                         context=parent_node.context, use_global_arguments=False,
                         start_parameter_services=False, enable_rosout=False)

    def add(self, msg_type, topic: str, qos, on_message: Callable[[Any], None], newest_only: bool) -> None:
        """``topic`` is a resolved name. ``newest_only``: hand over only the newest message of a
        poll and count the others (and gaps in the publisher's sequence numbers) as superseded."""
        sub = self.node.create_subscription(msg_type, topic, lambda _msg: None, qos)
        self._sources.append(_Source(sub, on_message, newest_only))

    def poll(self) -> None:
        """Take what arrived since the last poll."""
        with self._lock:
            for src in self._sources:
                got = src.take_all()
                if not got:
                    continue
                if src.newest_only:
                    superseded = src.superseded(got)
                    if superseded:
                        self._count_gap(superseded)
                    got = got[-1:]
                for msg, _info in got:
                    src.on_message(msg)

    def destroy(self) -> None:
        with self._lock:
            self._sources = []
            self.node.destroy_node()
