"""Batching across calls: who is batched with whom, in what order, and what a caller gets back."""
import threading
import time

import pytest

from helpers import FakeClock
from dolly.serve.request_batching import DeadlinePassed, RequestBatcher

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A generation function that answers "<settings>:<row>" and records every batch it ran;
    the first batch waits until `release` is set, so later calls queue up behind it."""

    def __init__(self, hold_first=True):
        self.batches: list[list] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, rows, settings, deadlines):
        self.batches.append(list(rows))
        self.started.set()
        self.release.wait(10)
        if "boom" in rows:
            raise ValueError("boom")
        return [f"{settings}:{r}" for r in rows]


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, box) where box gets 'result' or 'error'."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def queued(batcher, n, timeout=5.0):
    """Wait until n calls wait in the batcher's queue."""
    t0 = time.monotonic()
    while len(batcher._waiting) < n:
        assert time.monotonic() - t0 < timeout, "calls did not queue"
        time.sleep(0.005)


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_answers():
    run = Recorder()
    b = RequestBatcher(run, max_batch=8, wait_s=0.05)
    first = in_thread(b.submit, ["a0"], "g", "g")
    run.started.wait(5)
    calls = [in_thread(b.submit, [f"c{k}r0", f"c{k}r1"][:1 + k % 2], "g", "g") for k in range(4)]
    queued(b, 4)
    run.release.set()
    for t, _ in [first, *calls]:
        t.join(10)
    assert first[1]["result"] == ["g:a0"]
    assert [box["result"] for _, box in calls] == [["g:c0r0"], ["g:c1r0", "g:c1r1"],
                                                   ["g:c2r0"], ["g:c3r0", "g:c3r1"]]
    # the four calls that waited behind the first batch went in one batch, in arrival order
    assert run.batches == [["a0"], ["c0r0", "c1r0", "c1r1", "c2r0", "c3r0", "c3r1"]]
    assert b.batches == [1, 6]


def test_calls_with_other_settings_are_not_batched_together():
    run = Recorder()
    b = RequestBatcher(run, max_batch=8, wait_s=0.01)
    first = in_thread(b.submit, ["x"], "greedy", ("greedy",))
    run.started.wait(5)
    calls = []
    for row, settings in [("p", "greedy"), ("q", "sample"), ("r", "greedy"), ("s", "sample")]:
        calls.append(in_thread(b.submit, [row], settings, (settings,)))
        queued(b, len(calls))
    run.release.set()
    for t, _ in [first, *calls]:
        t.join(10)
    assert [box["result"] for _, box in calls] == [["greedy:p"], ["sample:q"], ["greedy:r"],
                                                   ["sample:s"]]
    assert run.batches == [["x"], ["p", "r"], ["q", "s"]]


def test_a_large_call_is_cut_into_length_sorted_batches_and_answered_in_its_order():
    run = Recorder(hold_first=False)
    b = RequestBatcher(run, max_batch=2, wait_s=0.0)
    rows = ["e5", "a1", "d4", "b2", "c3"]
    out = b.submit(rows, "g", "g", lengths=[5, 1, 4, 2, 3])
    assert out == ["g:e5", "g:a1", "g:d4", "g:b2", "g:c3"]
    assert run.batches == [["a1", "b2"], ["c3", "d4"], ["e5"]]


def test_a_call_past_its_deadline_is_dropped_before_it_runs():
    run, clock = Recorder(), FakeClock()
    b = RequestBatcher(run, max_batch=8, wait_s=0.0, clock=clock)
    first = in_thread(b.submit, ["busy"], "g", "g")
    run.started.wait(5)
    late = in_thread(b.submit, ["late"], "g", "g", deadline=clock() + 0.05)
    on_time = in_thread(b.submit, ["on time"], "g", "g")
    queued(b, 2)
    clock.advance(0.1)  # the first call's deadline passes while the worker is busy
    run.release.set()
    for t, _ in (first, late, on_time):
        t.join(10)
    assert isinstance(late[1]["error"], DeadlinePassed)
    assert on_time[1]["result"] == ["g:on time"]
    assert run.batches == [["busy"], ["on time"]]  # "late" never reached the model


def test_an_error_reaches_the_calls_of_that_batch_and_the_worker_goes_on():
    run = Recorder(hold_first=False)
    b = RequestBatcher(run, max_batch=8, wait_s=0.0)
    with pytest.raises(ValueError, match="boom"):
        b.submit(["boom", "x"], "g", "g")
    assert b.submit(["y"], "g", "g") == ["g:y"]


def test_the_deadlines_reach_the_generation_function():
    seen = []
    b = RequestBatcher(lambda rows, s, d: seen.append(d) or list(rows), max_batch=4, wait_s=0)
    assert b.submit(["a", "b"], None, "k", deadline=1e12) == ["a", "b"]
    assert seen == [[1e12, 1e12]]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        RequestBatcher(lambda *a: [], max_batch=0, wait_s=0.01)


def test_a_lone_caller_does_not_wait_for_company():
    # real time: a wait of wait_s would show in it (a still fake clock would never end one)
    run = Recorder(hold_first=False)
    b = RequestBatcher(run, max_batch=8, wait_s=30.0)  # a wait that would time the test out
    t0 = time.monotonic()
    assert [b.submit([f"r{k}"], "g", "g") for k in range(3)] == [["g:r0"], ["g:r1"], ["g:r2"]]
    assert time.monotonic() - t0 < 20
    assert run.batches == [["r0"], ["r1"], ["r2"]]
