"""The NNX entrance: a constructor traced once, whole, into the records the core plans from.

The constructor runs under ``jax.make_jaxpr`` with the caller's stream root keys as
inputs and the stream counters as known constants, exactly as ``nnx.jit`` would run it
but without compiling anything. Every variable of the resulting module is an output;
``slicing.Analysis`` finds, per variable, whether it is computed from one
``fold_in(root, count)`` key alone (replayed alone, by a program shared by every equal
layer), from constants alone, or needs the traced fallback (the whole jaxpr, pruned).

Variables are addressed like Linen's: ``Param`` values by their state path inside
``params`` (``blocks/0/mlp/kernel``), every other variable by its collection and path
(``batch_stats/bn/mean``; the collection is NNX's registered name for the type, or the
class name: ``RngKey/dropout/rngs/key``). NNX's own sharding annotations
(``nnx.with_partitioning``, ``out_sharding``) become Flax partitioning boxes, so
placement reads them as it reads Linen's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from flaxlazy._src import _compat
from flaxlazy._src import gc_pause
from flaxlazy._src import nnx_variables as state_lib
from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src import slicing
from flaxlazy._src import specs
from flaxlazy._src.nnx import call as call_lib
from flaxlazy._src.sources import traced as traced_source

UPDATE = "flaxlazy.materialize"  # the nnx.update_context tag of a materializing call


@dataclasses.dataclass
class Record:
    """How one NNX variable leaf is made (``slicing.Slice``, in the core's terms).

    Attributes:
      collection: ``"params"`` for ``nnx.Param``, else the variable type's name.
      path: the state path, as strings.
      takes_key: whether the program takes a key (``fold_in(stream root, fold)``).
      fold: the stream counter folded into the root key to make that key.
      stream: the stream's name.
      program: the program, or None when the leaf needs the traced fallback.
      output: the abstract leaf; one layer of it for stacked (``nnx.vmap``) leaves, so
        that overrides draw per layer.
    """

    collection: str
    path: tuple[str, ...]
    takes_key: bool
    fold: int | None
    stream: str | None
    program: programs.Program | None
    output: Any
    init_fn: Any = None

    # The core's view: a stacked (nnx.vmap) leaf is one program of the whole leaf.
    layers: tuple = ()
    split = False

    @property
    def replayable(self) -> bool:
        return self.program is not None


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One leaf of the module's state: where it goes back and which output it is."""

    state_path: tuple
    variable: Any  # the nnx.Variable (template; its value is replaced) or None
    qualified: str | None  # the path in ``variables``; None for non-array values
    output: int | None
    static: Any = None  # the value of a non-array leaf


@dataclasses.dataclass(frozen=True)
class Traced:
    """The result of tracing an NNX constructor abstractly.

    Attributes:
      call: the constructor call.
      variables: ``{collection: nested dict}`` with ``ShapeDtypeStruct`` leaves (Flax
        partitioning boxes where NNX has a sharding annotation).
      records: per ``(collection, path)``, its ``Record``.
      analysis: the jaxpr and its slices (None when traced with ``record=False``).
      graphdef: the module's graph definition.
      entries: the module's state leaves, in state order.
      rng_entries: per caller Rngs object, its state leaves after construction.
      update: the ``nnx.update_context`` tag the trace was split in (see ``trace``).
    """

    call: call_lib.ConstructorCall
    variables: Any
    records: Mapping[tuple[str, tuple[str, ...]], Record]
    analysis: slicing.Analysis | None
    graphdef: Any
    entries: tuple[_Entry, ...]
    rng_entries: tuple[tuple[_Entry, ...], ...]
    update: Hashable | None = None

    # The core's view: roots, the override stream, the fallback program.
    checkpoint_subtree = ""  # from_checkpoint's default: a checkpoint of nnx.state(model)

    @property
    def n_rng(self) -> int:
        return len(self.call.streams)

    @property
    def override_stream(self) -> str | None:
        """The stream override keys derive from: ``params``, else ``default`` (as NNX's
        ``rngs.params()``), of the first ``nnx.Rngs`` argument that has one."""
        for name in ("params", "default"):
            for stream in self.call.streams:
                if stream.rsplit(".", 1)[-1] == name:
                    return stream
        return None

    @property
    def override_root(self) -> Any:
        stream = self.override_stream
        if stream is None:
            return None
        aval = self.analysis.closed.jaxpr.invars[self.call.streams.index(stream)].aval
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)

    def roots(self, keys: list) -> dict[str, Any]:
        return dict(zip(self.call.streams, keys, strict=True))

    def rng_leaves(self, keys: list) -> list:
        return list(keys)

    def fallback_jaxpr(self, names: list[str]) -> Any:
        index = {e.qualified: e.output for e in self.entries if e.qualified is not None}
        return self.analysis.pruned([index[n] for n in names])

    # Back to NNX objects.
    def module(self, values: Mapping[str, Any]) -> Any:
        """The module with ``values`` (by qualified path) in its variables.

        Traced with ``update`` (and called inside that ``nnx.update_context``): the
        caller's ``nnx.Rngs`` objects the constructor stored (or their streams) are put
        back in the module, their values set to the module's, as ``nnx.jit`` does.
        """
        if self.update is None:
            return self.detached(values)
        with nnx.merge_context(self.update, False) as outer:  # (4)
            return outer.merge(self.graphdef, self._flat(values))

    def detached(self, values: Mapping[str, Any]) -> Any:
        """The module with ``values`` in its variables, apart from the caller's objects:
        new ``nnx.Rngs`` and all, whatever ``update`` (as for ``nnx.eval_shape``)."""
        return nnx.merge(self.graphdef, self._flat(values))

    def _flat(self, values: Mapping[str, Any]) -> Any:
        return nnx.from_flat_state([(e.state_path, _value(e, values)) for e in self.entries])

    def _rng_updates(self) -> list[tuple[Any, _Entry, Any]]:
        """``(caller's Rngs, entry, value)`` for each RNG variable the constructor leaves
        changed: ``value`` is its known end value (a counter), or None when it has to be
        computed (a key the constructor replaced). Unchanged root keys are left out."""
        invars = self.analysis.closed.jaxpr.invars
        out = []
        for obj, entries in zip(self.call.rngs, self.rng_entries, strict=True):
            for e in entries:
                if e.output is None:
                    continue
                known = self.analysis.slice(e.output).known
                var = self.analysis.closed.jaxpr.outvars[e.output]
                if known is None and var in invars[: self.n_rng] and invars.index(
                    var
                ) == _root_index(self.call.streams, obj, e, self.call.rngs):
                    continue  # the root key, unchanged
                out.append((obj, e, known))
        return out

    @property
    def rngs_update_compiles(self) -> bool:
        """Whether ``update_rngs`` runs one compiled function (a key to compute)."""
        return any(value is None for _, _, value in self._rng_updates())

    def update_rngs(self, keys: list, inputs: list) -> None:
        """Leaves the caller's ``nnx.Rngs`` as the constructor would have.

        Args:
          keys: the stream root keys the constructor ran with.
          inputs: the call's dynamic inputs, arrays or specs.
        """
        pending = self._rng_updates()
        computed = [e for _, e, v in pending if v is None]
        values = iter([])
        if computed:  # a key the constructor replaced: one compiled, pruned run
            names = ["nnx.Rngs " + paths.SEP.join(map(str, e.state_path)) for e in computed]
            concrete, dyn = traced_source.concrete_inputs(inputs)
            values = iter(traced_source.pruned_runner(
                self.analysis.pruned([e.output for e in computed]), names,
                [None] * len(computed), self.n_rng, self.call.inputs, concrete,
            )(keys, dyn))
        for obj, e, value in pending:
            value = next(values) if value is None else value
            nnx.update(obj, nnx.from_flat_state([(e.state_path, e.variable.replace(value))]))


def _root_index(streams, obj, entry, rngs) -> int:
    i = next(i for i, r in enumerate(rngs) if r is obj)
    name = paths.SEP.join(map(str, entry.state_path[:-1]))
    full = name if len(rngs) == 1 else f"{i}.{name}"
    return streams.index(full) if full in streams else -1


def _value(entry: _Entry, values: Mapping[str, Any]) -> Any:
    if entry.qualified is None:
        return entry.static if entry.variable is None else entry.variable.replace(entry.static)
    value = values[entry.qualified]
    return value if entry.variable is None else entry.variable.replace(value)


def _concrete_counters() -> contextlib.AbstractContextManager:
    """Stream counters stay concrete numbers while the constructor is traced (on this
    thread).

    ``RngStream.__call__`` folds the counter into the root key and increments it. The
    key is traced, so the fold is recorded; the counter is a known number, so it is
    incremented at trace time rather than recorded as ``count + 1`` (as ``nnx.jit``
    does, which also makes each later NNX access to it walk the whole trace so far).
    """

    def call(original, self):
        if isinstance(self.count.get_value(), jax.core.Tracer):
            return original(self)
        with jax.ensure_compile_time_eval(), _compat.eager_outside_abstract_mesh():
            return original(self)

    return _compat.thread_patches({"flax.nnx.rnglib.RngStream.__call__": call})


def trace(call: call_lib.ConstructorCall, *, logical: bool = False, record: bool = True,
          fn: str = "materialize", update: Hashable | None = None) -> Traced:
    """Traces the constructor with ``jax.make_jaxpr`` (nothing computed) and slices it.

    Never cached, like the Linen trace: what a constructor creates can depend on anything
    its code reads.

    Args:
      call: the constructor call.
      logical: whether sharding annotations name logical axes (``logical_axis_rules``).
      record: whether to slice the jaxpr into per-leaf records (not for shapes alone:
        ``abstract_init`` needs only ``variables`` and the module's structure).
      fn: the public function, for errors.
      update: the tag of an open ``nnx.update_context`` (``UPDATE``): the caller's
        ``nnx.Rngs`` are split and the module split in it, as ``nnx.jit`` does, so that
        ``Traced.module`` built in the same context puts the caller's objects back
        where the constructor stored them. None: the module gets copies.
    """
    # Keys in ``call.streams`` order (NNX's flat-state order, as ``stream_names``).
    with nnx.split_context(update) as outer:  # (1) in update_context's terms
        parts = [outer.split(r, nnx.RngKey, ...) for r in call.rngs]
    key_flats = [nnx.to_flat_state(k) for _, k, _ in parts]
    found: dict[str, Any] = {}

    def run(keys, dyn):
        it = iter(keys)
        objs = []
        with nnx.merge_context(update, True if update is not None else None) as inner:  # (2)
            for (graphdef, _, rest), flat in zip(parts, key_flats, strict=True):
                # Fresh Variables, created inside this trace (NNX checks trace levels).
                fresh_keys = nnx.from_flat_state([(p, v.replace(next(it))) for p, v in flat])
                objs.append(inner.merge(graphdef, fresh_keys,
                                        jax.tree_util.tree_map(lambda x: x, rest)))
        args, kwargs = call.rebuild(objs, list(dyn))
        with _compat.nnx_unconstrained(), _concrete_counters():
            module = call.ctor(*args, **kwargs)
        found["constructed"] = True
        if not isinstance(module, nnx.Module):
            got = (f"an array of shape {tuple(module.shape)}" if hasattr(module, "shape")
                   else f"{type(module).__name__} {str(module)[:60]!r}")
            raise TypeError(call_lib.NEITHER.format(
                fn=fn, name=call_lib.name_of(call.ctor), linen="",
                problem=f"called with the arguments given, it returned {got}, not an "
                        "nnx.Module",
            ))
        with nnx.split_context(update) as inner:  # (3)
            graphdef, state = inner.split(module)
        found["graphdef"] = graphdef
        found["state"] = nnx.to_flat_state(state)
        found["rngs"] = [nnx.to_flat_state(nnx.state(o)) for o in objs]
        outs = []
        for flat in [found["state"], *found["rngs"]]:
            for _, leaf in flat:
                value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
                if specs.is_array_like(value):
                    outs.append(value)
        return outs

    abstract_keys = [specs.to_spec(k) for k in call.keys()]
    with gc_pause.paused():
        try:
            closed = jax.make_jaxpr(run)(abstract_keys, list(call.inputs))
        except Exception as e:
            clearer = None if "constructed" in found else call.failed(e, fn=fn)
            if clearer is None:
                raise
            raise clearer from e
        analysis = slicing.Analysis(closed, len(call.streams)) if record else None

    counter = iter(range(len(closed.jaxpr.outvars)))
    variables: dict = {}
    records: dict = {}
    entries = []
    for state_path, leaf in found["state"]:
        variable = leaf if isinstance(leaf, nnx.Variable) else None
        value = leaf.get_value() if variable is not None else leaf
        if not specs.is_array_like(value):
            entries.append(_Entry(state_path, variable, None, None, value))
            continue
        index = next(counter)
        aval = closed.jaxpr.outvars[index].aval
        abstract = _abstract(aval)
        col, path = state_lib.qualified(state_path, leaf)
        qualified = paths.SEP.join((col,) + path)
        state_lib.insert(variables, col, path, state_lib.box(abstract, variable, logical))
        if analysis is not None:
            records[(col, path)] = _record(analysis.slice(index), col, path, abstract,
                                           call.streams)
        entries.append(_Entry(state_path, variable, qualified, index))
    rng_entries = []
    for flat in found["rngs"]:
        group = []
        for state_path, leaf in flat:
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            output = next(counter) if specs.is_array_like(value) else None
            group.append(_Entry(state_path, leaf, None, output))
        rng_entries.append(tuple(group))
    return Traced(call, variables, records, analysis, found["graphdef"], tuple(entries),
                  tuple(rng_entries), update)


def _abstract(aval: Any) -> jax.ShapeDtypeStruct:
    """A variable's shape and dtype, with the sharding it was created with when that
    shards something (``out_sharding=`` on an explicit mesh): an annotation of its own."""
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        sharding = None
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding)


def _record(s: slicing.Slice, col: str, path: tuple[str, ...], abstract: Any,
            streams: tuple[str, ...]) -> Record:
    stack = s.stacked
    layer = (jax.ShapeDtypeStruct(abstract.shape[len(stack):], abstract.dtype)
             if stack and abstract.shape[:len(stack)] == stack else abstract)
    return Record(col, path, s.cut is not None, None if s.cut is None else s.cut.count,
                  None if s.cut is None else streams[s.cut.root], s.program, layer)


def build_module(traced: Traced, variables: Any) -> Any:
    """The module with the leaves of ``variables`` (abstract or real, maybe boxed)."""
    return traced.module({p: paths.unbox(v) for p, v in paths.flatten(variables)[0]})
