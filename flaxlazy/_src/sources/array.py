"""Arrays given in ``initializers=``: used as they are, placed where the plan says."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import rules as rules_lib
from flaxlazy._src.sources import kinds


def accepts(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def plan(rule: rules_lib.Rule, path: str, shape, dtype) -> tuple[str, None, Any, None]:
    """(source, program, value, key) of a leaf given as an array."""
    kinds.check_abstract(path, rule.value, shape, dtype, f"the array from {rule.label}")
    return kinds.ARRAY, None, rule.value, None


def place(value: Any, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.device_put(value, sharding)


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    del context
    return {i: place(plan.leaves[i].value, plan.leaves[i].sharding) for i in indices}
