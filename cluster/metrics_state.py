"""Bookkeeping behind cluster/metrics.py: cumulative worker counters -> deltas, and sliding windows."""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable


class CounterDeltas:
    """Turns counters that workers report cumulatively into increments.

    A worker's counters only grow, except when the worker restarts (a replaced actor begins
    again at 0): then a value below the last one is taken whole as the increment, as
    Prometheus' rate() treats a reset. A worker may also report an `incarnation` (pid, start
    time) so that a restart is noticed even when the new counter already passed the old one.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._incarnation: dict[str, Hashable] = {}

    def new_incarnation(self, worker: str, incarnation: Hashable | None) -> None:
        if incarnation is None:
            return
        if worker in self._incarnation and self._incarnation[worker] != incarnation:
            self.forget(worker)
        self._incarnation[worker] = incarnation

    def delta(self, worker: str, key: str, value: float) -> float:
        last = self._last.get((worker, key))
        self._last[(worker, key)] = value
        if last is None or value < last:  # first report, or the worker restarted
            return value
        return value - last

    def forget(self, worker: str) -> None:
        self._last = {k: v for k, v in self._last.items() if k[0] != worker}
        self._incarnation.pop(worker, None)


class Window:
    """Sums of amounts over the last `seconds`, per key (a pool, or None for one series)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.started = clock()
        self._events: collections.deque[tuple[float, Hashable, float]] = collections.deque()

    def add(self, amount: float, key: Hashable = None) -> None:
        if amount:
            self._events.append((self.clock(), key, amount))

    def total(self, key: Hashable = None) -> float:
        self._expire()
        return sum(amount for _, k, amount in self._events if k == key)

    def span(self) -> float:
        """Seconds the window covers: shorter than `seconds` right after start, so an early
        throughput is not divided by time nobody was measuring."""
        return max(min(self.seconds, self.clock() - self.started), 1e-9)

    def _expire(self) -> None:
        horizon = self.clock() - self.seconds
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()
