"""A call traced and planned as ``materialize`` does it: for tests of the stages
themselves.

The call goes through its entrance (``entrances.find``) and is traced as ``materialize``
traces it, inside the entrance's session (NNX's update context). Plans are never
cached: each call traces again.
"""

import contextlib

from flaxlazy._src import entrances
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib


@contextlib.contextmanager
def traced_call(module, args, kwargs, placement=None):
    """The ``TracedCall`` of ``module(*args, **kwargs)``, inside the entrance's session,
    where ``materialize`` runs the trace, the engine and ``build``."""
    entrance = entrances.find(module, fn="materialize")
    place = placement or placement_lib.Placement.from_args(fn="materialize")
    with entrance.session(False):
        yield entrance.trace(module, args, dict(kwargs), fn="materialize", placement=place,
                             options={}, abstract=False)


def plan_of(module, *args, initializers=None, shardings=None, **kwargs):
    """``plan.build`` of ``module``'s call, as ``flaxlazy.materialize(module, *args,
    initializers=..., **kwargs)`` builds it; ``shardings(path, leaf)`` places each leaf."""
    with traced_call(module, args, kwargs) as traced:
        return plan_lib.build(traced.records, initializers=initializers, shardings=shardings)
