"""Linen train state: the abstract optax state a ``flaxlazy.TrainState`` holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from flaxlazy._src import paths


def split(variables: Any) -> tuple[Any, dict]:
    """``(params, other collections)`` of a variables tree, Flax boxes removed: what a
    ``flaxlazy.TrainState`` holds as ``params`` and ``collections``."""
    variables = jax.tree.map(paths.unbox, dict(variables), is_leaf=paths.is_box)
    params = variables.pop(paths.PARAMS, {})
    return params, variables


def abstract_state(variables: Any, tx: optax.GradientTransformation,
                   values: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(opt_state, params, step)``, abstract, as Linen's ``init_train_state`` makes them:
    ``tx.init`` of the unboxed ``params`` collection.

    Args:
      variables: the traced variables tree (its structure; boxes are leaves).
      tx: the optax transformation.
      values: ``{path: jax.ShapeDtypeStruct}``, each leaf of ``variables`` as the train
        state holds it (a cast dtype, a sharding).

    Examples:
      >>> import jax, optax
      >>> leaf = jax.ShapeDtypeStruct((2,), "float32")
      >>> opt, params, step = abstract_state(
      ...     {"params": {"b": leaf}}, optax.sgd(0.1, momentum=0.9), {"params/b": leaf})
      >>> opt[0].trace["b"], step
      (ShapeDtypeStruct(shape=(2,), dtype=float32), ShapeDtypeStruct(shape=(), dtype=int32))
    """
    flat, treedef = paths.flatten(variables)
    params, _ = split(jax.tree_util.tree_unflatten(treedef, [values[p] for p, _ in flat]))
    return (jax.eval_shape(tx.init, params), params,
            jax.ShapeDtypeStruct((), np.dtype(np.int32)))
