"""The framework entrances, one table: each public function finds its target's here, once.

An ``Entrance`` says whether it takes a target and traces a call of it into a
``TracedCall`` for the framework-free stages (place, plan, execute), whose ``build``
turns the variables into what the framework's user expects back. Adding a framework is
one module beside ``linen/`` and ``nnx/`` plus one line in ``ENTRANCES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any
from typing import NamedTuple

from flaxlazy._src import placement as placement_lib
from flaxlazy._src import traced_call
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.nnx import api as nnx_api
from flaxlazy._src.nnx import call as nnx_call


class Entrance(NamedTuple):
    """How flaxlazy enters one framework: a bundle of functions, as optax's
    ``GradientTransformation`` is.

    Attributes:
      name: the framework (``"linen"``, ``"nnx"``).
      describes: what the entrance takes, in words, for the error naming every
        entrance when none takes a target.
      accepts: ``accepts(target) -> bool``: whether the target is this framework's
        (then every other error about it is this entrance's to give).
      check: ``check(target, *, fn)``: raises a ``TypeError`` unless the target can be
        initialized (e.g. a Linen class instead of an instance).
      trace: ``trace(target, args, kwargs, *, fn, placement, options, abstract,
        record=None) -> TracedCall``: the public call's arguments traced abstractly.
        ``options`` are Linen's ``Module.init`` options (``method``, ``mutable``,
        ``capture_intermediates``); ``abstract`` asks for shapes only (the caller's
        objects untouched, ``build`` returns an abstract result); ``record`` whether the
        trace records how each variable is created, for a plan (default: ``not
        abstract``; ``inspect`` plans from an abstract trace).
      session: ``session(abstract) -> context manager`` that a call's trace, execution
        and ``build`` run inside.
      apply: ``apply(target) -> callable``: ``Lazy.apply``, how the initialized model is
        run.
      train_state_ambient: whether, for a train state, the mesh of a ``jax.set_mesh``
        around the call stands in for ``mesh=`` (NNX, as ``materialize``); a Linen
        train state is laid out on the ``mesh`` given alone.
    """

    name: str
    describes: str
    accepts: Callable[[Any], bool]
    check: Callable[..., None]
    trace: Callable[..., traced_call.TracedCall]
    session: Callable[[bool], AbstractContextManager[Any]]
    apply: Callable[[Any], Callable[..., Any]]
    train_state_ambient: bool


def _linen_trace(target: Any, args: tuple, kwargs: dict, *, fn: str,
                 placement: placement_lib.Placement, options: Mapping[str, Any],
                 abstract: bool = False, record: bool | None = None
                 ) -> traced_call.TracedCall:
    return linen_call.trace_call(target, args, kwargs, fn=fn, placement=placement,
                                 options=options, abstract=abstract, record=record)


def _nnx_trace(target: Any, args: tuple, kwargs: dict, *, fn: str,
               placement: placement_lib.Placement, options: Mapping[str, Any],
               abstract: bool = False, record: bool | None = None
               ) -> traced_call.TracedCall:
    linen_call.reject_linen_options(  # Linen's Module.init options mean nothing here
        fn, method=options.get("method"),
        mutable=options.get("mutable", linen_call.DEFAULT_MUTABLE),
        capture_intermediates=options.get("capture_intermediates", False),
    )
    return nnx_api.trace_call(target, args, kwargs, fn=fn, placement=placement,
                              abstract=abstract, record=record)


def _call(model: Any, *args: Any, **kwargs: Any) -> Any:
    """NNX's apply: the module is called."""
    return model(*args, **kwargs)


LINEN = Entrance(
    name="linen",
    describes=linen_call.ACCEPTS,
    accepts=linen_call.accepts,
    check=linen_call.check_module,
    trace=_linen_trace,
    session=lambda abstract=False: contextlib.nullcontext(),
    apply=lambda module: module.apply,
    train_state_ambient=False,
)
NNX = Entrance(
    name="nnx",
    describes=nnx_call.ACCEPTS,
    accepts=nnx_call.is_nnx_target,
    check=nnx_call.check_constructor,
    trace=_nnx_trace,
    session=nnx_api.session,
    apply=lambda ctor: _call,
    train_state_ambient=True,
)
ENTRANCES: tuple[Entrance, ...] = (LINEN, NNX)

NO_ENTRANCE = "{fn}: `{what}` must be {accepted}, got {got}.{hint}"


def _got(target: Any) -> str:
    text = repr(target)
    return f"{type(target).__name__} {text}" if len(text) < 60 and "\n" not in text else (
        f"a {type(target).__module__}.{type(target).__name__}")


def find(target: Any, *, fn: str, what: str = "module") -> Entrance:
    """The entrance that takes ``target``: the first in ``ENTRANCES`` that accepts it.

    Args:
      target: what the public function was given to initialize.
      fn: the public function, for the error.
      what: the argument's name, for the error.

    Returns:
      The ``Entrance``.

    Raises:
      TypeError: no entrance takes ``target``, naming it and what each would take.

    Examples:
      >>> import flax.linen as nn
      >>> find(nn.Dense(3), fn="materialize").name
      'linen'
      >>> find(3, fn="materialize")
      Traceback (most recent call last):
      ...
      TypeError: materialize: `module` must be a flax.linen.Module instance such as
      nn.Dense(4), or an NNX Module class (or a function returning an NNX Module) followed
      by its constructor arguments, got int 3.
    """
    for entrance in ENTRANCES:
        if entrance.accepts(target):
            return entrance
    raise TypeError(NO_ENTRANCE.format(
        fn=fn, what=what, accepted=", or ".join(e.describes for e in ENTRANCES),
        got=_got(target), hint=_hint(target, fn),
    ))


def _hint(target: Any, fn: str) -> str:
    """For an NNX object that is no constructor: how to pass one."""
    if any(c.__module__.startswith("flax.nnx") for c in type(target).__mro__):
        return (f" For NNX, pass the class and its arguments: flaxlazy.{fn}("
                f"{type(target).__name__}, ..., rngs=nnx.Rngs(0)).")
    return ""
