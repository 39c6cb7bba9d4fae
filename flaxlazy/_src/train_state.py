"""Train states: parameters and optax state created together, sharded alike.

The optimizer state is laid out from the parameters' placement, through the same rule
engine and the same checks as the parameters: a state leaf that mirrors a parameter
(optax's ``mu``/``nu``/``trace``..., found by path suffix and shape) gets that
parameter's sharding, scalars (``count``) are replicated, and any other leaf is placed by
the first partition rule matching its ``opt_state/...`` path (globs, regexes or a nested
``{"opt_state": ...}`` dict, as for parameters). A leaf nothing covers is an error when
rules are required (``require_rules``, by default when ``partition_rules`` are given),
and replicated otherwise, like an unannotated parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import abstract as abstract_lib
from flaxlazy._src import engine
from flaxlazy._src import entrances
from flaxlazy._src import materialize as materialize_lib
from flaxlazy._src import paths
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import sharding_checks
from flaxlazy._src import summary as summary_lib
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.linen import optimizer as linen_optimizer
from flaxlazy._src.nnx import optimizer as nnx_optimizer

PARAMS = paths.PARAMS
OPT_STATE = "opt_state"
WHAT = sharding_lib.WHAT

NO_MIRROR = (
    "`partition_rules`: optimizer state {leaves} {listing} mirror{s} no parameter (no "
    "parameter path is a suffix of {it} with the same shape) and no partition rule matches "
    "{it}. Add a rule, e.g. ('opt_state/**', PartitionSpec()) to replicate such leaves, or "
    "pass `require_rules=False` to replicate every leaf no rule covers."
)
OPT_RULE_HINT = (
    " Optimizer-state leaves that mirror no parameter are matched by the same rules as "
    "the parameters, on their 'opt_state/...' path; put a rule for them first, e.g. "
    "('opt_state/**', PartitionSpec())."
)
NOT_A_TX = (
    "{fn}: `tx` must be an optax.GradientTransformation such as optax.adamw(1e-3), got "
    "{got}.{hint}"
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


def check_tx(tx: Any, *, fn: str) -> None:
    """Raises a ``TypeError`` naming ``tx`` unless it is an optax ``GradientTransformation``.

    Examples:
      >>> import optax
      >>> check_tx(optax.adam, fn="init_train_state")
      Traceback (most recent call last):
      ...
      TypeError: init_train_state: `tx` must be an optax.GradientTransformation such as
      optax.adamw(1e-3), got function adam. Call it to build the transformation, e.g.
      optax.adam(1e-3).
    """
    if isinstance(tx, optax.GradientTransformation):
        return
    hint = ""
    if callable(tx) and getattr(tx, "__module__", "").startswith("optax"):
        got = f"{type(tx).__name__} {tx.__name__}"
        hint = f" Call it to build the transformation, e.g. optax.{tx.__name__}(1e-3)."
    else:
        text = repr(tx)
        got = f"{type(tx).__name__} {text}" if len(text) < 60 else type(tx).__name__
        if isinstance(tx, str):
            hint = f" Build it instead of naming it, e.g. optax.{tx}(1e-3)."
    raise TypeError(NOT_A_TX.format(fn=fn, got=got, hint=hint))


class _Layout:
    """Where every leaf of a train state goes: variables, then optimizer state."""

    def __init__(self, mesh, partition_rules, logical_axis_rules, allow_unused_rules,
                 require_rules):
        self.mesh = mesh
        self.logical_axis_rules = logical_axis_rules
        self.allow_unused = allow_unused_rules
        self.require = sharding_lib.strict(require_rules, partition_rules)
        self.given = partition_rules is not None
        self.rules = rules_lib.normalize(partition_rules, what=WHAT)

    def check_unused(self, names: list[str]) -> None:
        """Every rule must match a variable or an optimizer-state leaf (unless allowed)."""
        rules_lib.assign(
            self.rules, names, what=f"`{WHAT}`", allow_unused=self.allow_unused,
            qualified=True,
        )

    def variables(self, variables: Any) -> Any:
        """The tree of ``NamedSharding``s for the variables (boxes replaced)."""
        choices = sharding_lib.choose(
            variables, self.mesh, partition_rules=self.rules if self.given else None,
            logical_axis_rules=self.logical_axis_rules, allow_unused_rules=True,
            require_rules=self.require,
        )
        flat, treedef = paths.flatten(variables)
        return jax.tree_util.tree_unflatten(
            treedef, [NamedSharding(self.mesh, choices[path].spec) for path, _ in flat]
        )

    def opt_state(self, abstract_opt: Any, abstract_params: Any) -> Any:
        """A sharding per optimizer-state leaf (see the module docstring)."""
        flat, treedef = paths.flatten(abstract_opt)
        params = dict(paths.flatten(abstract_params)[0])
        out, missing = [], []
        for inner, leaf in flat:
            path = f"{OPT_STATE}{paths.SEP}{inner}"
            spec = self._opt_spec(path, inner, leaf, params)
            if spec is None:
                missing.append(inner)
            out.append(spec)
        if missing:
            leaves = dict(flat)
            listing = ", ".join(
                f"{OPT_STATE + paths.SEP + p!r} "
                f"({sharding_checks._fmt(leaves[p].shape, leaves[p].dtype)})"
                for p in missing[:5]
            )
            if len(missing) > 5:
                listing += f" and {len(missing) - 5} more"
            one = len(missing) == 1
            raise ValueError(NO_MIRROR.format(
                leaves="leaf" if one else "leaves", listing=listing, s="s" if one else "",
                it="it" if one else "them",
            ))
        return jax.tree_util.tree_unflatten(treedef, out)

    def _opt_spec(self, path: str, inner: str, leaf: Any, params: dict) -> Any:
        if leaf.ndim == 0:
            return NamedSharding(self.mesh, PartitionSpec())
        mirror = _mirror(inner, leaf.shape, params)
        if mirror is not None:
            return params[mirror].sharding
        for rule in self.rules:
            if rule.value is not None and rule.matches(path, path):
                try:
                    sharding_lib.check_spec(path, leaf.shape, leaf.dtype, rule.value,
                                            self.mesh, f"`{WHAT}`: {rule.label}")
                except ValueError as e:
                    if rule.target.startswith(OPT_STATE):  # written for optimizer state
                        raise
                    raise ValueError(f"{e}{OPT_RULE_HINT}") from None
                return NamedSharding(self.mesh, rule.value)
        if self.require:
            return None
        return NamedSharding(self.mesh, PartitionSpec())


def problem_order(entrance: entrances.Entrance, *, variables: list, unused: list,
                  optimizer: list) -> list:
    """Placement problems in the order ``init_train_state`` meets them for ``entrance``'s
    targets (``inspect`` lists them so).

    A Linen train state lays out the variables, checks for unused rules, then places the
    optimizer state (``_abstract``); an NNX one materializes the module, places the
    optimizer state, then checks for unused rules (``_nnx_state``).

    Args:
      entrance: the target's entrance.
      variables: the problems placing the variables.
      unused: the rules matching nothing.
      optimizer: the problems placing the optimizer state.
    """
    if entrance is entrances.NNX:
        return variables + optimizer + unused
    return variables + unused + optimizer


def _with_sharding(leaf: jax.ShapeDtypeStruct, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _start(fn: str, module: Any, **placement_args: Any
           ) -> tuple[entrances.Entrance, placement_lib.Placement]:
    """The entrance that takes ``module`` and the call's checked ``Placement``.

    A Linen train state is laid out on the ``mesh`` given alone (a ``jax.set_mesh``
    around the call does not stand in for it, so rules without ``mesh=`` are an error
    there too); an NNX one is materialized as ``materialize`` would, which places on the
    ambient mesh.
    """
    entrance = entrances.find(module, fn=fn)
    place = placement_lib.Placement.from_args(
        fn=fn, ambient=entrance is not entrances.LINEN, ways=("device", "mesh"),
        **placement_args,
    )
    return entrance, place


def _abstract(
    fn: str, module: Any, tx: Any, rngs: Any, inputs: tuple, kwargs: dict, *,
    place: placement_lib.Placement, concrete: bool,
    abstract_variables: Callable[[], Any] | None = None,
) -> tuple[TrainState, Any]:
    """The abstract train state, and the variables' shardings tree (None without a mesh).

    ``abstract_variables()`` gives the variables as ``abstract_init`` would (the default
    calls it), after the module, ``tx`` and the mesh are checked.
    """
    linen_call.check_module(module, fn=fn)
    check_tx(tx, fn=fn)
    mesh = place.given_mesh
    if mesh is not None:
        sharding_lib.check_mesh(mesh, concrete=concrete)
        sharding_lib.check_logical_axis_rules(place.logical_axis_rules)
    if abstract_variables is None:
        variables = abstract_lib.abstract_init(module, rngs, *inputs, **kwargs)
    else:
        variables = abstract_variables()
    variable_shardings = None
    if mesh is not None:
        layout = _Layout(mesh, place.partition_rules, place.logical_axis_rules,
                         place.allow_unused_rules, place.require_rules)
        variable_shardings = layout.variables(variables)
        variables = jax.tree.map(
            lambda leaf, sh: _with_sharding(paths.unbox(leaf), sh), variables,
            variable_shardings, is_leaf=paths.is_box,
        )
    params, collections = linen_optimizer.split(variables)
    opt = jax.eval_shape(tx.init, params)
    if mesh is not None:
        opt_names = [f"{OPT_STATE}{paths.SEP}{p}" for p, _ in paths.flatten(opt)[0]]
        layout.check_unused([p for p, _ in paths.flatten(variables)[0]] + opt_names)
        opt = jax.tree.map(_with_sharding, opt, layout.opt_state(opt, params))
    step_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=step_sharding),
        apply_fn=module.apply, params=params, tx=tx, opt_state=opt, collections=collections,
    )
    return state, variable_shardings


def abstract_train_state(
    module: nn.Module | Callable[..., Any],
    tx: optax.GradientTransformation,
    *args: Any,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    **kwargs: Any,
) -> TrainState | tuple[nnx.Module, nnx.Optimizer]:
    """The train state ``init_train_state`` would create, as sharded shapes only.

    Nothing is computed or allocated. Use it for memory planning
    (``flaxlazy.summary(state)`` reports parameter and optimizer bytes per device) and as
    the target when restoring a checkpointed train state.

    Args:
      module: a Flax Linen module, or an NNX Module class (or factory).
      tx: an optax ``GradientTransformation``.
      *args: Linen: ``rngs`` (a key or a dict of keys, as for ``module.init``), then the
        inputs (arrays, specs or Python values, as for ``abstract_init``). NNX: the
        constructor's arguments, ``rngs=nnx.Rngs(...)`` among them.
      mesh: optional ``Mesh`` (or ``AbstractMesh``); with it every leaf carries its
        ``NamedSharding``.
      partition_rules: as in ``materialize``; rules matching ``opt_state/...`` paths
        (``"opt_state/**"``, a regex, or a nested ``{"opt_state": ...}``) place
        optimizer-state leaves that mirror no parameter.
      logical_axis_rules: as in ``materialize``.
      allow_unused_rules: accept partition rules that match no variable and no
        optimizer-state leaf.
      require_rules: as in ``flaxlazy.shardings``; also decides whether an
        optimizer-state leaf that mirrors no parameter and matches no rule is an error
        or replicated.
      **kwargs: keyword inputs for the module (NNX: constructor keyword arguments).

    Returns:
      Linen: a ``flaxlazy.TrainState`` whose array leaves are ``jax.ShapeDtypeStruct``s.
      NNX: ``(model, optimizer)``, the abstract module and its abstract
      ``nnx.Optimizer`` (``wrt=nnx.Param``).

    Raises:
      TypeError: a ``module`` or ``tx`` of the wrong type, or malformed placement
        arguments.
      ValueError: as ``flaxlazy.shardings``, for optimizer-state leaves too (naming
        their ``opt_state/...`` path).

    Examples:
      >>> import jax, optax, flax.linen as nn, flaxlazy
      >>> state = flaxlazy.abstract_train_state(
      ...     nn.Dense(3), optax.adam(1e-3), jax.random.key(0), flaxlazy.spec("f32[2,5]"))
      >>> state.opt_state[0].mu["kernel"]
      ShapeDtypeStruct(shape=(5, 3), dtype=float32)
    """
    entrance, place = _start(
        "abstract_train_state", module, mesh=mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        require_rules=require_rules,
    )
    if entrance is entrances.NNX:
        return _nnx_state("abstract_train_state", module, tx, args, kwargs, place=place)
    rngs, inputs = linen_call.split_rngs_argument(args, kwargs, fn="abstract_train_state")
    state, _ = _abstract("abstract_train_state", module, tx, rngs, inputs, kwargs,
                         place=place, concrete=False)
    return state


def init_train_state(
    module: nn.Module | Callable[..., Any],
    tx: optax.GradientTransformation,
    *args: Any,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    initializers: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> TrainState | tuple[nnx.Module, nnx.Optimizer]:
    """Creates parameters and optimizer state in one step, directly in their shards.

    The parameters come from ``flaxlazy.materialize`` (same values as ``module.init``
    unless ``initializers`` overrides them, e.g. with ``flaxlazy.from_checkpoint``);
    ``tx.init`` then runs compiled with every optimizer-state leaf placed like the
    parameter it mirrors (scalars replicated), so no device ever holds a full copy of a
    sharded parameter or moment.

    Args:
      module: a Flax Linen module, or an NNX Module class (or factory).
      tx: an optax ``GradientTransformation`` (``adamw``, ``chain``, ``multi_transform``,
        ``masked``... all work).
      *args: Linen: ``rngs`` (a key or a dict of keys), then the inputs. NNX: the
        constructor's arguments, ``rngs=nnx.Rngs(...)`` among them.
      mesh: optional mesh; see ``materialize``.
      partition_rules: as in ``abstract_train_state``.
      logical_axis_rules: as in ``materialize``.
      allow_unused_rules: as in ``abstract_train_state``.
      require_rules: as in ``abstract_train_state``.
      initializers: the initializer tree, as in ``materialize``.
      device: without a mesh, the device to create everything on.
      **kwargs: keyword inputs for the module (NNX: constructor keyword arguments).

    Returns:
      Linen: a ``flaxlazy.TrainState`` (a ``flax.training.train_state.TrainState`` with
      the model's other collections in ``collections``), ``step`` 0. NNX: ``(model,
      optimizer)``, the module (as ``materialize`` gives it) and its ``nnx.Optimizer``
      (``wrt=nnx.Param``), the optimizer state placed like the parameters it mirrors.

    Raises:
      TypeError, ValueError: as ``abstract_train_state`` and ``materialize``.

    Examples:
      >>> import jax, optax, flax.linen as nn, flaxlazy
      >>> state = flaxlazy.init_train_state(
      ...     nn.Dense(3), optax.adam(1e-3), jax.random.key(0), flaxlazy.spec("f32[2,5]"))
      >>> int(state.step), state.params["kernel"].shape
      (0, (5, 3))
    """
    entrance, place = _start(
        "init_train_state", module, device=device, mesh=mesh,
        partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
        allow_unused_rules=allow_unused_rules, require_rules=require_rules,
    )
    if entrance is entrances.NNX:
        return _nnx_state("init_train_state", module, tx, args, kwargs, place=place,
                          initializers=initializers)
    rngs, inputs = linen_call.split_rngs_argument(args, kwargs, fn="init_train_state")
    traced = []  # the one trace, shared by the layout and the variables' plan

    def abstract_variables() -> Any:
        # What abstract_init(module, rngs, *inputs, **kwargs) returns (its messages
        # included), from a trace that also records what the plan needs.
        ambient = placement_lib.Placement.from_args(fn="abstract_init")
        traced.append(entrance.trace(
            module, (rngs, *inputs), dict(kwargs), fn="abstract_init", placement=ambient,
            options={}, abstract=False))
        if ambient.mesh is None:
            return traced[0].variables
        return sharding_lib.with_shardings(traced[0].variables, ambient.mesh,
                                           **ambient.rules())

    abstract, variable_shardings = _abstract(
        "init_train_state", module, tx, rngs, inputs, kwargs, place=place, concrete=True,
        abstract_variables=abstract_variables,
    )
    # Then what materialize(module, rngs, *inputs, device=..., shardings=...) does,
    # from the same trace.
    place_variables = placement_lib.Placement.from_args(
        fn="materialize", device=place.device, shardings=variable_shardings)
    plan = plan_lib.build(traced[0].records, initializers=initializers,
                          shardings=place_variables.for_plan(traced[0].variables))
    variables = traced[0].build(engine.execute(plan, traced[0].keys, traced[0].inputs))
    params, collections = linen_optimizer.split(variables)
    opt_shardings = jax.tree.map(lambda s: s.sharding, abstract.opt_state)
    opt_state = _compiled_init(tx, opt_shardings)(params)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), abstract.step.sharding)
        if place.given_mesh is not None else jnp.zeros((), jnp.int32),
        apply_fn=module.apply, params=params, tx=tx, opt_state=opt_state,
        collections=collections,
    )


def _compiled_init(tx: optax.GradientTransformation, shardings: Any) -> Callable:
    has_sharding = any(s is not None for s in jax.tree.leaves(shardings))
    return jax.jit(tx.init, out_shardings=shardings if has_sharding else None)


def _nnx_state(
    fn: str, ctor: Any, tx: Any, args: tuple, kwargs: dict, *, place: placement_lib.Placement,
    initializers: Any = None,
) -> tuple[nnx.Module, nnx.Optimizer]:
    """``(model, nnx.Optimizer)`` for an NNX constructor: real for ``init_train_state``,
    abstract (sharded ``ShapeDtypeStruct``s) for ``abstract_train_state``."""
    check_tx(tx, fn=fn)
    concrete = fn == "init_train_state"
    layout = None
    mesh, partition_rules = place.given_mesh, place.partition_rules
    if mesh is not None:
        sharding_lib.check_mesh(mesh, concrete=concrete)
        sharding_lib.check_logical_axis_rules(place.logical_axis_rules)
        layout = _Layout(mesh, partition_rules, place.logical_axis_rules,
                         place.allow_unused_rules, place.require_rules)
    if mesh is not None:  # rules unused by the model may be the optimizer's: checked below
        place = place._replace(
            allow_unused_rules=True,
            require_rules=sharding_lib.strict(place.require_rules, partition_rules))
    if concrete:
        model = materialize_lib.run(fn, ctor, args, kwargs, place=place,
                                    initializers=initializers)
    else:
        model = abstract_lib.run(fn, ctor, args, kwargs, place=place)
    abstract_opt = nnx_optimizer.abstract_optimizer(model, tx, layout)
    if layout is not None:
        names = [p for p, _ in paths.flatten(summary_lib.as_tree(model))[0]]
        layout.check_unused(names + nnx_optimizer.opt_state_paths(abstract_opt))
    if not concrete:
        return model, abstract_opt
    return model, nnx_optimizer.init_optimizer(model, tx, abstract_opt)
