"""What an entrance's trace hands the stages after it: records, keys, inputs, builders."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple


class TracedCall(NamedTuple):
    """One public call, traced by its framework's entrance (``flaxlazy._src.entrances``).

    The framework-free stages read it: ``placement`` places ``variables``, ``plan.build``
    plans from ``records``, ``engine.execute`` draws from ``keys`` with ``inputs``, and
    ``build`` turns the executed (or abstract) variables into what the public function
    returns.

    Attributes:
      records: the entrance's trace (``plan.build`` reads it; ``records.variables`` is
        the abstract variables tree).
      keys: the root keys the values are drawn from (Linen: the ``rngs`` argument; NNX:
        the caller's ``nnx.Rngs`` streams' keys).
      inputs: the call's dynamic inputs (arrays or specs), in the trace's order.
      build: ``build(variables) -> result``: Linen returns the tree; NNX assembles the
        module (and, after a real init, leaves the caller's ``nnx.Rngs`` as the
        constructor would).
      abstract_optimizer: ``abstract_optimizer(tx, values) -> (opt_state, params,
        step)``: the abstract optimizer state the framework's train state holds for the
        variables ``values`` (``{path: ShapeDtypeStruct}``, with the dtype and sharding
        each will have), the parameters it mirrors as the plain tree the train-state
        layout places, and the step (Linen: ``tx.init`` of the unboxed ``params``; NNX:
        the state of ``nnx.Optimizer(model, tx, wrt=nnx.Param)``). ``init_train_state``
        places the optimizer state from it before anything is computed; ``inspect``
        reports it.
      train_state: ``train_state(result, tx, opt_state, step, *, placed) -> state``:
        the framework's train state of ``build``'s result (Linen: a
        ``flaxlazy.TrainState``; NNX: ``(model, nnx.Optimizer)``), ``opt_state`` and
        ``step`` as ``abstract_optimizer`` gave them, each leaf carrying its sharding
        when ``placed``. After an abstract trace the state is abstract; otherwise the
        optimizer state is created compiled, in those shardings.

    Examples:
      >>> call = TracedCall(records=None, keys=None, inputs=[], build=lambda v: v)
      >>> call.build({"params": {}})
      {'params': {}}
    """

    records: Any
    keys: Any
    inputs: list
    build: Callable[[Any], Any]
    abstract_optimizer: Callable[[Any, Mapping[str, Any]], tuple] | None = None
    train_state: Callable[..., Any] | None = None

    @property
    def variables(self) -> Any:
        """The abstract variables tree the trace found."""
        return self.records.variables
