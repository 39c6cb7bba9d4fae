"""Linen train state: a ``flaxlazy.TrainState``, the optax state beside the parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from flaxlazy._src import paths


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus the model's other collections.

    Attributes:
      step, apply_fn, params, tx, opt_state: as in Flax's ``TrainState`` (``params`` is
        the unboxed ``params`` collection).
      collections: the non-``params`` collections ``module.init`` created (e.g.
        ``{"batch_stats": ...}``), unboxed; empty for most models.
    """

    collections: Any = struct.field(default_factory=dict)


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


def assemble(module: Any, variables: Any, tx: optax.GradientTransformation, opt_state: Any,
             step: jax.ShapeDtypeStruct, *, abstract: bool, placed: bool) -> TrainState:
    """The ``flaxlazy.TrainState`` of ``module`` for its ``variables``.

    Args:
      module: the Linen module (its ``apply`` is the state's ``apply_fn``).
      variables: the variables tree, abstract or real.
      tx: the optax transformation.
      opt_state: the abstract optimizer state (``abstract_state``), each leaf carrying
        its sharding when ``placed``.
      step: the abstract step, likewise.
      abstract: whether to return the abstract state (``opt_state`` and ``step`` as
        given); otherwise ``tx.init`` runs compiled, each leaf created in its sharding.
      placed: whether the leaves carry the shardings to create them in (a mesh).

    Examples:
      >>> import jax, optax, flax.linen as nn
      >>> model, tx = nn.Dense(2), optax.sgd(0.1)
      >>> variables = {"params": {"bias": jax.numpy.zeros(2)}}
      >>> opt, _, step = abstract_state(variables, tx, {"params/bias": variables["params"]["bias"]})
      >>> state = assemble(model, variables, tx, opt, step, abstract=False, placed=False)
      >>> int(state.step), state.params["bias"].shape
      (0, (2,))
    """
    params, collections = split(variables)
    if not abstract:
        shardings = jax.tree.map(lambda leaf: leaf.sharding, opt_state) if placed else None
        opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
        zero = jnp.zeros((), step.dtype)
        step = jax.device_put(zero, step.sharding) if placed else zero
    return TrainState(step=step, apply_fn=module.apply, params=params, tx=tx,
                      opt_state=opt_state, collections=collections)
