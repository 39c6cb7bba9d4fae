"""Executing a plan: each source creates its leaves, placed where the plan says.

The engine is framework-free: a plan from either entrance (Linen, NNX) is executed the
same way. It goes through ``sources.registry`` in order and hands each source the plan's
leaves of its kind (``Source.execute(plan, indices, context)``): compiled initializers
for the module's own and overriding initializers, placement for arrays, batched reads for
checkpoints, and one compiled, pruned run for the traced fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import registry


def execute(plan: plan_lib.Plan, rngs: Any, inputs: Sequence[Any]) -> Any:
    """Creates every leaf of ``plan`` and returns the variables tree.

    Args:
      plan: the plan (see ``plan.build``).
      rngs: the concrete (or traced) rngs of the call, as its entrance takes them
        (Linen: a key or a dict of keys; NNX: the stream root keys).
      inputs: the dynamic inputs of the call, concrete arrays or specs, in the order of
        ``plan.traced.call.inputs``.

    Returns:
      The variables tree, with Flax boxes around their arrays where the module has them.
    """
    context = kinds.Context(rngs, plan.traced.roots(rngs), list(inputs))
    values: list[Any] = [None] * len(plan.leaves)
    for source in registry.SOURCES:
        indices = [i for i, leaf in enumerate(plan.leaves) if leaf.source == source.kind]
        if indices:
            for i, value in source.execute(plan, indices, context).items():
                values[i] = value
    boxed = [
        box.replace_boxed(v) if paths.is_box(box) else v
        for box, v in zip(plan.abstract, values, strict=True)
    ]
    return jax.tree_util.tree_unflatten(plan.treedef, boxed)
