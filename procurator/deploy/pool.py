"""Running a function over items, a bounded number at a time, interruptible from the calling thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("procurator.deploy")

JOIN_POLL = 0.2  # seconds between checks of the worker threads (keeps the caller interruptible)

T = TypeVar("T")
R = TypeVar("R")


class Bounded(Generic[T, R]):
    """Run `fn` on items, `parallel` at a time, on daemon threads (an abandoned host never blocks exit).

    `wait()` returns when every item is done. A KeyboardInterrupt while waiting: the first sets `stop`
    (no new item starts; `fn` sees it and winds down), the second gives up waiting. Then the keys of
    items still running are in `running`; items never started have no result in `done`.
    """

    def __init__(
        self,
        items: Sequence[T],
        fn: Callable[[T], R],
        key: Callable[[T], str],
        parallel: int,
        stop: threading.Event,
    ) -> None:
        self.items = list(items)
        self.fn = fn
        self.key = key
        self.parallel = parallel
        self.stop = stop
        self.done: dict[str, R] = {}
        self.running: set[str] = set()
        self.interrupted = False
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = 0
        self._finished = threading.Event()
        for item in self.items:
            self._queue.put(item)

    def _worker(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                key = self.key(item)
                with self._lock:
                    self.running.add(key)
                result = self.fn(item)
                with self._lock:
                    self.done[key] = result
                    self.running.discard(key)
        finally:
            with self._lock:
                self._alive -= 1
                if self._alive == 0:
                    self._finished.set()

    def wait(self) -> None:
        # Waiting on an Event, not Thread.join: in Python 3.11 an interrupted join marks the thread
        # stopped while it still runs (bpo-45274's fix), and the second wait would return at once.
        workers = min(self.parallel, len(self.items))
        self._alive = workers
        if workers == 0:
            self._finished.set()
        for i in range(workers):
            threading.Thread(target=self._worker, name=f"deploy-{i}", daemon=True).start()
        try:
            self._wait_finished()
        except KeyboardInterrupt:
            self.stop.set()
            log.info("interrupted: no new host starts; waiting for the hosts in flight")
            try:
                self._wait_finished()
            except KeyboardInterrupt:
                log.info("interrupted again: no longer waiting")
        self.interrupted = self.stop.is_set()

    def _wait_finished(self) -> None:
        while not self._finished.wait(JOIN_POLL):
            pass
