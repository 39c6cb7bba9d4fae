"""The module's own initializer (``flax``): its recorded program, replayed alone.

A variable whose recipe is static (its key derives from a root key by static data, its
arguments are static, its value final) is recreated alone by the program recorded while
tracing (or, for one leaf of a larger variable value, by the initializer traced again
for that leaf). Values are identical to the framework's own init.

A variable stacked by ``nn.scan``/``nn.vmap`` (``Record.layers``) is one layer's program
mapped over the layers' keys when the key is split per layer, or one layer's value
broadcast when every layer holds the same value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flaxlazy._src import naming
from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src.draw import keys as keys_lib
from flaxlazy._src.sources import compiled
from flaxlazy._src.sources import kinds


def _select(tree: Any, sub: str) -> Any:
    if not sub:
        return paths.unbox(tree)
    flat, _ = paths.flatten(tree)
    return paths.unbox(dict(flat)[sub])


def _replay(rec: Any, sub: str) -> Callable:
    """``fn(key)`` recreating one leaf of a recorded variable (``fn()`` without a key)."""
    init_fn, args, kwargs = rec.init_fn, rec.init_args, rec.init_kwargs
    if rec.takes_key:
        return lambda key: _select(init_fn(key, *args, **kwargs), sub)
    return lambda: _select(init_fn(*args, **kwargs), sub)


def _replays_alone(fn: Callable, key_spec: Any, shape, dtype) -> programs.Program | None:
    """``fn`` traced alone, if it traces on its own (no leaked tracers, no scope access).

    An initializer can close over values of the traced forward pass (data-dependent init)
    or call back into its module; such a leaf is left to the traced run (None).
    """
    try:
        program = programs.trace(fn, *([] if key_spec is None else [key_spec]))
    except Exception:  # noqa: BLE001 - any failure means "not replayable alone"
        return None
    return program if is_plain(program) and _makes(program, shape, dtype) else None


_PLAIN = jax.tree_util.tree_structure(0)


def is_plain(program: programs.Program) -> bool:
    return program.out_tree == _PLAIN


def _makes(program: programs.Program, shape, dtype) -> bool:
    """Whether a one-output program makes exactly this leaf, from its key alone.

    A tracer of the finished abstract trace shows up as a constant: data-dependent.
    """
    (out,) = program.jaxpr.out_avals
    return not programs.leaked_tracers(program) and (
        (tuple(out.shape), out.dtype) == (tuple(shape), dtype)
    )


class Own(NamedTuple):
    """How a leaf is replayed from its module's own initializer.

    Attributes:
      program: the whole leaf: ``fn(key)``, ``fn()`` without a key, or, with ``layers``,
        ``fn(keys)`` of the layers' keys (shape ``layers`` + the root key's).
      layers: the sizes of the leading axes whose every row has a key of its own, split
        from the key above it (``nn.scan``/``nn.vmap``); ``()`` otherwise.
      layer: with ``layers``, one layer's ``fn(key)``.
    """

    program: programs.Program
    layers: tuple[int, ...] = ()
    layer: programs.Program | None = None


def _one_layer(rec: Any, sub: str, key_spec: Any, shape, dtype) -> programs.Program | None:
    program = rec.program
    if program is not None and not sub and program.out_tree.num_leaves == 1:
        return program.as_single_output() if _makes(program, shape, dtype) else None
    return _replays_alone(_replay(rec, sub), key_spec, shape, dtype)


def program(rec: Any, sub: str, root_key: Any, shape, dtype) -> Own | None:
    """How one leaf is replayed: the program recorded during the trace, or a fresh trace.

    A variable of one array (boxed or not) reuses the program traced while recording;
    a leaf inside a larger variable value is traced alone. A stacked leaf maps (or
    broadcasts) one layer's program over its layers.
    """
    layers, shape = tuple(rec.layers), tuple(shape)
    key_spec = root_key if rec.takes_key else None
    if shape[:len(layers)] != layers:
        return None
    one = _one_layer(rec, sub, key_spec, shape[len(layers):], dtype)
    if one is None or not layers:
        return None if one is None else Own(one)
    run, runtime = programs.runner(one), one.runtime_consts
    if rec.split:
        spec = jax.ShapeDtypeStruct(layers + tuple(key_spec.shape), key_spec.dtype)
        stacked = programs.trace(keys_lib.mapped(lambda k: run(runtime, k), len(layers)), spec)
        return Own(stacked, layers, one)
    same = programs.trace(lambda *k: jnp.broadcast_to(run(runtime, *k), shape),
                          *([] if key_spec is None else [key_spec]))
    return Own(same)


def recognizes(value: Any) -> bool:
    """A leaf no override names (or one a rule leaves to the module: value None)."""
    return value is None


def plan(query: kinds.Query, memo: dict) -> kinds.Planned | None:
    """The recipe of a leaf replayed from its module's own initializer, or None when its
    recipe is not static (the ``traced`` source makes it)."""
    del memo
    rec = query.record
    if rec is None or not rec.replayable:
        return None
    replay = program(rec, query.sub, query.root_key, query.shape, query.dtype)
    if replay is None:
        return None
    return kinds.Planned(program=replay.program, key=rec.fold, stream=rec.stream,
                         layers=replay.layers, layer=replay.layer)


def describe(leaf: Any, found: kinds.Found) -> str:
    """The module's initializer by name (NNX: read off the constructor's program)."""
    del leaf
    rec = found.record
    if rec is None:
        return "module"
    if getattr(rec, "init_fn", None) is None:  # NNX: a slice of the constructor
        return naming.program_name(rec)
    return naming.initializer_name(rec.init_fn)


SOURCE = kinds.Source(kinds.FLAX, recognizes, plan, describe, compiled.execute)
