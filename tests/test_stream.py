"""lungsam.runtime.stream: the prefetching stream behind segment_many (order, failures, bounded, stops)."""
from __future__ import annotations

import threading
import time

import pytest

from lungsam.runtime.stream import chunks, in_order_runs, prefetched


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_prefetched_keeps_order_and_prepares_in_another_thread():
    seen = []

    def prepare(x):
        seen.append(threading.current_thread().name)
        return x * 10

    out = list(prefetched(range(7), prepare, depth=2, listing_failed=lambda e: ("failed", e), name="t-order"))
    assert out == [0, 10, 20, 30, 40, 50, 60]
    assert set(seen) == {"t-order"}
    assert not _threads("t-order")


def test_a_failing_listing_ends_the_stream_with_its_failure_item():
    def sources():
        yield 1
        yield 2
        raise OSError("disk gone")

    out = list(prefetched(sources(), lambda x: x, depth=1, listing_failed=lambda e: f"failed: {e}", name="t-fail"))
    assert out == [1, 2, "failed: disk gone"]


def test_the_queue_is_bounded_and_an_early_stop_ends_the_thread():
    prepared = []

    def prepare(x):
        prepared.append(x)
        return x

    stream = prefetched(range(1000), prepare, depth=3, listing_failed=lambda e: e, name="t-stop")
    assert next(stream) == 0
    time.sleep(0.3)  # the producer runs ahead only as far as the queue allows
    assert len(prepared) <= 1 + 3 + 1  # the one taken, the queue, the one blocked in put
    stream.close()
    assert not _threads("t-stop")
    with pytest.raises(ValueError, match="depth"):
        next(prefetched([1], lambda x: x, depth=0, listing_failed=lambda e: e))


def test_chunks_and_in_order_runs():
    assert list(chunks(iter(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert list(chunks(iter([]), 3)) == []
    items = [1, 2, "bad", 3, "bad2", "bad3", 4]
    got = list(in_order_runs(items, lambda x: isinstance(x, int)))
    assert got == [[1, 2], "bad", [3], "bad2", "bad3", [4]]
    assert list(in_order_runs([], bool)) == []
