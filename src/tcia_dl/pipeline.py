"""The two bounds of the download/pack pipeline: connections and scratch.

A series holds a connection only while it downloads. Once its files are all in scratch it
hands the connection on and waits for a core to pack on, so the connections keep fetching
while the cores pack (before, a worker's connection idled while it packed: bench/ "small"
regime, 416 series at 150 ms to the first byte, ours / limit 1.54). What bounds the series
waiting in scratch is --temp-limit: a series starts only when its scratch fits beside what
the series in flight already hold."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Iterator, Optional

from .errors import Interrupted

# How often a waiting worker looks at the stop events: a stop is seen within this.
STOP_POLL = 0.2


class ConnectionSlots:
    """At most `count` series download at once (--workers). A worker takes a slot before
    its series' first request and hands it on (hand_on) when the series is in scratch; an
    attempt that must download again takes one again (take). count None: no bound (a source
    that admits its series itself, whose own slots a worker may hold between attempts: a
    second bound would let workers wait on each other for ever)."""

    def __init__(self, count: Optional[int], stop: threading.Event):
        self._free = threading.Semaphore(count) if count is not None else None
        self._stop = stop
        self._mine = threading.local()

    def held(self) -> bool:
        return getattr(self._mine, "held", False)

    def take(self) -> None:
        """Hold a slot (if this thread does not already); Interrupted on a stop."""
        while not self.held():
            if self._stop.is_set():
                raise Interrupted()
            if self._free is None or self._free.acquire(timeout=STOP_POLL):
                self._mine.held = True
                if self._stop.is_set():       # the stop came while it waited
                    self.hand_on()
                    raise Interrupted()

    def hand_on(self) -> None:
        """This thread's download is over: another series may start one."""
        if self.held():
            self._mine.held = False
            if self._free is not None:
                self._free.release()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.hand_on()


class ScratchBudget:
    """Bytes of --temp_dir the series in flight may hold together (--temp-limit). Granted
    first come, first served, so that a big series is not overtaken for ever by small ones;
    a series is always granted when nothing else holds scratch."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit = limit
        self._stop = stop
        self._held = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserved(self, need: int) -> Iterator[None]:
        """Hold need bytes while the block runs; Interrupted if the run stops first."""
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                while not self._granted(ticket, need):
                    if self._stop.is_set():
                        raise Interrupted()
                    self._changed.wait(STOP_POLL)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
            self._held += need
        try:
            yield
        finally:
            with self._changed:
                self._held -= need
                self._changed.notify_all()

    def _granted(self, ticket: object, need: int) -> bool:
        return self._queue[0] is ticket and (self._held == 0 or self._held + need <= self.limit)

    @property
    def held(self) -> int:
        with self._changed:
            return self._held

    @property
    def waiting(self) -> int:
        """Series waiting for their scratch."""
        with self._changed:
            return len(self._queue)
