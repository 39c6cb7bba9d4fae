"""Executing a plan: compiled once per signature, placed where the plan says.

Two kinds of work, one mechanism:

* Leaves with a static recipe (``"flax"`` and ``"initializer"`` sources) each run a small
  jit-compiled initializer, cached by its *program* (what it computes for this leaf:
  its jaxpr, literal and small constant values; see ``programs``) and the leaf's
  sharding, so a 48-layer model compiles about as many functions as a 2-layer one, and
  an initializer that computes anything else is never served another's code. Each folds
  its leaf's static hash into the root ``params`` key inside that compiled function,
  exactly as Flax derives the key.
* The rest (``"traced"``: lifted transforms, data-dependent init) come from one compiled
  run of ``module.init`` that returns only those leaves. Its jaxpr is pruned to what
  those leaves need (dead-code elimination drops the forward pass), which also tells
  whether any of them depends on an input given only as a spec: that is an error, not a
  silent init from zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib
from flaxlazy._src import checkpoint
from flaxlazy._src import chunked
from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import programs
from flaxlazy._src import specs

# A jit-compiled CPU initializer with its wrapper holds about 2-3 MiB (measured: 100
# distinct lecun_normal draws kept alive add 3.0 MiB each); the byte bound counts this
# per entry, plus the constants baked into it.
_EXECUTABLE_BYTES = 5 << 19  # 2.5 MiB

# Compiled functions by program and placement; bounded by count and estimated bytes
# (about 100 initializers: far more signatures than one model has).
_COMPILED = cache_lib.LRU(256, max_bytes=256 << 20)

DATA_DEPENDENT = (
    "{paths} depend{s} on the values of input(s) {inputs}, which were given as specs "
    "(shape and dtype only). Pass concrete arrays for those inputs so that data-dependent "
    "initialization sees real data."
)


def _single_device(sharding: Any) -> bool:
    return sharding is None or len(sharding.device_set) == 1


def _leaf_fn(leaf: plan_lib.Leaf):
    """The compiled ``g(root, hash, consts)``: the leaf's program on ``fold_in(root, hash)``.

    The leaf's key is derived inside its own compiled function, so the compiled code
    depends on the program alone, never on how many leaves the model has. Large random
    leaves are drawn in chunks.
    """
    program = leaf.program

    def make():
        draw = None
        if (
            leaf.key is not None
            and math.prod(leaf.shape) > chunked.MIN_ELEMENTS
            and _single_device(leaf.sharding)
            and _compat.chunking_ok()
        ):
            try:
                draw = chunked.chunked_jaxpr(program.jaxpr, leaf.shape, leaf.dtype)
            except chunked.NotChunkable:
                pass
        run = programs.runner(program, draw)

        def keyed(root, key_hash, runtime):
            if key_hash is None:
                return run(runtime)
            return run(runtime, jax.random.fold_in(root, key_hash))

        return jax.jit(keyed, out_shardings=leaf.sharding)

    return _COMPILED.get(compile_key(leaf), make,
                         nbytes=_cost(program.jaxpr.consts, program.baked))


def compile_key(leaf: plan_lib.Leaf) -> Any:
    """The compiled-function cache key of a ``"flax"``/``"initializer"`` leaf (None: never
    cached): its program, its placement, and the PRNG configuration of the moment (the
    chunked draw is chosen for it)."""
    if leaf.program.key is None:
        return None
    config = (jax.config.jax_threefry_partitionable, jax.config.jax_enable_x64)
    return ("leaf", leaf.program.key, leaf.sharding, config)


def _cost(consts: Sequence[Any], baked: Sequence[bool]) -> int:
    """Estimated bytes a compiled function holds: executable overhead + baked constants."""
    return _EXECUTABLE_BYTES + sum(
        np.asarray(c).nbytes for c, b in zip(consts, baked, strict=True) if b
    )


def _place(value: Any, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.device_put(value, sharding)


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


def _traced_runner(plan: plan_lib.Plan, leaves: Sequence[plan_lib.Leaf], concrete: tuple):
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

    compiled = _COMPILED.get(key, make, nbytes=_EXECUTABLE_BYTES)

    def runner(rngs, dyn):
        flat_in = plan.traced.rng_leaves(rngs) + list(dyn)
        args = [x for x, u in zip(flat_in, used_inputs, strict=True) if u]
        return compiled(*consts, *args)

    return runner


def execute(plan: plan_lib.Plan, rngs: Any, inputs: Sequence[Any]) -> Any:
    """Creates every leaf of ``plan`` and returns the variables tree.

    Args:
      plan: the plan (see ``plan.build``).
      rngs: the concrete (or traced) rngs of the init call.
      inputs: the dynamic inputs of the call, concrete arrays or specs, in the order of
        ``plan.traced.call.inputs``.

    Returns:
      The variables tree, with Flax boxes around their arrays where the module has them.
    """
    roots = plan.traced.roots(rngs)
    values: list[Any] = [None] * len(plan.leaves)
    traced = []
    reads: dict[str, dict[str, tuple[int, jax.ShapeDtypeStruct]]] = {}
    for i, leaf in enumerate(plan.leaves):
        if leaf.source == plan_lib.ARRAY:
            values[i] = _place(leaf.value, leaf.sharding)
        elif leaf.source == plan_lib.CHECKPOINT:
            source, entry = leaf.value
            target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            reads.setdefault(source.path, {})[entry] = (i, target)
        elif leaf.source == plan_lib.TRACED:
            traced.append(i)
        else:
            key_hash = None if leaf.key is None else np.uint32(leaf.key)
            values[i] = _leaf_fn(leaf)(
                roots[leaf.stream] if key_hash is not None else None, key_hash,
                leaf.program.runtime_consts,
            )
    for path, wanted in reads.items():
        arrays = checkpoint.read(path, {entry: target for entry, (_, target) in wanted.items()})
        for entry, (i, _) in wanted.items():
            values[i] = arrays[entry]
    if traced:
        concrete = tuple(not isinstance(x, jax.ShapeDtypeStruct) for x in inputs)
        runner = _traced_runner(plan, [plan.leaves[i] for i in traced], concrete)
        dyn = [x if c else None for x, c in zip(inputs, concrete, strict=True)]
        for i, value in zip(traced, runner(rngs, dyn), strict=True):
            values[i] = value
    boxed = [
        box.replace_boxed(v) if paths.is_box(box) else v
        for box, v in zip(plan.abstract, values, strict=True)
    ]
    return jax.tree_util.tree_unflatten(plan.treedef, boxed)
