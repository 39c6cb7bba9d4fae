"""Host buffers and drawing threads for flat draws on the CPU (``flat``).

A flat draw writes each leaf's blocks into a host buffer that becomes the CPU device
array without another copy, and shares the blocks out among the CPU cores:

* ``aligned_empty``: an uninitialized, aligned buffer; a large one is an anonymous
  mapping whose pages are populated in bulk, by the thread about to write them.
* ``share_out``: a function run side by side on the calling thread and on pool threads,
  each taking the next unit of work until none are left.
"""

from __future__ import annotations

import concurrent.futures
import functools
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

ALIGN = 64  # host buffers this aligned become CPU device arrays without a copy
POPULATE_BYTES = 1 << 20  # larger buffers are mapped, with their pages populated in bulk
MAX_WORKERS = 4  # threads drawing side by side at most (the caller's and 3 in a pool)

# Linux's MADV_POPULATE_WRITE (5.14+), which Python's mmap module does not name yet.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def aligned_empty(n: int, dtype: Any) -> tuple[np.ndarray, Callable[[int, int], None] | None]:
    """``(buffer, populate)``: an uninitialized, aligned host buffer of ``n`` elements,
    and ``populate(lo, hi)``, which faults in the pages of elements ``[lo, hi)`` before
    they are written, or None.

    A large buffer is mapped anonymously. Faulting its pages in one by one as blocks are
    copied in costs about 3x as long as populating them in bulk (50 MB: 64 ms against
    20 ms, measured on this project's machine). The drawing threads populate each unit's
    pages just before drawing it (Linux ``MADV_POPULATE_WRITE``), so one thread's page
    faults overlap another's draw; where that is not available the whole buffer is
    mapped populated (``MAP_POPULATE``).

    Examples:
      >>> buf, populate = aligned_empty(1 << 20, np.float32)
      >>> buf.shape, buf.ctypes.data % ALIGN
      ((1048576,), 0)
    """
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    populate_now = getattr(mmap, "MAP_POPULATE", None)
    if nbytes >= POPULATE_BYTES and populate_now is not None:
        later = populate_write_ok()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0 if later else populate_now)
        try:
            buf = mmap.mmap(-1, nbytes, flags=flags)
        except OSError:
            pass  # e.g. a locked-memory limit: fall back to the heap
        else:  # page-aligned; unmapped when the array is freed
            return np.frombuffer(buf, dtype, n), (
                functools.partial(_populate, buf, dtype.itemsize) if later else None)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype), None


def _populate(buf: mmap.mmap, itemsize: int, lo: int, hi: int) -> None:
    start = lo * itemsize - lo * itemsize % mmap.PAGESIZE
    try:
        buf.madvise(_MADV_POPULATE_WRITE, start, hi * itemsize - start)
    except OSError:
        pass  # only a speed-up: the copy faults the pages in


@functools.cache
def populate_write_ok() -> bool:
    """Whether this kernel populates pages on ``madvise(MADV_POPULATE_WRITE)``."""
    if not hasattr(mmap.mmap, "madvise") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    buf = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(_MADV_POPULATE_WRITE, 0, mmap.PAGESIZE)
    except OSError:
        return False
    finally:
        buf.close()
    return True


def share_out(units: list, work: Callable[[Callable[[], Any]], None]) -> None:
    """Runs ``work(take)`` on this thread and on up to ``workers() - 1`` pool threads;
    ``take()`` hands each the next unit, and None once all are taken or one has failed.
    Returns when every thread has stopped; the first error is raised here.

    Examples:
      >>> done = []
      >>> def work(take):
      ...     while (unit := take()) is not None:
      ...         done.append(unit * unit)
      >>> share_out(list(range(5)), work)
      >>> sorted(done)
      [0, 1, 4, 9, 16]
    """
    lock, it, failed = threading.Lock(), iter(units), threading.Event()

    def take():
        with lock:
            return None if failed.is_set() else next(it, None)

    def run():
        try:
            work(take)
        except BaseException:
            failed.set()  # the other threads stop after their current unit
            raise

    helpers = min(workers(), len(units)) - 1
    futures = [_pool().submit(run) for _ in range(helpers)]
    try:
        run()
    finally:
        # Wait for the helpers even on an error here: they write into buffers this call
        # owns.
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def workers() -> int:
    """Threads that draw side by side: the CPU cores this process may run on, at most
    ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


_POOL: list[concurrent.futures.ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(concurrent.futures.ThreadPoolExecutor(
                MAX_WORKERS - 1, thread_name_prefix="flaxlazy-draw"))
        return _POOL[0]


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so a new pool is
    made on first use (waiting on the old one would never return)."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
