"""Parameters read from an Orbax checkpoint (``from_checkpoint`` values in ``initializers=``).

Planning maps each matched parameter to its checkpoint entry and checks its shape and
dtype; execution reads every entry of one checkpoint in one batched read, straight into
each leaf's sharding. Entries no parameter reads are reported (a warning, or an error
with ``strict=True``), except the model's own non-parameter variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from flaxlazy._src import checkpoint
from flaxlazy._src import paths
from flaxlazy._src import restore
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.sources import kinds

PARAMS = paths.PARAMS
VALUE = "/value"  # where a checkpoint of nnx.state keeps each variable's value


def accepts(value: Any) -> bool:
    return restore.is_source(value)


def _checkpoint_entry(source, path: str, shape, dtype, entries: dict) -> str:
    entry = source.entry(path[len(PARAMS) + 1 :])
    if entry not in entries and entry + VALUE in entries:
        entry += VALUE  # a checkpoint of nnx.state(model)
    found = entries.get(entry)
    if found is None:
        hint = ", ".join(repr(e) for e in paths.closest(entry, entries))
        raise ValueError(
            f"from_checkpoint({source.path!r}): {path!r} ({kinds.fmt(shape, dtype)}) maps to "
            f"checkpoint entry {entry!r}, which the checkpoint does not have. Closest "
            f"entries: {hint}. Check `subtree` ({source.subtree!r}) and `rename`."
        )
    if tuple(found.shape) != tuple(shape) or found.dtype != dtype:
        raise ValueError(
            f"from_checkpoint({source.path!r}): {path!r} is {kinds.fmt(shape, dtype)} in the "
            f"model but checkpoint entry {entry!r} is {kinds.fmt(found.shape, found.dtype)}."
        )
    return entry


def plan(rule: rules_lib.Rule, path: str, shape, dtype, entries: Callable, subtree: str
         ) -> tuple[str, None, tuple, None]:
    """(source, program, value, key) of a leaf read from a checkpoint."""
    source = rule.value.with_default_subtree(subtree)
    entry = _checkpoint_entry(source, path, shape, dtype, entries(source.path))
    return kinds.CHECKPOINT, None, (source, entry), None


def report_unconsumed(leaves: list, entries: Callable) -> None:
    consumed: dict[Any, set[str]] = {}
    for leaf in leaves:
        if leaf.source == kinds.CHECKPOINT:
            source, entry = leaf.value
            consumed.setdefault(source, set()).add(entry)
    # The model's other variables (a checkpoint of nnx.state holds them too).
    others = [leaf.path.split(paths.SEP, 1)[-1] for leaf in leaves
              if not leaf.path.startswith(PARAMS + paths.SEP)]
    known = set(others) | {p + VALUE for p in others}
    for source, used in consumed.items():
        source.report_unconsumed(list(entries(source.path)), used, known)


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Every checkpoint leaf, one batched read per checkpoint."""
    del context
    reads: dict[str, dict[str, tuple[int, jax.ShapeDtypeStruct]]] = {}
    for i in indices:
        leaf = plan.leaves[i]
        source, entry = leaf.value
        target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        reads.setdefault(source.path, {})[entry] = (i, target)
    out = {}
    for path, wanted in reads.items():
        arrays = checkpoint.read(path, {entry: target for entry, (_, target) in wanted.items()})
        for entry, (i, _) in wanted.items():
            out[i] = arrays[entry]
    return out
