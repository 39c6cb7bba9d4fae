"""Overrides from ``initializers=``: a user initializer drawn with a per-path key.

Each overridden leaf's key is the override stream's root key (Linen: ``params``; NNX:
``params``, else ``default``) with a hash of the leaf's path folded in: stable across
processes and unchanged when other layers are added or removed. Stacked leaves
(``nn.scan``/``nn.vmap``) draw one layer at a time, each layer its own parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import naming
from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src.sources import compiled
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import own

# Domain separation: override keys never coincide with the keys Flax derives itself.
_OVERRIDE_KEY_PREFIX = "flaxlazy.initializer"


def override_key(path: str) -> int:
    """The uint32 folded into the root params key for an overridden leaf at ``path``.

    A pure function of the path string: stable across processes and unchanged when other
    layers are added or removed.
    """
    return _compat.static_hash((_OVERRIDE_KEY_PREFIX, path))


def layer_axes(full: tuple[int, ...], layer: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes that stacking (``nn.scan``/``nn.vmap``) added to a per-layer shape."""
    extra = len(full) - len(layer)
    if extra <= 0:
        return None
    if full[extra:] == layer:
        return tuple(range(extra))
    if extra == 1:
        for axis in range(len(full)):
            if full[:axis] + full[axis + 1 :] == layer:
                return (axis,)
    return None


def _override_fn(init: Callable, shape, dtype, layer_shape) -> Callable:
    """``fn(key)`` drawing a leaf from a user initializer, one layer at a time if stacked."""
    if layer_shape is None:
        return lambda key: init(key, shape, dtype)
    axes = layer_axes(shape, layer_shape)
    counts = [shape[a] for a in axes]

    def fn(key):
        keys = jax.random.split(key, int(np.prod(counts))).reshape(*counts, *key.shape)
        def draw(k):
            return init(k, layer_shape, dtype)

        for _ in axes:
            draw = jax.vmap(draw)
        out = draw(keys)
        return jnp.moveaxis(out, tuple(range(len(axes))), axes)

    return fn


BOX_RETURNED = (
    "initializers: {label} returns a Flax {box} for {path!r}; an initializer must return "
    "the plain array. Return the value inside (`box.unbox()`), and give its sharding with "
    "`partition_rules=` (or keep the module's own `nn.with_partitioning` annotation)."
)


FACTORY_PASSED = (
    "initializers: {label} maps {path!r} to `{name}`, which returns a function, not an "
    "array: `{name}` makes initializers. Did you mean `{name}()`?"
)


def _factory_name(value: Callable, key, shape, dtype) -> str | None:
    """The name of ``value`` if it is an initializer factory (``xavier_uniform`` rather
    than ``xavier_uniform()``): called as an initializer, it returns a function."""
    for args in ((key, shape, dtype), ()):  # xavier_uniform(in_axis, ...), normal(stddev)
        try:
            out = value(*args)  # a factory stores its arguments, computes nothing
        except Exception:  # noqa: BLE001 - fails on these arguments: not a factory here
            continue
        if callable(out):
            return getattr(value, "__name__", repr(value))
    return None


def recognizes(value: Any) -> bool:
    """An initializer (any callable), or a Flax box given by mistake (an error in ``plan``)."""
    return callable(value) or paths.is_box(value)


def _layer_shape(query: kinds.Query) -> tuple[int, ...] | None:
    """One layer's shape, for a whole variable stacked by ``nn.scan``/``nn.vmap``."""
    rec, shape = query.record, tuple(query.shape)
    if rec is None or query.sub:
        return None
    layer_shape = tuple(np.shape(paths.unbox(rec.output)))
    if layer_shape == shape or layer_axes(shape, layer_shape) is None:
        return None
    return layer_shape


def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
    """The recipe of a leaf that an initializer ``query.rule.value`` draws: its program
    and its per-path key (``override_key``) in the override stream."""
    del memo
    rule, path, shape, dtype = query.rule, query.path, query.shape, query.dtype
    layer_shape, root_key = _layer_shape(query), query.root_key
    value = rule.value
    if paths.is_box(value):
        raise ValueError(BOX_RETURNED.format(label=rule.label, box=type(value).__name__,
                                             path=path))
    fn = _override_fn(value, shape, dtype, layer_shape)
    try:
        program = programs.trace(fn, root_key)
    except Exception as e:  # noqa: BLE001 - re-raised with the path that caused it
        factory = _factory_name(value, root_key, layer_shape or shape, dtype)
        if factory is not None:
            raise TypeError(FACTORY_PASSED.format(label=rule.label, path=path,
                                                  name=factory)) from e
        raise ValueError(
            f"initializers: {rule.label} failed for {path!r} ({kinds.fmt(shape, dtype)}"
            + (f", one layer {kinds.fmt(layer_shape, dtype)}" if layer_shape else "")
            + f"): {type(e).__name__}: {e}"
        ) from e
    if not own.is_plain(program):
        out = jax.tree_util.tree_unflatten(program.out_tree, program.jaxpr.out_avals)
        if paths.is_box(out):
            raise ValueError(BOX_RETURNED.format(label=rule.label, box=type(out).__name__,
                                                 path=path))
        raise ValueError(
            f"initializers: {rule.label} returns {type(out).__name__} {out!r} for {path!r}; "
            "an initializer must return one array."
        )
    if programs.leaked_tracers(program):
        raise ValueError(
            f"initializers: {rule.label} for {path!r} uses a value traced inside "
            "module.init (a leaked tracer); initializers must depend only on their key."
        )
    (got,) = program.jaxpr.out_avals
    kinds.check_abstract(path, got, shape, dtype, f"the initializer from {rule.label}")
    return kinds.Planned(program=program, key=override_key(path),
                         stream=query.traced.override_stream)


def describe(leaf: Any, found: kinds.Found) -> str:
    del leaf
    rule = found.rule
    return "override " + (naming.initializer_name(rule.value) if rule is not None else "?")


SOURCE = kinds.Source(kinds.INITIALIZER, recognizes, plan, describe, compiled.execute)
