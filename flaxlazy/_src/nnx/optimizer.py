"""NNX train state: the model and its ``nnx.Optimizer``, the optimizer state sharded like
the parameters it mirrors (the same layout rules as Linen's ``TrainState``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax
from flax import nnx

from flaxlazy._src import paths

OPT_STATE = "opt_state"


def _optimizer(model: Any, tx: optax.GradientTransformation) -> nnx.Optimizer:
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _plain(flat: list[tuple[tuple, Any]]) -> dict:
    """A nested dict ``{path parts: value}`` of an NNX flat state (values unwrapped)."""
    out: dict = {}
    for state_path, leaf in flat:
        node = out
        for k in state_path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(state_path[-1])] = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return out


def assemble(model: Any, tx: optax.GradientTransformation, opt_state: Any,
             step: jax.ShapeDtypeStruct, *, abstract: bool, placed: bool
             ) -> tuple[Any, nnx.Optimizer]:
    """``(model, nnx.Optimizer)``: the train state of an NNX model.

    Args:
      model: the NNX model, abstract or real.
      tx: the optax transformation.
      opt_state: the optimizer state as the plain nested dicts of ``abstract_state``,
        each leaf carrying its sharding when ``placed``.
      step: the abstract step, likewise.
      abstract: whether to return the abstract optimizer; otherwise its state is
        created compiled, each leaf in its sharding.
      placed: whether ``opt_state`` and ``step`` carry the shardings to create them in
        (a mesh); otherwise the optimizer is as ``nnx.eval_shape`` gives it.

    Examples:
      >>> import jax, optax
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> opt, _, step = model_state(model, optax.sgd(0.1))
      >>> _, optimizer = assemble(model, optax.sgd(0.1), opt, step, abstract=False,
      ...                         placed=False)
      >>> int(optimizer.step.get_value())
      0
    """
    optimizer = nnx.eval_shape(lambda m: _optimizer(m, tx), model)
    if placed:
        graphdef, state = nnx.split(optimizer)
        by_path = dict(paths.flatten(opt_state)[0])
        out = []
        for state_path, leaf in nnx.to_flat_state(state):
            value = leaf.get_value()
            inner = paths.SEP.join(map(str, state_path[1:]))
            like = by_path[inner] if state_path[0] == OPT_STATE else step
            out.append((state_path, leaf.replace(
                jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=like.sharding))))
        optimizer = nnx.merge(graphdef, nnx.from_flat_state(out))
    if abstract:
        return model, optimizer
    return model, _init(model, tx, optimizer)


def _init(model: Any, tx: optax.GradientTransformation, abstract: Any) -> Any:
    """The ``nnx.Optimizer`` of ``model``, its state created compiled, placed as
    ``abstract`` (an abstract optimizer) says."""
    graphdef, abstract_state = nnx.split(abstract)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_state)
    model_def, model_state = nnx.split(model)

    def build(state):
        return nnx.state(_optimizer(nnx.merge(model_def, state), tx))

    has = any(s is not None for s in jax.tree.leaves(shardings))
    values = jax.jit(build, out_shardings=shardings if has else None)(model_state)
    return nnx.merge(graphdef, values)


def abstract_state(traced: Any, tx: optax.GradientTransformation,
                   values: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(opt_state, params, step)``, abstract, as NNX's ``init_train_state`` makes them
    (``model_state``) for the model ``traced`` assembles with ``values``.

    Args:
      traced: the constructor's trace (``nnx.trace.Traced``); the model is assembled
        apart from the caller's objects (``Traced.detached``).
      tx: the optax transformation.
      values: ``{path: jax.ShapeDtypeStruct}``, each variable as the model holds it.
    """
    return model_state(traced.detached(values), tx)


def model_state(model: Any, tx: optax.GradientTransformation) -> tuple[Any, Any, Any]:
    """``(opt_state, params, step)``, abstract: the ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``'s state and the model's params, as the plain nested dicts the
    train-state layout places, and the optimizer's step.

    Examples:
      >>> import optax
      >>> from flax import nnx
      >>> opt, params, step = model_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.adam(1e-3))
      >>> opt["0"]["mu"]["kernel"].shape, params["kernel"].shape, step.dtype.name
      ((2, 3), (2, 3), 'uint32')
    """
    optimizer = nnx.eval_shape(lambda m: _optimizer(m, tx), model)
    flat = list(nnx.to_flat_state(nnx.state(optimizer)))
    opt = _plain([(p[1:], v) for p, v in flat if p[0] == OPT_STATE])
    params = _plain(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    steps = [v.get_value() for p, v in flat if p[0] != OPT_STATE]
    if len(steps) != 1:  # pragma: no cover - depends on flax's nnx.Optimizer
        raise NotImplementedError(
            "this flax version's nnx.Optimizer holds "
            f"{[paths.SEP.join(map(str, p)) for p, _ in flat if p[0] != OPT_STATE]} besides "
            "its opt_state; flaxlazy knows only `step`."
        )
    return opt, params, steps[0]
