"""Counting XLA compilations (for tests that prove nothing recompiles, and benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCount:
    """How many XLA compilations ran, and for how long, inside ``count_compiles``."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def __repr__(self) -> str:
        return f"CompileCount(count={self.count}, seconds={self.seconds:.3f})"


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Counts the backend compilations that happen inside the ``with`` block.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> f = jax.jit(lambda x: x * 3 + 1)
      >>> x = jnp.arange(7.0)
      >>> with count_compiles() as c:
      ...     _ = f(x); _ = f(x)
      >>> c.count
      1
    """
    counter = CompileCount()

    def listener(event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event == _BACKEND_COMPILE_EVENT:
            counter.count += 1
            counter.seconds += duration

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        monitoring.unregister_event_duration_listener(listener)
