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


def abstract_optimizer(model: Any, tx: optax.GradientTransformation, layout: Any) -> Any:
    """The abstract ``nnx.Optimizer`` of ``model`` (abstract or real), placed by ``layout``.

    Args:
      model: the NNX model; with ``layout``, its values carry their shardings.
      tx: the optax transformation.
      layout: the train-state layout (``train_state._Layout``), or None (no mesh).
    """
    abstract = nnx.eval_shape(lambda m: _optimizer(m, tx), model)
    if layout is None:
        return abstract
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    params = _plain(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    opt_flat = [(p[1:], v) for p, v in flat if p[0] == OPT_STATE]
    placed = dict(paths.flatten(layout.opt_state(_plain(opt_flat), params))[0])
    replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
    out = []
    for state_path, leaf in flat:
        value = leaf.get_value()
        inner = paths.SEP.join(map(str, state_path[1:]))
        sharding = placed[inner] if state_path[0] == OPT_STATE else replicated
        out.append((state_path, leaf.replace(
            jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def init_optimizer(model: Any, tx: optax.GradientTransformation, abstract: Any) -> Any:
    """The ``nnx.Optimizer`` of ``model``, its state created compiled, placed as
    ``abstract`` (from ``abstract_optimizer``) says."""
    graphdef, abstract_state = nnx.split(abstract)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_state)
    model_def, model_state = nnx.split(model)

    def build(state):
        return nnx.state(_optimizer(nnx.merge(model_def, state), tx))

    has = any(s is not None for s in jax.tree.leaves(shardings))
    values = jax.jit(build, out_shardings=shardings if has else None)(model_state)
    return nnx.merge(graphdef, values)


def opt_state_paths(optimizer: Any) -> list[str]:
    """The ``opt_state/...`` paths of an optimizer's state leaves (as rules see them)."""
    return [
        paths.SEP.join((OPT_STATE, *map(str, state_path[1:])))
        for state_path, _ in nnx.to_flat_state(nnx.state(optimizer))
        if state_path[0] == OPT_STATE
    ]


def abstract_state(traced: Any, tx: optax.GradientTransformation,
                   values: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(opt_state, params, step)``, abstract, as NNX's ``init_train_state`` makes them:
    the ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` of the abstract model, its state and
    the model's params as the plain nested dicts its layout places.

    Args:
      traced: the constructor's abstract trace (``nnx.trace.Traced``, traced without the
        caller's ``nnx.Rngs``: the model gets copies).
      tx: the optax transformation.
      values: ``{path: jax.ShapeDtypeStruct}``, each variable as the model holds it.
    """
    model = traced.module(values)
    optimizer = abstract_optimizer(model, tx, None)
    flat = list(nnx.to_flat_state(nnx.state(optimizer)))
    opt = _plain([(p[1:], v) for p, v in flat if p[0] == OPT_STATE])
    params = _plain(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    steps = [v.get_value() for p, v in flat if p[0] != OPT_STATE]
    if len(steps) != 1:  # pragma: no cover - depends on flax's nnx.Optimizer
        raise NotImplementedError(
            "inspect: this flax version's nnx.Optimizer holds "
            f"{[paths.SEP.join(map(str, p)) for p, _ in flat if p[0] != OPT_STATE]} besides "
            "its opt_state; inspect knows only `step`."
        )
    return opt, params, steps[0]
