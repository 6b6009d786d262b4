"""A thread that steps an engine while it has work, shared by every worker core.

One re-entrant lock guards the engine (and its block pool); callers take it to add,
abort or inspect requests, and `notify()` wakes the loop. Subclasses implement
`step_locked()`: one engine step under the lock, returning the callbacks to run
after the lock is released, so a slow consumer never stalls a step.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Callback = tuple[Callable[[Any], None], Any]


class EngineLoop:
    def __init__(self, engine, name: str):
        self.engine = engine
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._stop = False
        self.loop_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start_loop(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """Wake the loop after adding work; the caller holds the lock."""
        self._wake.notify()

    def stop_loop(self, timeout_s: float = 10.0) -> None:
        with self.lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=timeout_s)

    def step_locked(self) -> list[Callback]:
        raise NotImplementedError

    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._stop and not self.engine.has_unfinished:
                        self._wake.wait(0.5)
                    if self._stop:
                        return
                    callbacks = self.step_locked()
                for fn, arg in callbacks:
                    fn(arg)
                time.sleep(0)  # let callers waiting on the lock in
        except BaseException as exc:  # noqa: BLE001 - surfaced through stats/health
            self.loop_error = exc
            raise
