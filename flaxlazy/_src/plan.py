"""The plan: for every variable leaf, where its value comes from, its key and placement.

A plan is plain data built from an abstract trace (Linen or NNX entrance) and the user's
initializer tree; it runs nothing. ``engine.execute`` turns it into arrays. Each leaf's
value comes from the first source of ``sources.registry`` that recognizes the leaf's
initializer-tree value and plans it (the ``Source`` interface: ``sources/kinds.py``): the
module's own initializer (``flax``), an override (``initializer``), an ``array``, a
``checkpoint``, or the ``traced`` fallback. Sources read what they need to check a leaf
(a checkpoint's metadata), never its data.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

from flaxlazy._src import paths
from flaxlazy._src import programs
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import registry
from flaxlazy._src.sources.kinds import ARRAY  # noqa: F401 - the kinds, as plan.ARRAY...
from flaxlazy._src.sources.kinds import CHECKPOINT  # noqa: F401
from flaxlazy._src.sources.kinds import FLAX  # noqa: F401
from flaxlazy._src.sources.kinds import INITIALIZER  # noqa: F401
from flaxlazy._src.sources.kinds import TRACED  # noqa: F401

PARAMS = "params"


class Leaf(NamedTuple):
    """The plan for one leaf of the variables tree.

    Attributes:
      path: the collection-qualified path, e.g. ``"params/Dense_0/kernel"``.
      shape: the leaf's shape.
      dtype: the leaf's dtype.
      source: the kind of the source that makes it (``"flax"``, ``"initializer"``,
        ``"array"``, ``"checkpoint"``, ``"traced"``...; ``sources.registry``).
      key: the uint32 folded into the root key of ``stream`` to make this leaf's key, or
        None where the leaf needs no key (or gets it inside the traced run).
      sharding: where the leaf is placed (None: JAX's default device).
      program: for ``"flax"`` and ``"initializer"``, the traced ``fn(key) -> array``
        (``fn()`` where the leaf takes no key) with its compilation-cache key.
      value: what the source executes from: for ``"array"``, the array; for
        ``"checkpoint"``, ``(source, entry)``.
      rule: the label of the initializer rule that matched, if any.
      stream: the RNG stream whose root key ``key`` is folded into (Linen: ``params``;
        NNX: the stream the module drew from).
      layers: for a leaf stacked by ``nn.scan``/``nn.vmap`` with a key per layer, the
        sizes of its leading layer axes: each layer's key is the stream's root key split
        per axis (``jax.random.split(k, n)[i]``), then ``key`` folded in, and ``program``
        takes those keys (shape ``layers`` + the root key's). ``()`` otherwise.
      layer: with ``layers``, one layer's ``fn(key)``.
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
    layers: tuple[int, ...] = ()
    layer: programs.Program | None = None


class Plan(NamedTuple):
    """A whole materialization plan.

    Attributes:
      traced: the abstract trace it was built from.
      leaves: one ``Leaf`` per leaf of the variables tree, in tree order.
      treedef: the tree structure (Flax boxes are leaves of it).
      abstract: the abstract leaves (ShapeDtypeStructs or boxes around them).
    """

    traced: Any  # linen.call.Traced or nnx.trace.Traced
    leaves: tuple[Leaf, ...]
    treedef: Any
    abstract: tuple

    def counts(self) -> dict[str, int]:
        """How many leaves each source produces."""
        out: dict[str, int] = {}
        for leaf in self.leaves:
            out[leaf.source] = out.get(leaf.source, 0) + 1
        return out


def _record_index(traced: Any) -> dict[str, Any]:
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


def _plan_leaf(query: kinds.Query, memos: dict[str, dict]
               ) -> tuple[kinds.Source, kinds.Planned]:
    """The first source that recognizes the leaf's initializer-tree value and plans it."""
    value = query.rule.value if query.rule is not None else None
    for source in registry.SOURCES:
        if source.recognizes(value):
            planned = source.plan(query, memos[source.kind])
            if planned is not None:
                return source, planned
    raise TypeError(kinds.NOT_A_VALUE.format(label=query.rule.label, path=query.path,
                                             value=value))


def build(
    traced: Any,
    *,
    initializers: Any = None,
    shardings: Callable[[str, Any], Any] | None = None,
) -> Plan:
    """Builds the plan for a traced init.

    Args:
      traced: an entrance's abstract trace (``linen.call.trace``, ``nnx.trace.trace``):
        ``variables``, ``records`` and the roots keys derive from.
      initializers: the user's initializer tree (patterns over paths in ``params``).
      shardings: ``shardings(path, abstract_leaf) -> Sharding | None`` per leaf.

    Returns:
      The ``Plan``.

    Raises:
      ValueError: an initializer rule that matches nothing, or a value of the wrong
        shape or dtype, naming the path (and what each source checks before reading).
      TypeError: an initializer-tree value no source recognizes, naming the path.
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

    memos: dict[str, dict] = {source.kind: {} for source in registry.SOURCES}
    leaves = []
    for path, abstract_leaf in flat:
        value = paths.unbox(abstract_leaf)
        shape, dtype = tuple(value.shape), value.dtype
        sharding = shardings(path, abstract_leaf) if shardings else None
        rec, sub = _find_record(index, path)
        rule = chosen.get(path[len(prefix):]) if path.startswith(prefix) else None
        query = kinds.Query(path, shape, dtype, rule, rec, sub, root_key, traced)
        source, planned = _plan_leaf(query, memos)
        leaves.append(
            Leaf(path, shape, dtype, source.kind, planned.key, sharding, planned.program,
                 planned.value, rule.label if rule is not None else None,
                 planned.stream if planned.key is not None else None,
                 planned.layers, planned.layer)
        )
    for source in registry.SOURCES:
        source.finish(leaves, memos[source.kind])
    return Plan(traced, tuple(leaves), treedef, tuple(leaf for _, leaf in flat))


