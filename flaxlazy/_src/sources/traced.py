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
from flaxlazy._src import programs
from flaxlazy._src import specs
from flaxlazy._src.sources import compiled as compiled_lib
from flaxlazy._src.sources import kinds

DATA_DEPENDENT = (
    "{paths} depend{s} on the values of input(s) {inputs}, which were given as specs "
    "(shape and dtype only). Pass concrete arrays for those inputs so that data-dependent "
    "initialization sees real data."
)


def _dependency_error(call, names, used_inputs, n_rng, concrete) -> str | None:
    spec_inputs = [
        i for i, used in enumerate(used_inputs[n_rng:]) if used and not concrete[i]
    ]
    if not spec_inputs:
        return None
    return DATA_DEPENDENT.format(
        paths=", ".join(repr(n) for n in names),
        s="s" if len(names) == 1 else "",
        inputs=", ".join(f"#{i} {specs.to_spec(call.inputs[i])}" for i in spec_inputs),
    )


def _traced_runner(plan: Any, leaves: Sequence[Any], concrete: tuple):
    """A compiled ``(rngs, concrete_inputs) -> [values]`` for the traced leaves.

    ``module.init`` is traced to a jaxpr at every call and pruned to the wanted leaves;
    the compiled function is cached by that pruned program (constants are passed as
    arguments), so a changed module, closure or global is never served stale code.
    """
    call = plan.traced.call
    names = tuple(leaf.path for leaf in leaves)
    shardings = tuple(leaf.sharding for leaf in leaves)
    closed = plan.traced.fallback_jaxpr(list(names))
    jaxpr = _compat.convert_constvars_jaxpr(closed.jaxpr)
    n_const = len(closed.consts)
    n_rng = plan.traced.n_rng
    pruned, used = _compat.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    used_consts, used_inputs = used[:n_const], used[n_const:]
    if _dependency_error(call, names, used_inputs, n_rng, concrete):
        # Name exactly the leaves that depend on spec inputs.
        bad = [
            n for i, n in enumerate(names)
            if _dependency_error(
                call, [n],
                _compat.dce_jaxpr(jaxpr, [j == i for j in range(len(names))])[1][n_const:],
                n_rng, concrete,
            )
        ]
        raise ValueError(_dependency_error(call, bad, used_inputs, n_rng, concrete))
    consts = [c for c, u in zip(closed.consts, used_consts, strict=True) if u]
    if any(isinstance(c, jax.core.Tracer) for c in consts):
        program_key = None  # materialize inside a trace: nothing to reuse
    else:
        program_key = programs.jaxpr_key(pruned)
    key = None if program_key is None else ("traced", program_key, shardings)

    def make():
        return jax.jit(
            lambda *args: _compat.eval_jaxpr(pruned, [], *args),
            out_shardings=list(shardings) if any(s is not None for s in shardings) else None,
        )

    compiled = compiled_lib._COMPILED.get(key, make, nbytes=compiled_lib._EXECUTABLE_BYTES)

    def runner(rngs, dyn):
        flat_in = plan.traced.rng_leaves(rngs) + list(dyn)
        args = [x for x, u in zip(flat_in, used_inputs, strict=True) if u]
        return compiled(*consts, *args)

    return runner


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """All traced leaves from one compiled run."""
    inputs = context.inputs
    concrete = tuple(not isinstance(x, jax.ShapeDtypeStruct) for x in inputs)
    runner = _traced_runner(plan, [plan.leaves[i] for i in indices], concrete)
    dyn = [x if c else None for x, c in zip(inputs, concrete, strict=True)]
    return dict(zip(indices, runner(context.rngs, dyn), strict=True))
