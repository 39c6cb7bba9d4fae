"""An NNX constructor call: ``GPT(12, 768, rngs=nnx.Rngs(0))`` split into its parts.

The arguments are flattened once: ``nnx.Rngs`` objects (whose stream keys become the
traced inputs), arrays and ``ShapeDtypeStruct``s (dynamic inputs: they count by shape
and dtype), and everything else (Python values, Linen modules, functions), passed to the
constructor unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from flaxlazy._src import specs

NO_BAD_RNGS = object()  # ConstructorCall.bad_rngs: ``rngs`` absent or an nnx.Rngs


class _Dynamic:
    def __repr__(self):
        return "<dynamic>"


_DYNAMIC = _Dynamic()


@dataclasses.dataclass(frozen=True)
class _RngsSlot:
    index: int


ACCEPTS = (
    "an NNX Module class (or a function returning an NNX Module) followed by its "
    "constructor arguments"
)
NOT_A_CONSTRUCTOR = (
    "{fn}: `module` must be a flax.linen.Module instance, or an NNX Module class (or a "
    "function returning an NNX Module) followed by its constructor arguments, got "
    "{got}.{hint}"
)


NEITHER = (
    "{fn}: {name} is neither a flax.linen.Module nor a constructor returning an "
    "nnx.Module: {problem}.{linen} For Linen, pass a module instance, e.g. "
    "flaxlazy.{fn}(nn.Dense(4), jax.random.key(0), x) (to initialize a function, make it a "
    "Linen module with an nn.compact __call__); for NNX, a Module class or a function "
    "returning one, followed by its constructor arguments, rngs=nnx.Rngs(0) among them."
)
LINEN_STYLE = (
    " Its first argument is a PRNG key, as in a Linen call, but only a flax.linen.Module "
    "instance is called Linen's way."
)
NOT_RNGS = (
    "{fn}: `rngs` must be an nnx.Rngs such as nnx.Rngs(0) (or nnx.Rngs(params=0, "
    "dropout=1)), got {got}: {name} failed with it ({error}). {fix}"
)


def name_of(ctor: Any) -> str:
    """How messages name a constructor (``GPT``, ``<lambda>``, ``make``)."""
    return getattr(ctor, "__name__", None) or repr(ctor)[:60]


def _describe(x: Any) -> str:
    if specs.is_key(x):
        kind = "a PRNG key" if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else (
            "a raw uint32[2] PRNG key")
        return f"{kind} (dtype {x.dtype}, shape {tuple(np.shape(x))})"
    if specs.is_array_like(x):
        return f"an array (dtype {x.dtype}, shape {tuple(np.shape(x))})"
    if x is None:
        return "None"
    if isinstance(x, (list, tuple)):
        items = ", ".join(type(v).__name__ for v in x[:3]) + (", ..." if len(x) > 3 else "")
        return f"a {type(x).__name__} ({items})"
    text = repr(x)
    return f"{type(x).__name__} {text}" if len(text) < 60 and "\n" not in text else (
        f"a {type(x).__module__}.{type(x).__name__}")


def _signature(ctor: Any) -> inspect.Signature | None:
    """The constructor's parameters (``__init__``'s, less ``self``, for a class), or None."""
    try:
        if isinstance(ctor, type):
            sig = inspect.signature(ctor.__init__)
            return sig.replace(parameters=list(sig.parameters.values())[1:])
        return inspect.signature(ctor)
    except (TypeError, ValueError):  # builtins, C extensions: no signature to check
        return None


def check_arguments(ctor: Any, args: tuple, kwargs: dict, *, fn: str) -> None:
    """Raises a ``TypeError`` when a constructor that is no NNX Module class (a function,
    a lambda) cannot take the arguments: most likely a Linen-style call of something
    that is not a Linen module. An NNX class is left to Python's own message, which
    names it.

    Examples:
      >>> import jax
      >>> check_arguments(lambda x: x, (jax.random.key(0), 1.0), {}, fn="materialize")
      Traceback (most recent call last):
      ...
      TypeError: materialize: <lambda> is neither a flax.linen.Module nor a constructor
      returning an nnx.Module: it takes (x), and the arguments given do not fit (too many
      positional arguments). Its first argument is a PRNG key, as in a Linen call, ...
    """
    if isinstance(ctor, type) and issubclass(ctor, nnx.Module):
        return
    sig = _signature(ctor)
    if sig is None:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(NEITHER.format(
            fn=fn, name=name_of(ctor), linen=LINEN_STYLE if args and specs.is_key(args[0]) else "",
            problem=f"it takes {sig}, and the arguments given do not fit ({e})",
        )) from None


def _rngs_argument(ctor: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """``(found, value)`` of the argument named ``rngs`` (by keyword or position)."""
    if "rngs" in kwargs:
        return True, kwargs["rngs"]
    sig = _signature(ctor)
    if sig is None:
        return False, None
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return False, None
    if "rngs" in bound.arguments:
        return True, bound.arguments["rngs"]
    return False, None


def not_rngs(ctor: Any, value: Any, error: BaseException, *, fn: str) -> TypeError:
    """The ``TypeError`` for a constructor that failed with an ``rngs`` that is not an
    ``nnx.Rngs`` (raised from the constructor's own error, so both are shown)."""
    if specs.is_key(value):
        fix = ("Wrap the key in an nnx.Rngs: rngs=nnx.Rngs(key) (an NNX layer draws from "
               "the named streams of an nnx.Rngs, rngs.params(), not from a key).")
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        fix = f"Pass rngs=nnx.Rngs({int(value)})."
    elif value is None:
        fix = ("Pass rngs=nnx.Rngs(0): this constructor draws random values (only layers "
               "that draw none, such as nnx.Dropout, take rngs=None).")
    elif isinstance(value, (list, tuple)) and any(isinstance(v, nnx.Rngs) for v in value):
        fix = f"Pass one nnx.Rngs, not a {type(value).__name__} of them."
    else:
        fix = "Pass rngs=nnx.Rngs(0)."
    return TypeError(NOT_RNGS.format(
        fn=fn, got=_describe(value), name=name_of(ctor),
        error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        fix=fix,
    ))


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
      bad_rngs: the argument named ``rngs`` when it is given and not an ``nnx.Rngs``
        (a key, an int, None...), so that a constructor failing on it can say so;
        ``NO_BAD_RNGS`` otherwise.
    """

    ctor: Callable[..., Any]
    treedef: Any
    static: tuple
    rngs: tuple
    streams: tuple[str, ...]
    inputs: tuple
    bad_rngs: Any = NO_BAD_RNGS

    def failed(self, error: BaseException, *, fn: str) -> BaseException | None:
        """The clearer error for the constructor's ``error``, or None to re-raise it:
        an ``rngs`` that is not an ``nnx.Rngs`` and an error that using it as one gives."""
        if self.bad_rngs is NO_BAD_RNGS or not isinstance(error, (AttributeError, TypeError)):
            return None
        return not_rngs(self.ctor, self.bad_rngs, error, fn=fn)

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
    check_arguments(ctor, args, kwargs, fn=fn)
    given, value = _rngs_argument(ctor, args, kwargs)
    bad_rngs = value if given and not isinstance(value, nnx.Rngs) else NO_BAD_RNGS
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
                           tuple(inputs), bad_rngs)


def dynamic_inputs(args: tuple, kwargs: dict) -> list:
    """The array-like leaves of the arguments, in ``ConstructorCall.inputs`` order."""
    leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)), is_leaf=_is_node)
    return [x for x in leaves if not _is_node(x) and specs.is_array_like(x)]
