"""Where a leaf's value comes from: the source kinds, and what every source shares.

Each kind is one module of this package, with the same two sides:

* planning: from an initializer-tree value (or the module's own recipe) to the leaf's
  ``(source, program, value, key)`` in the plan (``plan.Leaf``);
* execution: ``execute(plan, indices, context) -> {index: array}``, the arrays of the
  plan's leaves of that kind, created where the plan places them.

===============  =====================================================================
``flax``         the module's own initializer, replayed alone (``own``; executed by
                 ``compiled``, one compiled function per distinct program)
``initializer``  an override from ``initializers=`` (``initializer``; ``compiled``)
``array``        an array given in ``initializers=`` (``array``)
``checkpoint``   read from an Orbax checkpoint (``from_checkpoint``)
``traced``       what has no static recipe: one compiled, pruned run of the whole init
                 or constructor (``traced``)
===============  =====================================================================

Adding a source kind is one module here plus its line in ``plan.build`` and
``engine.execute``.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

FLAX = "flax"
INITIALIZER = "initializer"
ARRAY = "array"
CHECKPOINT = "checkpoint"
TRACED = "traced"


class Context(NamedTuple):
    """What execution needs besides the plan.

    Attributes:
      rngs: the call's rngs, as the entrance takes them (Linen: a key or dict of keys;
        NNX: the stream root keys).
      roots: the root keys by stream name.
      inputs: the dynamic inputs, arrays or specs.
    """

    rngs: Any
    roots: dict
    inputs: list


def check_abstract(path: str, got: Any, shape, dtype, what: str) -> None:
    got_shape, got_dtype = tuple(np.shape(got)), getattr(got, "dtype", None)
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise ValueError(
            f"initializers: {what} for {path!r} gives {fmt(got_shape, got_dtype)}, "
            f"but the parameter is {fmt(shape, dtype)}."
            + (
                " Cast it with .astype(...) first."
                if got_shape == tuple(shape)
                else ""
            )
        )


def fmt(shape, dtype) -> str:
    name = jnp.dtype(dtype).name if dtype is not None else "?"
    return f"{name}[{','.join(map(str, shape))}]"
