"""``from_checkpoint``: parameters read from an Orbax checkpoint through the initializer tree.

A ``CheckpointSource`` is a value in ``initializers=``: the parameters its pattern
matches are not drawn at all but read from the checkpoint, each straight into its
target sharding, while everything else is initialized as usual.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax

from flaxlazy._src import checkpoint
from flaxlazy._src import paths

UNCONSUMED = (
    "from_checkpoint({path!r}): {n} checkpoint entr{ies} under {where} not used by the "
    "model: {listing}. Narrow `subtree`, add a `rename` rule, or {fix}."
)


class CheckpointSource(NamedTuple):
    """Where matched parameters come from (see ``from_checkpoint``)."""

    path: str
    subtree: str
    rename: tuple[tuple[str, str], ...]
    strict: bool

    def entry(self, param_path: str) -> str:
        """The checkpoint entry for a parameter at ``param_path`` (inside ``params``)."""
        for pattern, replacement in self.rename:
            match = re.fullmatch(pattern, param_path)
            if match:
                param_path = match.expand(replacement)
                break
        return f"{self.subtree}{paths.SEP}{param_path}" if self.subtree else param_path

    def report_unconsumed(self, entries: Sequence[str], consumed: set[str]) -> None:
        """Warns (or raises with ``strict``) about entries under ``subtree`` left unread."""
        prefix = self.subtree + paths.SEP if self.subtree else ""
        left = sorted(e for e in entries if e.startswith(prefix) and e not in consumed)
        if not left:
            return
        shown = ", ".join(repr(e) for e in left[:8]) + (", ..." if len(left) > 8 else "")
        message = UNCONSUMED.format(
            path=self.path, n=len(left), ies="y" if len(left) == 1 else "ies",
            where=repr(self.subtree) if self.subtree else "the checkpoint root",
            listing=shown,
            fix="drop strict=True to only warn" if self.strict else
            "pass strict=True to make this an error",
        )
        if self.strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=4)


def from_checkpoint(
    path: str | os.PathLike,
    *,
    subtree: str = "params",
    rename: Sequence[tuple[str, str]] | None = None,
    strict: bool = False,
) -> CheckpointSource:
    """Parameters read from an Orbax checkpoint, as a value in ``initializers=``.

    The model parameter at path ``p`` (inside ``params``, e.g. ``"encoder/Dense_0/kernel"``)
    is read from checkpoint entry ``subtree + "/" + p``, directly into the parameter's
    sharding: no random values are drawn for it and no host holds a full copy of a sharded
    parameter. ``rename`` rules are applied to ``p`` first.

    Args:
      path: the checkpoint directory (written by ``flaxlazy.save`` or Orbax).
      subtree: the prefix of the params inside the checkpoint: ``"params"`` for a saved
        variables dict or train state, ``""`` for a bare params tree.
      rename: an ordered list of ``(regex, replacement)``; the first regex that fully
        matches ``p`` rewrites it with ``re.Match.expand`` (``\\1`` groups), e.g.
        ``[(r"encoder/(.*)", r"backbone/\\1")]`` reads this model's ``encoder`` from a
        checkpoint whose module was called ``backbone``.
      strict: checkpoint entries under ``subtree`` that no parameter reads are a
        ``UserWarning`` by default, a ``ValueError`` with ``strict=True``.

    Returns:
      A ``CheckpointSource`` to use as an ``initializers=`` value.

    Raises:
      (at materialization) ValueError: a matched parameter missing from the checkpoint,
        or with another shape or dtype, naming the model path, the checkpoint entry and
        both shapes.

    Examples:
      >>> import flaxlazy
      >>> src = flaxlazy.from_checkpoint("/tmp/ckpt", rename=[(r"encoder/(.*)", r"backbone/\\1")])
      >>> src.entry("encoder/Dense_0/kernel")
      'params/backbone/Dense_0/kernel'
    """
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TypeError(f"from_checkpoint: `path` must be a directory path, got {path!r}.")
    path = os.fspath(path)
    rename = tuple((str(a), str(b)) for a, b in (rename or ()))
    for pattern, _ in rename:
        re.compile(pattern)  # fail early on a bad regex
    return CheckpointSource(path, subtree.strip(paths.SEP), rename, strict)


def is_source(x: Any) -> bool:
    return isinstance(x, CheckpointSource)


def restore(path: str, target: Any) -> Any:
    """Reads a whole checkpointed tree into the structure and shardings of ``target``.

    ``target`` is an abstract tree, typically ``flaxlazy.abstract_train_state(...)`` or
    ``flaxlazy.abstract_init(..., mesh=...)``: each leaf is read straight into its
    ``sharding`` (the default device where it has none). Flax boxes in ``target`` are
    kept around the restored arrays.

    Args:
      path: the checkpoint directory.
      target: a pytree of ``jax.ShapeDtypeStruct``s (or arrays) naming what to read.

    Returns:
      ``target`` with every leaf replaced by the array read from the checkpoint.

    Raises:
      ValueError: a leaf missing from the checkpoint or of another shape or dtype.

    Examples:
      >>> import tempfile, jax.numpy as jnp, flaxlazy
      >>> d = tempfile.mkdtemp() + "/ckpt"
      >>> flaxlazy.save(d, {"w": jnp.arange(3.0)})
      >>> flaxlazy.restore(d, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})["w"]
      Array([0., 1., 2.], dtype=float32)
    """
    flat, treedef = paths.flatten(target)
    targets = {}
    for name, leaf in flat:
        array = leaf.value if paths.is_box(leaf) else leaf
        targets[name] = jax.ShapeDtypeStruct(
            array.shape, array.dtype, sharding=getattr(array, "sharding", None)
        )
    arrays = checkpoint.read(path, targets)
    leaves = [
        leaf.replace_boxed(arrays[name]) if paths.is_box(leaf) else arrays[name]
        for name, leaf in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)
