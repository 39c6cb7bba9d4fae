"""A small least-recently-used cache, bounded by entry count and by estimated bytes.

Only values that are a pure function of their key may be cached here: a key must capture
everything that determines the value (see ``programs`` for how compiled initializers are
keyed by what they compute).
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

_ALL: list[LRU | ByObject] = []


class LRU:
    """``get(key, make)``: the cached value for ``key``, made (and kept) on a miss.

    A ``None`` key means "not cacheable": ``make()`` runs every time. The least recently
    used entries are dropped once there are more than ``size`` of them, or once their
    ``nbytes`` (as given to ``get``) add up to more than ``max_bytes``.

    Examples:
      >>> cache = LRU(2)
      >>> cache.get("a", lambda: 1), cache.get("b", lambda: 2), cache.get("a", lambda: 9)
      (1, 2, 1)
      >>> cache.get("c", lambda: 3), len(cache), cache.get("b", lambda: 7)
      (3, 2, 7)
    """

    def __init__(self, size: int, *, max_bytes: int | None = None):
        self.size = size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, key: Hashable | None, make: Callable[[], Any], *, nbytes: int = 0) -> Any:
        if key is None:
            return make()
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
        value = make()  # outside the lock: threads may make different entries at once
        with self._lock:
            if key in self._data:  # made meanwhile by another thread
                return self._data[key][0]
            self._data[key] = (value, nbytes)
            self.nbytes += nbytes
            while len(self._data) > self.size or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
                and len(self._data) > 1
            ):
                _, (_, dropped) = self._data.popitem(last=False)
                self.nbytes -= dropped
        return value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable | None) -> bool:
        return key is not None and key in self._data

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0


class ByObject:
    """``get(obj, make)``: ``make(obj)``, kept for as long as ``obj`` lives.

    For values derived from an object that others keep alive (a jaxpr JAX caches): the
    entry goes when the object does, and never keeps it alive. ``obj`` is compared by
    identity (its type must not define ``__eq__``) and must take weak references.

    Examples:
      >>> class Thing: pass
      >>> cache, thing = ByObject(), Thing()
      >>> cache.get(thing, lambda t: 1), cache.get(thing, lambda t: 2), len(cache)
      (1, 1, 1)
      >>> del thing; len(cache)
      0
    """

    def __init__(self):
        self._data: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, obj: Any, make: Callable[[Any], Any]) -> Any:
        with self._lock:
            value = self._data.get(obj, _MISSING)
        if value is _MISSING:
            value = make(obj)
            with self._lock:
                value = self._data.setdefault(obj, value)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_MISSING = object()


# A jit-compiled CPU function with its wrapper holds about 2-3 MiB (measured: 100
# distinct lecun_normal draws kept alive add 3.0 MiB each); each entry of ``EXECUTABLES``
# counts this, plus the constants baked into it.
EXECUTABLE_BYTES = 5 << 19  # 2.5 MiB

# Every compiled function flaxlazy keeps (initializers, flat-draw kernels, traced runs),
# one bound for all, by program and placement: about 100 functions, far more signatures
# than one model has.
EXECUTABLES = LRU(256, max_bytes=256 << 20)


def clear_caches() -> None:
    """Forgets every compiled initializer and cached program flaxlazy holds.

    flaxlazy caches only what provably gives the same values (compiled code keyed by the
    program it computes), bounded by count and bytes, so this is never needed for
    correctness. Use it to release memory in a long-lived process; JAX's own caches
    are cleared by ``jax.clear_caches()``.

    Examples:
      >>> import flaxlazy
      >>> flaxlazy.clear_caches()
    """
    for cache in _ALL:
        cache.clear()
