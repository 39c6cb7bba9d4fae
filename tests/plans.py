"""The plan ``materialize`` would execute for a call: for tests of the plan stage itself.

The call goes through its entrance (``entrances.find``), traced as ``materialize`` traces
it, inside the entrance's session, and the plan is built from that trace; nothing is
executed. Plans are never cached: each call traces again.
"""

from flaxlazy._src import entrances
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib


def plan_of(module, *args, initializers=None, shardings=None, **kwargs):
    """``plan.build`` of ``module``'s call, as ``flaxlazy.materialize(module, *args,
    initializers=..., **kwargs)`` builds it; ``shardings(path, leaf)`` places each leaf."""
    entrance = entrances.find(module, fn="materialize")
    place = placement_lib.Placement.from_args(fn="materialize")
    with entrance.session(False):
        traced = entrance.trace(module, args, kwargs, fn="materialize", placement=place,
                                options={}, abstract=False)
        return plan_lib.build(traced.records, initializers=initializers, shardings=shardings)
