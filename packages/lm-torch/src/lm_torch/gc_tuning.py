"""The Python garbage collector around a running engine.

A serving process's heap is mostly what start-up built (modules, weights' wrappers, imported libraries): hundreds of
thousands of tracked objects, none of them garbage. CPython's collector walks all of them in every full collection,
and with its default thresholds (700, 10, 10) full collections stop the engine's loop (and leave the GPU idle) for a
time that grows with that heap, while the young ones run every few hundred allocations. Objects a step allocates are
freed by reference counting; the collector finds next to nothing.

`tune()` therefore freezes the heap as it is once the engine has started (frozen objects are skipped by every
collection, though reference counting still frees them) and raises the first generation's threshold, so young
collections run about 15x less often. Cycles made later are still collected. `release()` undoes both once every
engine that called `tune()` has released, so a process that builds and closes engines (tests, notebooks) does not
keep its frozen cycles forever.
"""

from __future__ import annotations

import gc
import threading

GC_GEN0_THRESHOLD = 10_000

_lock = threading.Lock()
_holders = 0
_saved_threshold: tuple[int, int, int] | None = None


def holders() -> int:
    """How many `tune()` calls are not yet released (engines running with `gc_tuning`)."""
    return _holders


def tune() -> None:
    """Collect once, freeze what survives, and raise the gen-0 threshold (kept if already higher)."""
    global _holders, _saved_threshold
    with _lock:
        if _holders == 0:
            _saved_threshold = gc.get_threshold()
        _holders += 1
        gc.collect()
        gc.freeze()
        gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def release() -> None:
    """One `tune()` caller is done; the last one unfreezes the heap and restores the thresholds it found."""
    global _holders, _saved_threshold
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()
            if _saved_threshold is not None:
                gc.set_threshold(*_saved_threshold)
            _saved_threshold = None
