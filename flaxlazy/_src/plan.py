"""The plan: for every variable leaf, where its value comes from, its key and placement.

A plan is plain data built from an abstract trace and the user's initializer tree; it
runs nothing. ``engine.execute`` turns it into arrays.

Sources of a leaf's value:

* ``"flax"``: the module's own initializer, replayed alone from its recorded recipe
  (identical to ``module.init``);
* ``"initializer"``: an override from ``initializers=``, drawn with a key derived from the
  root ``params`` key and the leaf's path;
* ``"array"``: an array given in ``initializers=``, used as is;
* ``"checkpoint"``: read from an Orbax checkpoint (``from_checkpoint``), straight into
  the leaf's sharding;
* ``"traced"``: everything whose recipe is not static (lifted transforms such as
  ``nn.scan``, data-dependent init, variables changed after creation): computed by one
  compiled run of ``module.init`` that returns only these leaves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import checkpoint
from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src import restore
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.linen import recorder as recorder_lib

FLAX = "flax"
INITIALIZER = "initializer"
ARRAY = "array"
CHECKPOINT = "checkpoint"
TRACED = "traced"

PARAMS = "params"
VALUE = "/value"  # where a checkpoint of nnx.state keeps each variable's value
# Domain separation: override keys never coincide with the keys Flax derives itself.
_OVERRIDE_KEY_PREFIX = "flaxlazy.initializer"


class Leaf(NamedTuple):
    """The plan for one leaf of the variables tree.

    Attributes:
      path: the collection-qualified path, e.g. ``"params/Dense_0/kernel"``.
      shape: the leaf's shape.
      dtype: the leaf's dtype.
      source: ``"flax"``, ``"initializer"``, ``"array"`` or ``"traced"`` (module doc).
      key: the uint32 folded into the root key of ``stream`` to make this leaf's key, or
        None where the leaf needs no key (or gets it inside the traced run).
      sharding: where the leaf is placed (None: JAX's default device).
      program: for ``"flax"`` and ``"initializer"``, the traced ``fn(key) -> array``
        (``fn()`` where the leaf takes no key) with its compilation-cache key.
      value: for ``"array"``, the array; for ``"checkpoint"``, ``(source, entry)``.
      rule: the label of the initializer rule that matched, if any.
      stream: the RNG stream whose root key ``key`` is folded into (Linen: ``params``;
        NNX: the stream the module drew from).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    source: str
    key: int | None
    sharding: Any
    program: programs.Program | None
    value: Any
    rule: str | None
    stream: str | None = None


class Plan(NamedTuple):
    """A whole materialization plan.

    Attributes:
      traced: the abstract trace it was built from.
      leaves: one ``Leaf`` per leaf of the variables tree, in tree order.
      treedef: the tree structure (Flax boxes are leaves of it).
      abstract: the abstract leaves (ShapeDtypeStructs or boxes around them).
    """

    traced: linen_call.Traced
    leaves: tuple[Leaf, ...]
    treedef: Any
    abstract: tuple

    def counts(self) -> dict[str, int]:
        """How many leaves each source produces."""
        out: dict[str, int] = {}
        for leaf in self.leaves:
            out[leaf.source] = out.get(leaf.source, 0) + 1
        return out


def override_key(path: str) -> int:
    """The uint32 folded into the root params key for an overridden leaf at ``path``.

    A pure function of the path string: stable across processes and unchanged when other
    layers are added or removed.
    """
    return recorder_lib.static_hash((_OVERRIDE_KEY_PREFIX, path))


def _record_index(traced: linen_call.Traced) -> dict[str, recorder_lib.Record]:
    return {
        paths.SEP.join((col,) + path): rec for (col, path), rec in traced.records.items()
    }


def _find_record(index: Mapping[str, Any], path: str) -> tuple[Any, str]:
    """The record whose variable contains leaf ``path``, and the leaf's path inside it."""
    prefix = path
    while prefix:
        if prefix in index:
            return index[prefix], path[len(prefix) + 1 :]
        if paths.SEP not in prefix:
            break
        prefix = prefix.rsplit(paths.SEP, 1)[0]
    return None, ""


def _select(tree: Any, sub: str) -> Any:
    if not sub:
        return paths.unbox(tree)
    flat, _ = paths.flatten(tree)
    return paths.unbox(dict(flat)[sub])


def _replay(rec: recorder_lib.Record, sub: str) -> Callable:
    """``fn(key)`` recreating one leaf of a recorded variable (``fn()`` without a key)."""
    init_fn, args, kwargs = rec.init_fn, rec.init_args, rec.init_kwargs
    if rec.takes_key:
        return lambda key: _select(init_fn(key, *args, **kwargs), sub)
    return lambda: _select(init_fn(*args, **kwargs), sub)


def _replays_alone(fn: Callable, key_spec: Any, shape, dtype) -> programs.Program | None:
    """``fn`` traced alone, if it traces on its own (no leaked tracers, no scope access).

    An initializer can close over values of the traced forward pass (data-dependent init)
    or call back into its module; such a leaf is left to the traced run (None).
    """
    try:
        program = programs.trace(fn, *([] if key_spec is None else [key_spec]))
    except Exception:  # noqa: BLE001 - any failure means "not replayable alone"
        return None
    return program if _is_plain(program) and _makes(program, shape, dtype) else None


_PLAIN = jax.tree_util.tree_structure(0)


def _is_plain(program: programs.Program) -> bool:
    return program.out_tree == _PLAIN


def _makes(program: programs.Program, shape, dtype) -> bool:
    """Whether a one-output program makes exactly this leaf, from its key alone.

    A tracer of the finished abstract trace shows up as a constant: data-dependent.
    """
    (out,) = program.jaxpr.out_avals
    return not programs.leaked_tracers(program) and (
        (tuple(out.shape), out.dtype) == (tuple(shape), dtype)
    )


def _leaf_program(rec: recorder_lib.Record, sub: str, root_key: Any, shape, dtype):
    """The program of one leaf: the one recorded during the trace, or a fresh trace.

    A variable of one array (boxed or not) reuses the program traced while recording;
    a leaf inside a larger variable value is traced alone.
    """
    program = rec.program
    if program is not None and not sub and program.out_tree.num_leaves == 1:
        return program.as_single_output() if _makes(program, shape, dtype) else None
    return _replays_alone(_replay(rec, sub), root_key if rec.takes_key else None, shape, dtype)


def _layer_axes(full: tuple[int, ...], layer: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes that stacking (``nn.scan``/``nn.vmap``) added to a per-layer shape."""
    extra = len(full) - len(layer)
    if extra <= 0:
        return None
    if full[extra:] == layer:
        return tuple(range(extra))
    if extra == 1:
        for axis in range(len(full)):
            if full[:axis] + full[axis + 1 :] == layer:
                return (axis,)
    return None


def _override_fn(init: Callable, shape, dtype, layer_shape) -> Callable:
    """``fn(key)`` drawing a leaf from a user initializer, one layer at a time if stacked."""
    if layer_shape is None:
        return lambda key: init(key, shape, dtype)
    axes = _layer_axes(shape, layer_shape)
    counts = [shape[a] for a in axes]

    def fn(key):
        keys = jax.random.split(key, int(np.prod(counts))).reshape(*counts, *key.shape)
        def draw(k):
            return init(k, layer_shape, dtype)

        for _ in axes:
            draw = jax.vmap(draw)
        out = draw(keys)
        return jnp.moveaxis(out, tuple(range(len(axes))), axes)

    return fn


def _check_abstract(path: str, got: Any, shape, dtype, what: str) -> None:
    got_shape, got_dtype = tuple(np.shape(got)), getattr(got, "dtype", None)
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise ValueError(
            f"initializers: {what} for {path!r} gives {_fmt(got_shape, got_dtype)}, "
            f"but the parameter is {_fmt(shape, dtype)}."
            + (
                " Cast it with .astype(...) first."
                if got_shape == tuple(shape)
                else ""
            )
        )


def _fmt(shape, dtype) -> str:
    name = jnp.dtype(dtype).name if dtype is not None else "?"
    return f"{name}[{','.join(map(str, shape))}]"


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _checkpoint_entry(source, path: str, shape, dtype, entries: dict) -> str:
    entry = source.entry(path[len(PARAMS) + 1 :])
    if entry not in entries and entry + VALUE in entries:
        entry += VALUE  # a checkpoint of nnx.state(model)
    found = entries.get(entry)
    if found is None:
        hint = ", ".join(repr(e) for e in paths.closest(entry, entries))
        raise ValueError(
            f"from_checkpoint({source.path!r}): {path!r} ({_fmt(shape, dtype)}) maps to "
            f"checkpoint entry {entry!r}, which the checkpoint does not have. Closest "
            f"entries: {hint}. Check `subtree` ({source.subtree!r}) and `rename`."
        )
    if tuple(found.shape) != tuple(shape) or found.dtype != dtype:
        raise ValueError(
            f"from_checkpoint({source.path!r}): {path!r} is {_fmt(shape, dtype)} in the "
            f"model but checkpoint entry {entry!r} is {_fmt(found.shape, found.dtype)}."
        )
    return entry


BOX_RETURNED = (
    "initializers: {label} returns a Flax {box} for {path!r}; an initializer must return "
    "the plain array. Return the value inside (`box.unbox()`), and give its sharding with "
    "`partition_rules=` (or keep the module's own `nn.with_partitioning` annotation)."
)


def _override(
    rule: rules_lib.Rule, path: str, shape, dtype, layer_shape, root_key, entries, subtree
) -> tuple[str, programs.Program | None, Any, int | None]:
    """(source, program, value, key) for a leaf that ``rule`` overrides."""
    value = rule.value
    if restore.is_source(value):
        value = value.with_default_subtree(subtree)
        entry = _checkpoint_entry(value, path, shape, dtype, entries(value.path))
        return CHECKPOINT, None, (value, entry), None
    if _is_array(value):
        _check_abstract(path, value, shape, dtype, f"the array from {rule.label}")
        return ARRAY, None, value, None
    if paths.is_box(value):
        raise ValueError(BOX_RETURNED.format(label=rule.label, box=type(value).__name__,
                                             path=path))
    if not callable(value):
        raise TypeError(
            f"initializers: {rule.label} maps {path!r} to {value!r}; expected an initializer "
            "`(key, shape, dtype) -> Array`, an array of the parameter's shape, or None."
        )
    fn = _override_fn(value, shape, dtype, layer_shape)
    try:
        program = programs.trace(fn, root_key)
    except Exception as e:  # noqa: BLE001 - re-raised with the path that caused it
        raise ValueError(
            f"initializers: {rule.label} failed for {path!r} ({_fmt(shape, dtype)}"
            + (f", one layer {_fmt(layer_shape, dtype)}" if layer_shape else "")
            + f"): {type(e).__name__}: {e}"
        ) from e
    if not _is_plain(program):
        out = jax.tree_util.tree_unflatten(program.out_tree, program.jaxpr.out_avals)
        if paths.is_box(out):
            raise ValueError(BOX_RETURNED.format(label=rule.label, box=type(out).__name__,
                                                 path=path))
        raise ValueError(
            f"initializers: {rule.label} returns {type(out).__name__} {out!r} for {path!r}; "
            "an initializer must return one array."
        )
    if programs.leaked_tracers(program):
        raise ValueError(
            f"initializers: {rule.label} for {path!r} uses a value traced inside "
            "module.init (a leaked tracer); initializers must depend only on their key."
        )
    (got,) = program.jaxpr.out_avals
    _check_abstract(path, got, shape, dtype, f"the initializer from {rule.label}")
    return INITIALIZER, program, None, override_key(path)


def build(
    traced: linen_call.Traced,
    *,
    initializers: Any = None,
    shardings: Callable[[str, Any], Any] | None = None,
) -> Plan:
    """Builds the plan for a traced init.

    Args:
      traced: the result of ``abstract.trace``.
      initializers: the user's initializer tree (patterns over paths in ``params``).
      shardings: ``shardings(path, abstract_leaf) -> Sharding | None`` per leaf.

    Returns:
      The ``Plan``.

    Raises:
      ValueError: an initializer rule that matches nothing, or a value of the wrong
        shape or dtype, naming the path.
    """
    flat, treedef = paths.flatten(traced.variables)
    rules = rules_lib.normalize(initializers, what="initializers")
    prefix = PARAMS + paths.SEP
    param_paths = [p[len(prefix):] for p, _ in flat if p.startswith(prefix)]
    if rules and not param_paths:
        raise ValueError("initializers: the model has no parameters in the 'params' collection.")
    chosen = rules_lib.assign(rules, param_paths, what="initializers")
    index = _record_index(traced)
    root_key = traced.override_root
    if chosen and root_key is None:
        raise ValueError(
            "initializers: overriding parameters needs a 'params' key in `rngs` (NNX: a "
            "'params' or 'default' stream in the nnx.Rngs)."
        )

    entries = functools.cache(checkpoint.entries)
    leaves = []
    for path, abstract_leaf in flat:
        value = paths.unbox(abstract_leaf)
        shape, dtype = tuple(value.shape), value.dtype
        sharding = shardings(path, abstract_leaf) if shardings else None
        rec, sub = _find_record(index, path)
        rule = chosen.get(path[len(prefix):]) if path.startswith(prefix) else None
        if rule is not None and rule.value is not None:
            layer_shape = None
            if rec is not None and not sub:
                layer_shape = tuple(np.shape(paths.unbox(rec.output)))
                if layer_shape == shape or _layer_axes(shape, layer_shape) is None:
                    layer_shape = None
            source, program, array, key = _override(
                rule, path, shape, dtype, layer_shape, root_key, entries,
                traced.checkpoint_subtree,
            )
            stream = traced.override_stream
        elif rec is not None and rec.replayable and (
            program := _leaf_program(rec, sub, root_key, shape, dtype)
        ):
            source, array, key, stream = FLAX, None, rec.fold, rec.stream
        else:
            source, program, array, key = TRACED, None, None, None
        leaves.append(
            Leaf(path, shape, dtype, source, key, sharding, program, array,
                 rule.label if rule is not None else None,
                 stream if key is not None else None)
        )
    _report_unconsumed(leaves, entries)
    return Plan(traced, tuple(leaves), treedef, tuple(leaf for _, leaf in flat))


def _report_unconsumed(leaves: list[Leaf], entries: Callable) -> None:
    consumed: dict[Any, set[str]] = {}
    for leaf in leaves:
        if leaf.source == CHECKPOINT:
            source, entry = leaf.value
            consumed.setdefault(source, set()).add(entry)
    # The model's other variables (a checkpoint of nnx.state holds them too).
    others = [leaf.path.split(paths.SEP, 1)[-1] for leaf in leaves
              if not leaf.path.startswith(PARAMS + paths.SEP)]
    known = set(others) | {p + VALUE for p in others}
    for source, used in consumed.items():
        source.report_unconsumed(list(entries(source.path)), used, known)
