"""An NNX constructor call: ``GPT(12, 768, rngs=nnx.Rngs(0))`` split into its parts.

The arguments are flattened once: ``nnx.Rngs`` objects (whose stream keys become the
traced inputs), arrays and ``ShapeDtypeStruct``s (dynamic inputs: they count by shape
and dtype), and everything else (Python values, Linen modules, functions), passed to the
constructor unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from flaxlazy._src import specs


class _Dynamic:
    def __repr__(self):
        return "<dynamic>"


_DYNAMIC = _Dynamic()


@dataclasses.dataclass(frozen=True)
class _RngsSlot:
    index: int


NOT_A_CONSTRUCTOR = (
    "{fn}: `module` must be a flax.linen.Module instance, or an NNX Module class (or a "
    "function returning an NNX Module) followed by its constructor arguments, got "
    "{got}.{hint}"
)


def is_nnx_target(module: Any) -> bool:
    """Whether ``module`` goes to the NNX entrance: any callable but a Linen module (an
    NNX module instance too, which ``check_constructor`` then explains)."""
    if isinstance(module, nn.Module):
        return False
    if isinstance(module, type):
        return not issubclass(module, nn.Module)
    return callable(module) or isinstance(module, nnx.Module)


def check_constructor(module: Any, *, fn: str) -> None:
    """Raises a ``TypeError`` unless ``module`` can be called as an NNX constructor."""
    if is_nnx_target(module) and not isinstance(module, nnx.Module):
        return
    if isinstance(module, nnx.Module):
        name = type(module).__name__
        raise TypeError(NOT_A_CONSTRUCTOR.format(
            fn=fn, got=f"an already constructed NNX module ({name})",
            hint=f" Pass the class and its arguments instead: flaxlazy.{fn}({name}, ..., "
                 "rngs=nnx.Rngs(0)), so that nothing is allocated before flaxlazy runs.",
        ))
    raise TypeError(NOT_A_CONSTRUCTOR.format(fn=fn, got=repr(module)[:80], hint=""))


def stream_names(rngs: tuple[nnx.Rngs, ...]) -> tuple[list[str], list[Any]]:
    """The stream names and current root keys of the caller's ``nnx.Rngs`` objects."""
    names, keys = [], []
    for i, r in enumerate(rngs):
        for path, variable in nnx.to_flat_state(nnx.state(r, nnx.RngKey)):
            name = "/".join(map(str, path[:-1]))
            names.append(name if len(rngs) == 1 else f"{i}.{name}")
            keys.append(variable.get_value())
    return names, keys


@dataclasses.dataclass(frozen=True)
class ConstructorCall:
    """One NNX constructor call with its inputs sorted out.

    Attributes:
      ctor: the class or factory.
      treedef: of ``(args, kwargs)``, with ``nnx.Rngs`` objects as leaves.
      static: the leaves, with markers where an Rngs object or a dynamic input goes.
      rngs: the caller's ``nnx.Rngs`` objects, in order (updated after materializing).
      streams: one name per stream of those objects (``"params"``, ``"dropout"``).
      inputs: the abstract dynamic inputs.
    """

    ctor: Callable[..., Any]
    treedef: Any
    static: tuple
    rngs: tuple
    streams: tuple[str, ...]
    inputs: tuple

    def rebuild(self, rngs: list, dyn: list) -> tuple[tuple, dict]:
        it = iter(dyn)
        leaves = [
            rngs[s.index] if isinstance(s, _RngsSlot) else next(it) if s is _DYNAMIC else s
            for s in self.static
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def keys(self) -> list:
        """The caller's stream root keys now, in ``streams`` order."""
        return stream_names(self.rngs)[1]


def _is_node(x: Any) -> bool:
    return isinstance(x, (nnx.Rngs, nnx.Module, nnx.Variable, nnx.RngStream))


def make_call(ctor: Any, args: tuple, kwargs: dict, *, fn: str) -> ConstructorCall:
    """Splits a constructor call into Rngs, dynamic inputs and static arguments."""
    check_constructor(ctor, fn=fn)
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)), is_leaf=_is_node)
    static, rngs, inputs = [], [], []
    for leaf in leaves:
        if isinstance(leaf, nnx.Rngs):
            if any(leaf is r for r in rngs):
                static.append(_RngsSlot(next(i for i, r in enumerate(rngs) if r is leaf)))
                continue
            static.append(_RngsSlot(len(rngs)))
            rngs.append(leaf)
        elif _is_node(leaf):
            raise TypeError(
                f"{fn}: the arguments of {getattr(ctor, '__name__', ctor)!r} may be Python "
                "values, arrays, specs and nnx.Rngs; got an "
                f"{type(leaf).__module__.split('.')[1]}.{type(leaf).__name__}. Pass an "
                "nnx.Rngs (rngs=nnx.Rngs(0)) rather than a stream, and build submodules "
                "inside the constructor."
            )
        elif specs.is_array_like(leaf):
            static.append(_DYNAMIC)
            inputs.append(specs.to_spec(leaf))
        else:
            static.append(leaf)
    names, _ = stream_names(tuple(rngs))
    return ConstructorCall(ctor, treedef, tuple(static), tuple(rngs), tuple(names),
                           tuple(inputs))


def dynamic_inputs(args: tuple, kwargs: dict) -> list:
    """The array-like leaves of the arguments, in ``ConstructorCall.inputs`` order."""
    leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)), is_leaf=_is_node)
    return [x for x in leaves if not _is_node(x) and specs.is_array_like(x)]
