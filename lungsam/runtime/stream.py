"""The prefetching stream behind :meth:`lungsam.runtime.LungSegmenter.segment_many` (torch-free).

A background thread maps each source through ``prepare`` (reading and preprocessing an image: I/O and numpy
that release the GIL) while the caller's thread runs inference on the items already prepared. The queue between
them is bounded, so at most ``depth`` prepared images wait in memory; closing the stream (or leaving the loop
early) stops the thread within a queue timeout.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, nullcontext
from typing import Any, TypeVar

T = TypeVar("T")
PUT_TIMEOUT_S = 0.1  # how often a blocked producer checks whether the consumer has gone
JOIN_TIMEOUT_S = 5.0
_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    """Put ``item`` unless the consumer has stopped (never blocks past ``stop``)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=PUT_TIMEOUT_S)
            return
        except queue.Full:
            continue


def _produce(sources: Iterable[Any], prepare: Callable[[Any], Any], listing_failed: Callable[[Exception], Any],
             q: queue.Queue, stop: threading.Event) -> None:
    """The producer thread: ``prepare(src)`` for each source (``prepare`` must not raise; it returns the
    failure as an item), ``listing_failed(e)`` when iterating ``sources`` itself raised, then the end mark."""
    try:
        for src in sources:
            if stop.is_set():
                return
            _put(q, prepare(src), stop)
    except Exception as e:  # the iterable itself failed
        q.put(listing_failed(e))
    finally:
        _put(q, _END, stop)


def prefetched(sources: Iterable[Any], prepare: Callable[[Any], T], depth: int,
               listing_failed: Callable[[Exception], T], name: str = "lungsam-prefetch") -> Iterator[T]:
    """``prepare(src)`` for each of ``sources``, in order, computed up to ``depth`` items ahead in a daemon thread.

    ``prepare`` turns a bad source into a failure item rather than raising; ``listing_failed(e)`` gives the
    item that ends the stream when ``sources`` itself raises ``e``.
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(sources, prepare, listing_failed, q, stop), name=name,
                              daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            yield item
    finally:
        stop.set()
        thread.join(timeout=JOIN_TIMEOUT_S)


def chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Lists of up to ``size`` consecutive items (the last may be shorter); closes ``items`` when done."""
    with closing(items) if hasattr(items, "close") else nullcontext():
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def in_order_runs(items: list[Any], is_ready: Callable[[Any], bool]) -> Iterator[list[Any] | Any]:
    """``items`` in order as runs (lists) of consecutive ready ones, and each other item on its own (unwrapped).

    ``segment_many`` runs each list as one model batch and yields the failures in place, keeping input order.
    """
    run: list[Any] = []
    for item in items:
        if is_ready(item):
            run.append(item)
            continue
        if run:
            yield run
            run = []
        yield item
    if run:
        yield run
