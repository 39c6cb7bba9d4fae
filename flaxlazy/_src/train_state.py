"""Train states: parameters and optax state created together, sharded alike.

The optimizer state is laid out from the parameters' placement: a state leaf that
mirrors a parameter (optax's ``mu``/``nu``/``trace``..., found by path suffix and shape)
gets that parameter's sharding, scalars (``count``) are replicated, and anything else
must be covered by a partition rule on its ``opt_state/...`` path. Nothing is silently
replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import abstract as abstract_lib
from flaxlazy._src import materialize as materialize_lib
from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib

PARAMS = "params"
OPT_STATE = "opt_state"

NO_MIRROR = (
    "optimizer state leaf {path!r} ({shape}) mirrors no parameter (no parameter path is a "
    "suffix of it with the same shape) and no partition rule matches it. Add a rule for "
    "it, e.g. ('opt_state/**', PartitionSpec()) to replicate such leaves."
)


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus the model's other collections.

    Attributes:
      step, apply_fn, params, tx, opt_state: as in Flax's ``TrainState`` (``params`` is
        the unboxed ``params`` collection).
      collections: the non-``params`` collections ``module.init`` created (e.g.
        ``{"batch_stats": ...}``), unboxed; empty for most models.
    """

    collections: Any = struct.field(default_factory=dict)


def _unbox(tree: Any) -> Any:
    return jax.tree.map(plan_lib.unbox, tree, is_leaf=paths.is_box)


def _split(variables: Any) -> tuple[Any, dict]:
    variables = _unbox(dict(variables))
    params = variables.pop(PARAMS, {})
    return params, variables


def _mirror(opt_path: str, shape, param_shapes: dict[str, Any]) -> str | None:
    """The longest parameter path that ``opt_path`` ends with, of the same shape."""
    best = None
    for path, param in param_shapes.items():
        if (opt_path == path or opt_path.endswith(paths.SEP + path)) and tuple(
            param.shape
        ) == tuple(shape):
            if best is None or len(path) > len(best):
                best = path
    return best


def _opt_shardings(
    abstract_opt: Any, abstract_params: Any, mesh: Any, partition_rules: Any
) -> Any:
    """A sharding per optimizer-state leaf (None everywhere without a mesh)."""
    flat, treedef = paths.flatten(abstract_opt)
    if mesh is None:
        return jax.tree_util.tree_unflatten(treedef, [None] * len(flat))
    params = dict(paths.flatten(abstract_params)[0])
    rules = rules_lib.normalize(partition_rules, what="partition_rules")
    out = []
    for path, leaf in flat:
        if leaf.ndim == 0:
            out.append(NamedSharding(mesh, PartitionSpec()))
            continue
        mirror = _mirror(path, leaf.shape, params)
        if mirror is not None:
            out.append(params[mirror].sharding)
            continue
        rule = next(
            (r for r in rules if r.regex.fullmatch(f"{OPT_STATE}/{path}")), None
        )
        if rule is None:
            raise ValueError(NO_MIRROR.format(path=f"{OPT_STATE}/{path}", shape=leaf.shape))
        out.append(NamedSharding(mesh, rule.value))
    return jax.tree_util.tree_unflatten(treedef, out)


def _with_sharding(leaf: jax.ShapeDtypeStruct, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def abstract_train_state(
    module: nn.Module,
    tx: optax.GradientTransformation,
    rngs: Any,
    *inputs: Any,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    **kwargs: Any,
) -> TrainState:
    """The train state ``init_train_state`` would create, as sharded shapes only.

    Nothing is computed or allocated. Use it for memory planning
    (``flaxlazy.summary(state)`` reports parameter and optimizer bytes per device) and as
    the target when restoring a checkpointed train state.

    Args:
      module: a Flax Linen module.
      tx: an optax ``GradientTransformation``.
      rngs: a key or a dict of keys, as for ``module.init``.
      *inputs: input arrays, specs or Python values, as for ``abstract_init``.
      mesh: optional mesh; with it every leaf carries its ``NamedSharding``.
      partition_rules: as in ``materialize``; rules whose pattern starts with
        ``opt_state/`` place optimizer-state leaves that mirror no parameter.
      logical_axis_rules: as in ``materialize``.
      **kwargs: keyword inputs for the module.

    Returns:
      A ``flaxlazy.TrainState`` whose array leaves are ``jax.ShapeDtypeStruct``s.

    Examples:
      >>> import jax, optax, flax.linen as nn, flaxlazy
      >>> state = flaxlazy.abstract_train_state(
      ...     nn.Dense(3), optax.adam(1e-3), jax.random.key(0), flaxlazy.spec("f32[2,5]"))
      >>> state.opt_state[0].mu["kernel"]
      ShapeDtypeStruct(shape=(5, 3), dtype=float32)
    """
    variables = abstract_lib.abstract_init(
        module, rngs, *inputs, mesh=mesh, partition_rules=_variable_rules(partition_rules),
        logical_axis_rules=logical_axis_rules, **kwargs,
    )
    params, collections = _split(variables)
    opt = jax.eval_shape(tx.init, params)
    opt = jax.tree.map(_with_sharding, opt, _opt_shardings(opt, params, mesh, partition_rules))
    step_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=step_sharding),
        apply_fn=module.apply, params=params, tx=tx, opt_state=opt, collections=collections,
    )


def _variable_rules(partition_rules: Any) -> Any:
    """The partition rules for the variables: all but the ``opt_state/...`` ones."""
    if partition_rules is None:
        return None
    items = partition_rules.items() if isinstance(partition_rules, Mapping) else partition_rules
    return [
        (pattern, spec) for pattern, spec in items
        if not (isinstance(pattern, str) and pattern.startswith(OPT_STATE + paths.SEP))
    ]


def init_train_state(
    module: nn.Module,
    tx: optax.GradientTransformation,
    rngs: Any,
    *inputs: Any,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    initializers: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> TrainState:
    """Creates parameters and optimizer state in one step, directly in their shards.

    The parameters come from ``flaxlazy.materialize`` (same values as ``module.init``
    unless ``initializers`` overrides them, e.g. with ``flaxlazy.from_checkpoint``);
    ``tx.init`` then runs compiled with every optimizer-state leaf placed like the
    parameter it mirrors (scalars replicated), so no device ever holds a full copy of a
    sharded parameter or moment.

    Args:
      module: a Flax Linen module.
      tx: an optax ``GradientTransformation`` (``adamw``, ``chain``, ``multi_transform``,
        ``masked``... all work).
      rngs: a key or a dict of keys, as for ``module.init``.
      *inputs: input arrays, specs or Python values.
      mesh: optional mesh; see ``materialize``.
      partition_rules: as in ``materialize``, plus ``opt_state/...`` rules for optimizer
        leaves that mirror no parameter.
      logical_axis_rules: as in ``materialize``.
      initializers: the initializer tree, as in ``materialize``.
      device: without a mesh, the device to create everything on.
      **kwargs: keyword inputs for the module.

    Returns:
      A ``flaxlazy.TrainState`` (a ``flax.training.train_state.TrainState`` with the
      model's other collections in ``collections``), ``step`` 0.

    Examples:
      >>> import jax, optax, flax.linen as nn, flaxlazy
      >>> state = flaxlazy.init_train_state(
      ...     nn.Dense(3), optax.adam(1e-3), jax.random.key(0), flaxlazy.spec("f32[2,5]"))
      >>> int(state.step), state.params["kernel"].shape
      (0, (5, 3))
    """
    abstract = abstract_train_state(
        module, tx, rngs, *inputs, mesh=mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, **kwargs,
    )
    variables = materialize_lib.materialize(
        module, rngs, *inputs, initializers=initializers, device=device, mesh=mesh,
        partition_rules=_variable_rules(partition_rules),
        logical_axis_rules=logical_axis_rules, **kwargs,
    )
    params, collections = _split(variables)
    opt_shardings = jax.tree.map(lambda s: s.sharding, abstract.opt_state)
    opt_state = _compiled_init(tx, opt_shardings)(params)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), abstract.step.sharding)
        if mesh is not None else jnp.zeros((), jnp.int32),
        apply_fn=module.apply, params=params, tx=tx, opt_state=opt_state,
        collections=collections,
    )


def _compiled_init(tx: optax.GradientTransformation, shardings: Any) -> Callable:
    has_sharding = any(s is not None for s in jax.tree.leaves(shardings))
    return jax.jit(tx.init, out_shardings=shardings if has_sharding else None)
