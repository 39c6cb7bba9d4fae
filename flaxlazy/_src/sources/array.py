"""Arrays given in ``initializers=``: used as they are, placed where the plan says."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src.sources import kinds


def accepts(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
    """The recipe of a leaf given as an array: the array itself, checked."""
    del memo
    rule = query.rule
    kinds.check_abstract(query.path, rule.value, query.shape, query.dtype,
                         f"the array from {rule.label}")
    return kinds.Planned(value=rule.value)


def place(value: Any, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.device_put(value, sharding)


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Each array where the plan places it; unplaced, where every other leaf goes (the
    device the keys are committed to: ``Context.home``)."""
    default = context.home()
    return {i: place(plan.leaves[i].value, plan.leaves[i].sharding or default)
            for i in indices}


def describe(leaf: Any, found: kinds.Found) -> str:
    del leaf, found
    return kinds.ARRAY


SOURCE = kinds.Source(kinds.ARRAY, accepts, plan, describe, execute)
