"""Parameters read from an Orbax checkpoint (``from_checkpoint`` values in ``initializers=``).

Planning maps each matched parameter to its checkpoint entry and checks its shape and
dtype; execution reads every entry of one checkpoint in one batched read, straight into
each leaf's sharding. Entries no parameter reads are reported (a warning, or an error
with ``strict=True``), except the model's own non-parameter variables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from flaxlazy._src import paths
from flaxlazy._src.checkpoint import orbax_io
from flaxlazy._src.checkpoint import restore
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


def _entries(memo: dict, path: str) -> dict:
    """The checkpoint's entries, read once per plan (``memo``: this source's)."""
    if path not in memo:
        memo[path] = orbax_io.entries(path)
    return memo[path]


def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
    """The recipe of a leaf read from a checkpoint: its entry, checked against the
    checkpoint's metadata (nothing read)."""
    source = query.rule.value.with_default_subtree(query.traced.checkpoint_subtree)
    entry = _checkpoint_entry(source, query.path, query.shape, query.dtype,
                              _entries(memo, source.path))
    return kinds.Planned(value=(source, entry))


def report_unconsumed(leaves: Sequence[Any], memo: dict) -> None:
    """Entries of each checkpoint that no leaf reads: a warning, or an error with
    ``strict=True`` (``CheckpointSource.report_unconsumed``)."""
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
        source.report_unconsumed(list(_entries(memo, source.path)), used, known)


def describe(leaf: Any, found: kinds.Found) -> str:
    del found
    return f"checkpoint {leaf.value[1]}"


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Every checkpoint leaf, one batched read per checkpoint; an unplaced leaf is read
    where every other leaf goes (``Context.home``)."""
    default = context.home()
    reads: dict[str, dict[str, tuple[int, jax.ShapeDtypeStruct]]] = {}
    for i in indices:
        leaf = plan.leaves[i]
        source, entry = leaf.value
        target = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                      sharding=leaf.sharding or default)
        reads.setdefault(source.path, {})[entry] = (i, target)
    out = {}
    for path, wanted in reads.items():
        arrays = orbax_io.read(path, {entry: target for entry, (_, target) in wanted.items()})
        for entry, (i, _) in wanted.items():
            out[i] = arrays[entry]
    return out


SOURCE = kinds.Source(kinds.CHECKPOINT, accepts, plan, describe, execute,
                      finish=report_unconsumed)
