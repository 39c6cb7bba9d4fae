"""The module's own initializer (``flax``): its recorded program, replayed alone.

A variable whose recipe is static (its key derives from a root key by static data, its
arguments are static, its value final) is recreated alone by the program recorded while
tracing (or, for one leaf of a larger variable value, by the initializer traced again
for that leaf). Values are identical to the framework's own init.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from flaxlazy._src import paths
from flaxlazy._src import programs


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


def program(rec: Any, sub: str, root_key: Any, shape, dtype):
    """The program of one leaf: the one recorded during the trace, or a fresh trace.

    A variable of one array (boxed or not) reuses the program traced while recording;
    a leaf inside a larger variable value is traced alone.
    """
    program = rec.program
    if program is not None and not sub and program.out_tree.num_leaves == 1:
        return program.as_single_output() if _makes(program, shape, dtype) else None
    return _replays_alone(_replay(rec, sub), root_key if rec.takes_key else None, shape, dtype)
