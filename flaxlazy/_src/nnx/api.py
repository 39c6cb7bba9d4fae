"""The NNX entrance's trace and plan: the core behind NNX in and out."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
from flax import nnx

from flaxlazy._src import placement as placement_lib
from flaxlazy._src import traced_call
from flaxlazy._src.nnx import call as call_lib
from flaxlazy._src.nnx import optimizer as optimizer_lib
from flaxlazy._src.nnx import trace as trace_lib


def _logical(logical_axis_rules: Any) -> bool:
    """Whether NNX annotations name logical axes: rules given, or set in Flax's context."""
    return bool(logical_axis_rules) or bool(nn.get_logical_axis_rules())


def traced(ctor: Any, args: tuple, kwargs: dict, *, fn: str, logical_axis_rules: Any = None,
           record: bool = True, update: Any = None) -> trace_lib.Traced:
    """The abstract trace of ``ctor(*args, **kwargs)`` (``record``, ``update``: see
    ``trace.trace``)."""
    call = call_lib.make_call(ctor, args, kwargs, fn=fn)
    return trace_lib.trace(call, logical=_logical(logical_axis_rules), record=record, fn=fn,
                           update=update)


def trace_call(
    ctor: Any, args: tuple, kwargs: dict, *, fn: str, placement: placement_lib.Placement,
    abstract: bool = False, record: bool | None = None,
) -> traced_call.TracedCall:
    """The NNX entrance's trace: ``ctor(*args, **kwargs)``, abstractly.

    A real init (``abstract=False``) must run inside ``nnx.update_context(UPDATE)``
    (``session``) from the trace to ``build``: the trace and the module's assembly share
    it, the mechanism ``nnx.jit`` uses so that the caller's ``nnx.Rngs`` ends as the
    constructor would have left it, and a module that stores it (``self.rngs = rngs``)
    holds the caller's object, as after ``nnx.jit`` or a direct call.

    Args:
      ctor: the NNX Module class or factory.
      args: its positional arguments.
      kwargs: its keyword arguments, ``rngs=nnx.Rngs(...)`` among them.
      fn: the public function, for errors.
      placement: the call's placement (its mesh, for a model that names mesh axes; its
        logical axis rules, for NNX's logical annotations).
      abstract: shapes only: ``build`` leaves the caller's ``nnx.Rngs`` untouched (and
        by default nothing is recorded).
      record: whether to slice the trace into per-leaf records, for a plan (default:
        ``not abstract``).

    Returns:
      A ``TracedCall`` whose ``build`` assembles the module, and whose
      ``abstract_optimizer`` and ``train_state`` are the ``nnx.Optimizer``'s.
    """
    t = placement_lib.trace_for(placement.mesh, lambda: traced(
        ctor, args, kwargs, fn=fn, logical_axis_rules=placement.logical_axis_rules,
        record=not abstract if record is None else record,
        update=None if abstract else trace_lib.UPDATE))
    dyn = call_lib.dynamic_inputs(args, kwargs)
    optimizer = functools.partial(optimizer_lib.abstract_state, t)
    train_state = functools.partial(optimizer_lib.assemble, abstract=abstract)
    if abstract:
        return traced_call.TracedCall(t, None, dyn, lambda v: trace_lib.build_module(t, v),
                                      optimizer, train_state)
    keys = t.call.keys()

    def build(variables: Any) -> Any:
        t.update_rngs(keys, dyn)
        return trace_lib.build_module(t, variables)

    return traced_call.TracedCall(t, keys, dyn, build, optimizer, train_state)


def session(abstract: bool = False) -> Any:
    """The context a call's trace, execution and build share (see ``trace_call``)."""
    return contextlib.nullcontext() if abstract else nnx.update_context(trace_lib.UPDATE)
