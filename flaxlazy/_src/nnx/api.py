"""The NNX entrance's trace, plan and ``materialize``: the core behind NNX in and out."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from flaxlazy._src import engine
from flaxlazy._src import placement
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.nnx import call as call_lib
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


def plan(t: trace_lib.Traced, *, initializers: Any, placement_args: dict) -> plan_lib.Plan:
    """The plan of a traced constructor, placed as ``placement_args`` say."""
    by_path = placement.resolve(t.variables, **placement_args)
    return plan_lib.build(
        t, initializers=initializers,
        shardings=None if by_path is None else (lambda path, leaf: by_path[path]),
    )


def materialize(
    ctor: Any, args: tuple, kwargs: dict, *, initializers: Any, placement_args: dict
) -> Any:
    """The constructed module, its values equal to ``nnx.jit(ctor)``'s where not overridden.

    The caller's ``nnx.Rngs`` ends as the constructor would have left it, and a module
    that stores it (``self.rngs = rngs``) holds the caller's object, as after
    ``nnx.jit`` or a direct call: the two then draw from one stream, not from two copies
    in the same state. The trace and the module's assembly share one
    ``nnx.update_context``, the mechanism ``nnx.jit`` uses for the same purpose.
    """
    with nnx.update_context(trace_lib.UPDATE):
        t = placement.trace_for(placement_args.get("mesh"), lambda: traced(
            ctor, args, kwargs, fn="materialize",
            logical_axis_rules=placement_args.get("logical_axis_rules"), update=trace_lib.UPDATE))
        p = plan(t, initializers=initializers, placement_args=placement_args)
        keys = t.call.keys()
        dyn = call_lib.dynamic_inputs(args, kwargs)
        variables = engine.execute(p, keys, dyn)
        t.update_rngs(keys, dyn)
        return trace_lib.build_module(t, variables)
