"""Where a leaf's value comes from: the ``Source`` interface every source implements.

A source is one module of this package ending in one ``Source`` value, listed once in
``registry.SOURCES``; ``plan.build``, ``engine.execute`` and ``initializer_names`` iterate
that registry and name no source themselves. A source has four sides:

* recognizing: ``recognizes(value)``, whether a value of the initializer tree (or None, a
  leaf no override names) is this source's;
* planning: ``plan(query, memo)``, from the leaf's ``Query`` to its ``Planned`` recipe
  (program, value, key) in the plan (``plan.Leaf``); checks that need no data happen
  here, before anything is read or drawn;
* describing: ``describe(leaf, found)``, the leaf's origin in words for reports;
* executing: ``execute(plan, indices, context) -> {index: array}``, the arrays of the
  plan's leaves of that kind, created where the plan places them.

===============  =====================================================================
``flax``         the module's own initializer, replayed alone (``own``; executed by
                 ``compiled``, one compiled function per distinct program)
``initializer``  an override from ``initializers=`` (``initializer``; ``compiled``)
``array``        an array given in ``initializers=`` (``array``)
``checkpoint``   read from an Orbax checkpoint (``from_checkpoint``)
``safetensors``  read from safetensors files, Hugging Face's among them
                 (``from_safetensors/``: the format, the mapping, the source)
``traced``       what has no static recipe: one compiled, pruned run of the whole init
                 or constructor (``traced``)
===============  =====================================================================

Adding a source is one module here, its ``Source`` value, and its line in
``registry.SOURCES``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FLAX = "flax"
INITIALIZER = "initializer"
ARRAY = "array"
CHECKPOINT = "checkpoint"
TRACED = "traced"

NOT_A_VALUE = (
    "initializers: {label} maps {path!r} to {value!r}; expected an initializer "
    "`(key, shape, dtype) -> Array`, an array of the parameter's shape, or None."
)


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

    def home(self) -> Any:
        """Where a leaf with no placement of its own goes, as ``jax.jit(init)`` would put
        it: on the one device every root key is committed to, else None (the default
        device, uncommitted). Every source places such leaves there."""
        roots = list(self.roots.values())
        if roots and all(isinstance(r, jax.Array) and not isinstance(r, jax.core.Tracer)
                         and r.committed for r in roots):
            devices = {d for r in roots for d in r.devices()}
            if len(devices) == 1:
                return jax.sharding.SingleDeviceSharding(devices.pop())
        return None


class Query(NamedTuple):
    """One leaf to plan, as every source sees it.

    Attributes:
      path: the collection-qualified path, e.g. ``"params/Dense_0/kernel"``.
      shape: the leaf's shape.
      dtype: the leaf's dtype.
      rule: the initializer rule that names the leaf (``rules.Rule``), or None.
      record: the trace record of the variable holding the leaf, or None.
      sub: the leaf's path inside that variable's value (``""``: the whole value).
      root_key: the abstract root key overrides derive from (``traced.override_root``).
      traced: the entrance's abstract trace (``override_stream``, ``checkpoint_subtree``).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    rule: Any
    record: Any
    sub: str
    root_key: Any
    traced: Any


class Planned(NamedTuple):
    """A source's recipe for one leaf (the fields of ``plan.Leaf`` a source decides).

    Attributes:
      program: the traced ``fn(key) -> array`` (or ``fn()``), for compiled sources.
      value: what the source's ``execute`` reads (an array, a checkpoint entry...).
      key: the uint32 folded into the root key of ``stream``, or None.
      stream: the RNG stream ``key`` is folded into.
      layers: the leading layer axes whose rows have keys of their own (``own``).
      layer: with ``layers``, one layer's program.
    """

    program: Any = None
    value: Any = None
    key: int | None = None
    stream: str | None = None
    layers: tuple[int, ...] = ()
    layer: Any = None


class Found(NamedTuple):
    """What ``describe`` may need beyond the plan's leaf.

    Attributes:
      record: the trace record of the variable holding the leaf, or None.
      rule: the initializer rule naming the leaf (with its value), or None.
    """

    record: Any
    rule: Any


def _finish_nothing(leaves: Sequence[Any], memo: dict) -> None:
    del leaves, memo


class Source(NamedTuple):
    """One source of leaf values: four functions and the kind it writes in the plan.

    Attributes:
      kind: the name in ``plan.Leaf.source`` (``"flax"``, ``"checkpoint"``...).
      recognizes: ``recognizes(value) -> bool``: whether an initializer-tree value is this
        source's (``value`` is None for a leaf no override names). Recognizers of values
        exclude each other; for None, the registry's order decides (first that plans).
      plan: ``plan(query, memo) -> Planned | None``: the leaf's recipe, or None when this
        source cannot make it (the next source that recognizes the value is asked).
        ``memo`` is a dict private to this source for one ``plan.build`` (headers read
        once, entries used...). Raises ValueError/TypeError naming the path.
      describe: ``describe(leaf, found) -> str``: the leaf's origin in words (``summary``
        and ``inspect``), from the ``plan.Leaf`` and a ``Found``.
      execute: ``execute(plan, indices, context) -> {index: array}``: the arrays of the
        plan's leaves at ``indices`` (all of this kind), placed as the plan says.
      finish: ``finish(leaves, memo) -> None``: checks over the whole plan once every leaf
        is planned (entries of a checkpoint no leaf reads...). Default: nothing.
    """

    kind: str
    recognizes: Callable[[Any], bool]
    plan: Callable[[Query, dict], Planned | None]
    describe: Callable[[Any, Found], str]
    execute: Callable[[Any, list[int], Context], dict[int, Any]]
    finish: Callable[[Sequence[Any], dict], None] = _finish_nothing


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
