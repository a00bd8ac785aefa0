"""Preparing the next frame while the backbone runs this one: a producer thread a few items ahead.

Resizing a camera frame costs a good share of a small backbone's time (docs/benchmarks.md, "Frames
and files at batch 1"); Pillow and numpy release the GIL while they work, so on a thread that work
overlaps the backbone instead of adding to it. Never imports torch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
_END = object()
_POLL_S = 0.1  # how often a blocked producer looks whether the consumer has gone


def prepared_ahead(items: Iterable[In], prepare: Callable[[In], Out], depth: int = 2) -> Iterator[Out]:
    """``prepare(item)`` for each item, in order, computed on a thread up to ``depth`` items ahead.

    An exception from ``items`` or ``prepare`` is raised here at its place in the order. Closing the
    iterator early stops the thread (after the item it is preparing) before ``close`` returns.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((prepare(item), None)):
                    return
        except BaseException as exc:  # re-raised by the consumer, in order
            hand_over((None, exc))
            return
        hand_over(_END)

    thread = threading.Thread(target=produce, name="pah-edge-prepare", daemon=True)
    thread.start()
    try:
        while (entry := ready.get()) is not _END:
            value, error = entry
            if error is not None:
                raise error
            yield value
    finally:
        stop.set()
        thread.join()
