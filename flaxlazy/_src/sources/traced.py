"""The traced fallback (``traced`` leaves): one compiled, pruned run of the whole init.

What has no static recipe (lifted transforms whose keys are split per layer,
data-dependent init, initializers fed traced values) comes from one compiled run of the
entrance's whole init (Linen ``module.init``; an NNX constructor) returning only these
leaves. Its jaxpr is pruned to what those leaves need (dead-code elimination drops the
forward pass), which also tells whether any of them depends on an input given only as a
spec: that is an error, not a silent init from zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib
from flaxlazy._src import compile_context
from flaxlazy._src import programs
from flaxlazy._src import specs
from flaxlazy._src.sources import kinds

DATA_DEPENDENT = (
    "{paths} depend{s} on the values of input(s) {inputs}, which were given as specs "
    "(shape and dtype only). Pass concrete arrays for those inputs so that data-dependent "
    "initialization sees real data."
)


def _dependency_error(inputs, names, used_inputs, n_rng, concrete) -> str | None:
    spec_inputs = [
        i for i, used in enumerate(used_inputs[n_rng:]) if used and not concrete[i]
    ]
    if not spec_inputs:
        return None
    return DATA_DEPENDENT.format(
        paths=", ".join(repr(n) for n in names),
        s="s" if len(names) == 1 else "",
        inputs=", ".join(f"#{i} {specs.to_spec(inputs[i])}" for i in spec_inputs),
    )


def pruned_runner(closed: Any, names: Sequence[str], shardings: Sequence[Any], n_rng: int,
                  inputs: Sequence[Any], concrete: tuple):
    """A compiled ``(rng_leaves, dyn) -> [values]`` for the outputs of a traced jaxpr.

    The jaxpr (inputs: ``n_rng`` rng leaves, then the call's dynamic ``inputs``; outputs:
    the values ``names``) is pruned to what its outputs need; an output that needs an
    input given only as a spec (``concrete`` False) is a ``ValueError`` naming it. The
    compiled function is cached by the pruned program (constants are passed as
    arguments), so a changed module, closure or global is never served stale code.
    """
    names, shardings = tuple(names), tuple(shardings)
    jaxpr = _compat.convert_constvars_jaxpr(closed.jaxpr)
    n_const = len(closed.consts)
    pruned, used = _compat.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    used_consts, used_inputs = used[:n_const], used[n_const:]
    if _dependency_error(inputs, names, used_inputs, n_rng, concrete):
        # Name exactly the outputs that depend on spec inputs.
        bad = [
            n for i, n in enumerate(names)
            if _dependency_error(
                inputs, [n],
                _compat.dce_jaxpr(jaxpr, [j == i for j in range(len(names))])[1][n_const:],
                n_rng, concrete,
            )
        ]
        raise ValueError(_dependency_error(inputs, bad, used_inputs, n_rng, concrete))
    consts = [c for c, u in zip(closed.consts, used_consts, strict=True) if u]
    if any(isinstance(c, jax.core.Tracer) for c in consts):
        program_key = None  # materialize inside a trace: nothing to reuse
    else:
        program_key = programs.jaxpr_key(pruned)
    key = (None if program_key is None
           else ("traced", program_key, shardings, compile_context.key()))

    def make():
        return jax.jit(
            lambda *args: _compat.eval_jaxpr(pruned, [], *args),
            out_shardings=list(shardings) if any(s is not None for s in shardings) else None,
        )

    compiled = cache_lib.EXECUTABLES.get(key, make, nbytes=cache_lib.EXECUTABLE_BYTES)

    def runner(rng_leaves, dyn):
        flat_in = list(rng_leaves) + list(dyn)
        args = [x for x, u in zip(flat_in, used_inputs, strict=True) if u]
        return compiled(*consts, *args)

    return runner


def concrete_inputs(inputs: Sequence[Any]) -> tuple[tuple, list]:
    """``(concrete, dyn)``: which inputs are arrays, and the inputs with specs as None."""
    concrete = tuple(not isinstance(x, jax.ShapeDtypeStruct) for x in inputs)
    return concrete, [x if c else None for x, c in zip(inputs, concrete, strict=True)]


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """All traced leaves from one compiled run of the entrance's whole init, pruned."""
    traced = plan.traced
    names = [plan.leaves[i].path for i in indices]
    concrete, dyn = concrete_inputs(context.inputs)
    runner = pruned_runner(
        traced.fallback_jaxpr(names), names, [plan.leaves[i].sharding for i in indices],
        traced.n_rng, traced.call.inputs, concrete,
    )
    return dict(zip(indices, runner(traced.rng_leaves(context.rngs), dyn), strict=True))


def recognizes(value: Any) -> bool:
    """A leaf no override names: the fallback when its own recipe is not static."""
    return value is None


def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
    """Every leaf is plannable here: its value comes from the whole traced run."""
    del query, memo
    return kinds.Planned()


def describe(leaf: Any, found: kinds.Found) -> str:
    del leaf, found
    return kinds.TRACED


SOURCE = kinds.Source(kinds.TRACED, recognizes, plan, describe, execute)
