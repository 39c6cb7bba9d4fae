"""A small least-recently-used cache for traces, plans and compiled functions."""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

_ALL: list[LRU] = []


class LRU:
    """``get(key, make)``: the cached value for ``key``, made (and kept) on a miss.

    A ``None`` key means "not cacheable": ``make()`` runs every time.
    """

    def __init__(self, size: int):
        self.size = size
        self._data: collections.OrderedDict = collections.OrderedDict()
        _ALL.append(self)

    def get(self, key: Hashable | None, make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = self._data[key] = make()
        if len(self._data) > self.size:
            self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


def clear_all() -> None:
    """Empties every cache (traces, plans, compiled functions)."""
    for cache in _ALL:
        cache.clear()
