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
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import engine
from flaxlazy._src import entrances
from flaxlazy._src import paths
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import sharding_checks
from flaxlazy._src.linen import optimizer as linen_optimizer

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


TrainState = linen_optimizer.TrainState


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


class Layout:
    """Where the optimizer-state leaves of a train state go, on a given mesh (see the
    module docstring); the variables are placed as ``materialize`` places them."""

    def __init__(self, place: placement_lib.Placement):
        """The layout of a call's ``Placement`` (its given mesh; rules normalized)."""
        self.mesh = place.given_mesh
        self.allow_unused = place.allow_unused_rules
        self.require = sharding_lib.strict(place.require_rules, place.partition_rules)
        self.rules = place.partition_rules or []

    def check_unused(self, names: list[str]) -> None:
        """Every rule must match a variable or an optimizer-state leaf (unless allowed)."""
        rules_lib.assign(
            self.rules, names, what=f"`{WHAT}`", allow_unused=self.allow_unused,
            qualified=True,
        )

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of a scalar: replicated."""
        return NamedSharding(self.mesh, PartitionSpec())

    def opt_state(self, abstract_opt: Any, abstract_params: Any) -> Any:
        """A sharding per optimizer-state leaf (see the module docstring)."""
        flat, treedef = paths.flatten(abstract_opt)
        params = dict(paths.flatten(abstract_params)[0])
        out, missing = [], []
        for inner, leaf in flat:
            spec = self.leaf_sharding(inner, leaf, params)
            if spec is None:
                missing.append(inner)
            out.append(spec)
        if missing:
            leaves = dict(flat)
            listing = ", ".join(
                f"{OPT_STATE + paths.SEP + p!r} "
                f"({sharding_checks.shape_dtype(leaves[p].shape, leaves[p].dtype)})"
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

    def leaf_sharding(self, inner: str, leaf: Any, params: dict) -> NamedSharding | None:
        """The sharding of the optimizer-state leaf at ``opt_state/<inner>``: replicated
        for a scalar, its mirror's, or its first matching rule's; None where nothing
        covers it and rules are required.

        Raises:
          ValueError: the matching rule's spec does not fit the leaf.
        """
        if leaf.ndim == 0:
            return self.replicated
        path = f"{OPT_STATE}{paths.SEP}{inner}"
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
        return self.replicated


# The order in which a train state meets placement problems (``inspect`` lists them so):
# the variables' placement, then partition rules that match neither a variable nor an
# optimizer-state leaf, then the optimizer state's placement.
PROBLEM_ORDER = ("variables", "unused", "optimizer")


def _with_sharding(leaf: jax.ShapeDtypeStruct, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def run(fn: str, module: Any, tx: Any, args: tuple, kwargs: dict, *, abstract: bool,
        initializers: Any = None, **placement_args: Any) -> Any:
    """The train-state pipeline, one for every entrance, for the public function ``fn``.

    The target's entrance traces the call once. In this order: the module, ``tx`` and
    the placement arguments are checked; the variables are placed as ``materialize``
    places them; the optimizer state is laid out from the abstract optimizer state
    (``TracedCall.abstract_optimizer``), unused rules checked first (``PROBLEM_ORDER``);
    then, unless ``abstract``, the plan is executed; the entrance assembles its train
    state (``TracedCall.train_state``).
    """
    entrance = entrances.find(module, fn=fn)
    place = placement_lib.Placement.from_args(
        fn=fn, ambient=entrance.train_state_ambient, ways=("device", "mesh"),
        **placement_args)
    entrance.check(module, fn=fn)
    check_tx(tx, fn=fn)
    layout = None
    if place.given_mesh is not None:
        sharding_lib.check_mesh(place.given_mesh, concrete=not abstract)
        sharding_lib.check_logical_axis_rules(place.logical_axis_rules)
        layout = Layout(place)
        # Rules the variables leave unused may be the optimizer state's: checked below.
        place = place._replace(allow_unused_rules=True, require_rules=layout.require)
    with entrance.session(abstract):
        traced = entrance.trace(module, args, kwargs, fn=fn, placement=place, options={},
                                abstract=abstract)
        flat = paths.flatten(traced.variables)[0]
        by_path = place.by_path(traced.variables)
        sharding_of = (lambda path, _: None) if by_path is None else (
            lambda path, _: by_path[path])
        values = {path: _with_sharding(paths.unbox(leaf), sharding_of(path, leaf))
                  for path, leaf in flat}
        opt_state, params, step = traced.abstract_optimizer(tx, values)
        if layout is not None:
            opt_names = [f"{OPT_STATE}{paths.SEP}{p}" for p, _ in paths.flatten(opt_state)[0]]
            layout.check_unused([p for p, _ in flat] + opt_names)
            opt_state = jax.tree.map(_with_sharding, opt_state,
                                     layout.opt_state(opt_state, params))
            step = _with_sharding(step, layout.replicated)
        if abstract:
            variables = (traced.variables if by_path is None
                         else sharding_lib.placed(traced.variables, by_path))
        else:
            plan = plan_lib.build(traced.records, initializers=initializers,
                                  shardings=None if by_path is None else sharding_of)
            variables = engine.execute(plan, traced.keys, traced.inputs)
        return traced.train_state(traced.build(variables), tx, opt_state, step,
                                  placed=layout is not None)


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
    return run("abstract_train_state", module, tx, args, kwargs, abstract=True, mesh=mesh,
               partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
               allow_unused_rules=allow_unused_rules, require_rules=require_rules)


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
    return run("init_train_state", module, tx, args, kwargs, abstract=False,
               initializers=initializers, device=device, mesh=mesh,
               partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
               allow_unused_rules=allow_unused_rules, require_rules=require_rules)
