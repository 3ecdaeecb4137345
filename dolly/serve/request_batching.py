"""Batching across requests: concurrent `predict` calls of one loaded model share generations.

MLflow's scoring server answers each request in a thread of its own (`asyncio.to_thread`), so
eight one-row requests would be eight one-row generations fighting over the cores. Serving
systems gather concurrent requests into one batch instead (Ray Serve's `@serve.batch`, TGI's and
vLLM's schedulers); `RequestBatcher` does that inside the model, so it works under
`mlflow models serve`, in-process and in Spark alike, with no server of our own.

One worker thread per batcher runs every generation. A call hands its rows in and waits:

- rows are batched only with rows of equal generation settings (`key`); the oldest waiting call
  decides which settings go next, so no call is passed over;
- a batch holds at most `max_batch` rows: the waiting calls' rows in arrival order, each call's
  own rows shortest prompt first (a large call is cut into length-sorted batches); the worker
  waits at most `wait_s` for more rows when a batch is not full, and only while calls overlap
  (one came while another was in flight in the last `OVERLAP_MEMORY_S`): a lone caller, or
  callers taking turns, never wait;
- a call whose deadline has passed is dropped before its rows start, and rows already running
  stop at the next token (`run` gets the deadlines: dolly.generation.DeadlineStop);
- each call gets exactly its own answers, in its own order.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


OVERLAP_MEMORY_S = 10.0


class DeadlinePassed(Exception):
    """The call's deadline passed before all its rows were answered: nobody waits for them."""


@dataclass(eq=False)
class _Call:
    rows: list[Any]
    order: list[int]  # row indices, shortest prompt first
    key: Hashable
    settings: Any
    deadline: float | None
    arrived: float
    handed: int = 0  # rows of `order` given to the worker so far
    left: int = 0  # rows not answered yet
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.done.set()


class RequestBatcher:
    """Gathers rows from concurrent calls into batches for one generation function.

    `run(rows, settings, deadlines) -> answers`: generates answers for `rows` (a list, at most
    `max_batch`) with `settings`, one answer per row in order, stopping rows whose deadline
    (`time.monotonic()` seconds, or None) passes. `max_batch` >= 1 rows per batch; `wait_s` >= 0:
    the longest the worker holds a batch that is not full, counted from the later of the oldest
    call's arrival and the end of the previous batch (so callers answered by one batch can join
    the next), while calls overlap. `clock`: the time in seconds that arrivals and deadlines are
    measured in (`time.monotonic`; a test passes one it advances by hand).
    """

    def __init__(self, run: Callable[[list, Any, list], Sequence], max_batch: int,
                 wait_s: float, name: str = "dolly-batcher",
                 clock: Callable[[], float] = time.monotonic):
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and wait_s >= 0, got {max_batch}, {wait_s}")
        self._run, self.max_batch, self.wait_s, self._name = run, max_batch, wait_s, name
        self.clock = clock
        self._cv = threading.Condition()
        self._waiting: list[_Call] = []
        self._free_since = 0.0
        self._in_flight = 0  # calls inside submit
        self._overlap_at = float("-inf")  # when a call last came while another was in flight
        self._worker: threading.Thread | None = None
        self.batches: list[int] = []  # the size of every batch run (the last 1,000), for tests

    def submit(self, rows: Sequence, settings: Any, key: Hashable,
               lengths: Sequence[int] | None = None, deadline: float | None = None) -> list:
        """Answers for `rows`, in order, once the worker has generated them all.

        `lengths`: each row's prompt length (rows are batched shortest first); `deadline`: a
        `time.monotonic()` time after which nobody waits. Raises DeadlinePassed if the deadline
        passes first, or whatever `run` raised for a batch holding this call's rows.
        """
        rows = list(rows)
        if not rows:
            return []
        lengths = list(lengths) if lengths is not None else [0] * len(rows)
        call = _Call(rows, sorted(range(len(rows)), key=lambda i: lengths[i]), key, settings,
                     deadline, self.clock(), left=len(rows), results=[None] * len(rows))
        with self._cv:
            self._start_worker()
            if self._in_flight:
                self._overlap_at = call.arrived
            self._in_flight += 1
            self._waiting.append(call)
            self._cv.notify_all()
        try:
            call.done.wait()
        finally:
            with self._cv:
                self._in_flight -= 1
        if call.error is not None:
            raise call.error
        return call.results

    # --- the worker ------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._worker.start()

    def _next_batch(self) -> list[tuple[_Call, int]]:
        """Under the lock: wait for rows, then take the next batch: (call, row index) pairs."""
        while True:
            now = self.clock()
            for call in [c for c in self._waiting if c.deadline is not None
                         and now >= c.deadline]:
                self._waiting.remove(call)
                call.finish(DeadlinePassed("the deadline passed before the answer was ready"))
            if not self._waiting:
                self._cv.wait()
                continue
            head = self._waiting[0]
            same = [c for c in self._waiting if c.key == head.key]
            pending = sum(len(c.order) - c.handed for c in same)
            overlapping = now - self._overlap_at < OVERLAP_MEMORY_S
            until = max(head.arrived, self._free_since) + (self.wait_s if overlapping else 0.0)
            deadlines = [c.deadline for c in same if c.deadline is not None]
            if pending >= self.max_batch or now >= until:
                break
            self._cv.wait(timeout=min([until, *deadlines]) - now)
        batch: list[tuple[_Call, int]] = []
        for call in same:
            take = call.order[call.handed:call.handed + self.max_batch - len(batch)]
            batch += [(call, i) for i in take]
            call.handed += len(take)
            if call.handed == len(call.order):
                self._waiting.remove(call)
            if len(batch) == self.max_batch:
                break
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
            calls = {id(c): c for c, _ in batch}
            try:
                answers = list(self._run([c.rows[i] for c, i in batch], batch[0][0].settings,
                                         [c.deadline for c, _ in batch]))
                if len(answers) != len(batch):
                    raise RuntimeError(f"{len(answers)} answers for {len(batch)} rows")
            except BaseException as e:  # every call in the batch hears of it; the worker goes on
                with self._cv:
                    for c in calls.values():
                        if c in self._waiting:
                            self._waiting.remove(c)
                        c.finish(e)
                answers = None
            if answers is not None:
                for (call, i), answer in zip(batch, answers):
                    call.results[i] = answer
                    call.left -= 1
                    if call.left == 0:
                        call.finish()
            with self._cv:
                self._free_since = self.clock()
                self.batches = [*self.batches[-999:], len(batch)]
