"""``from_checkpoint``: parameters read from an Orbax checkpoint through the initializer tree.

A ``CheckpointSource`` is a value in ``initializers=``: the parameters its pattern
matches are not drawn at all but read from the checkpoint, each straight into its
target sharding, while everything else is initialized as usual.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
from flax import nnx

from flaxlazy._src import _compat
from flaxlazy._src import paths
from flaxlazy._src import warn
from flaxlazy._src.checkpoint import orbax_io

UNCONSUMED = (
    "from_checkpoint({path!r}): {n} checkpoint entr{ies} under {where} not used by the "
    "model: {listing}. If the model should read them, add a `rename` rule or narrow "
    "`subtree`; {fix}."
)
_BAD_TARGET = (
    "restore: target leaf {name!r} is {leaf!r} ({kind}), not an array or "
    "jax.ShapeDtypeStruct; `target` names the shape, dtype and sharding of every entry to "
    "read. Pass an abstract tree (flaxlazy.abstract_train_state(...), "
    "flaxlazy.abstract_init(...) or jax.eval_shape(lambda: tree))."
)


class CheckpointSource(NamedTuple):
    """Where matched parameters come from (see ``from_checkpoint``)."""

    path: str
    subtree: str | None  # None: the framework's default (Linen "params", NNX "")
    rename: tuple[tuple[str, str], ...]
    strict: bool | None

    def with_default_subtree(self, subtree: str) -> CheckpointSource:
        """This source with ``subtree`` resolved (Linen: ``"params"``, NNX: ``""``)."""
        return self if self.subtree is not None else self._replace(subtree=subtree)

    def entry(self, param_path: str) -> str:
        """The checkpoint entry for a parameter at ``param_path`` (inside ``params``)."""
        for pattern, replacement in self.rename:
            match = re.fullmatch(pattern, param_path)
            if match:
                param_path = match.expand(replacement)
                break
        return f"{self.subtree}{paths.SEP}{param_path}" if self.subtree else param_path

    def report_unconsumed(self, entries: Sequence[str], consumed: set[str],
                          known: set[str] = frozenset()) -> None:
        """Warns (raises with ``strict=True``, says nothing with ``strict=False``) about
        entries under ``subtree`` left unread.

        ``known`` entries are the model's own non-parameter variables (an NNX checkpoint
        holds them beside the parameters): not reading them is expected.
        """
        prefix = self.subtree + paths.SEP if self.subtree else ""
        left = sorted(e for e in entries
                      if e.startswith(prefix) and e not in consumed and e not in known)
        if not left or self.strict is False:
            return
        shown = ", ".join(repr(e) for e in left[:8]) + (", ..." if len(left) > 8 else "")
        message = UNCONSUMED.format(
            path=self.path, n=len(left), ies="y" if len(left) == 1 else "ies",
            where=repr(self.subtree) if self.subtree else "the checkpoint root",
            listing=shown,
            fix="if it leaves them out on purpose (a new head), pass strict=False, or drop "
            "strict=True to only warn" if self.strict else
            "if it leaves them out on purpose (a new head), pass strict=False to silence "
            "this, or strict=True to make it an error",
        )
        if self.strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=warn.user_stacklevel())


def from_checkpoint(
    path: str | os.PathLike,
    *,
    subtree: str | None = None,
    rename: Sequence[tuple[str, str]] | None = None,
    strict: bool | None = None,
) -> CheckpointSource:
    """Parameters read from an Orbax checkpoint, as a value in ``initializers=``.

    The model parameter at path ``p`` (inside ``params``, e.g. ``"encoder/Dense_0/kernel"``)
    is read from checkpoint entry ``subtree + "/" + p``, directly into the parameter's
    sharding: no random values are drawn for it and no host holds a full copy of a sharded
    parameter. ``rename`` rules are applied to ``p`` first.

    Args:
      path: the checkpoint directory (written by ``flaxlazy.save`` or Orbax).
      subtree: the prefix of the params inside the checkpoint: ``"params"`` for a saved
        variables dict or train state, ``""`` for a bare params tree. Default:
        ``"params"`` for a Linen model, ``""`` for an NNX one (a checkpoint of
        ``nnx.state(model)``, whose entries end in ``/value``: ``blocks/0/up/kernel`` is
        read from ``blocks/0/up/kernel/value`` when the checkpoint has no plain entry).
      rename: an ordered list of ``(regex, replacement)``; the first regex that fully
        matches ``p`` rewrites it with ``re.Match.expand`` (``\\1`` groups), e.g.
        ``[(r"encoder/(.*)", r"backbone/\\1")]`` reads this model's ``encoder`` from a
        checkpoint whose module was called ``backbone``.
      strict: checkpoint entries under ``subtree`` that no parameter reads are a
        ``UserWarning`` by default (None), a ``ValueError`` with ``strict=True``, and
        expected with ``strict=False`` (a head left out to be initialized anew).

    Returns:
      A ``CheckpointSource`` to use as an ``initializers=`` value.

    Raises:
      TypeError: ``path`` is not a path, ``subtree`` not a string, or a ``rename`` rule
        not a pair of strings (naming the argument).
      ValueError: a ``rename`` regex that does not compile, or a replacement that refers
        to a group its regex lacks (``\\3``, ``\\g<name>``), naming the rule.
      (at materialization) ValueError: a matched parameter missing from the checkpoint,
        or with another shape or dtype, naming the model path, the checkpoint entry and
        both shapes; or a damaged checkpoint, or data that differs from what was saved.

    Examples:
      >>> import flaxlazy
      >>> src = flaxlazy.from_checkpoint("/tmp/ckpt", rename=[(r"encoder/(.*)", r"backbone/\\1")])
      >>> src.with_default_subtree("params").entry("encoder/Dense_0/kernel")
      'params/backbone/Dense_0/kernel'
      >>> flaxlazy.from_checkpoint("/tmp/ckpt", rename=[(r"encoder/(.*)", r"backbone/\\2")])
      Traceback (most recent call last):
      ValueError: from_checkpoint: `rename[0]`: the replacement ... does not fit the regex ...
    """
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TypeError(f"from_checkpoint: `path` must be a directory path, got {path!r}.")
    if subtree is not None and not isinstance(subtree, str):
        raise TypeError(
            f"from_checkpoint: `subtree` must be a string, got {subtree!r}: 'params' (the "
            "default) for a saved variables dict or train state, '' for a bare params tree."
        )
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(
            f"from_checkpoint: `strict` must be None (warn about unread entries), True "
            f"(raise) or False (expect them), got {strict!r}."
        )
    if isinstance(rename, str | Mapping):
        raise TypeError(
            f"from_checkpoint: `rename` must be a list of (regex, replacement) pairs, got "
            f"{rename!r}" + (" (for a dict, pass list(rename.items()))." if isinstance(
                rename, Mapping) else ".")
        )
    rename = tuple(_check_rename(rule, i) for i, rule in enumerate(rename or ()))
    subtree = None if subtree is None else subtree.strip(paths.SEP)
    return CheckpointSource(os.fspath(path), subtree, rename, strict)


def _check_rename(rule: Any, index: int) -> tuple[str, str]:
    """One ``rename`` rule as a checked ``(regex, replacement)`` pair of strings."""
    where = f"from_checkpoint: `rename[{index}]`"
    if isinstance(rule, str) or not isinstance(rule, tuple | list):
        raise TypeError(
            f"{where} must be a (regex, replacement) pair, got {rule!r}. Maybe you wrote "
            "rename=(regex, replacement) instead of rename=[(regex, replacement)]?"
        )
    if len(rule) != 2:
        raise ValueError(
            f"{where} must be a (regex, replacement) pair, got {len(rule)} items: {rule!r}."
        )
    pattern, replacement = rule
    if not isinstance(pattern, str) or not isinstance(replacement, str):
        raise TypeError(f"{where} must hold two strings, got {rule!r}.")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: the regex {pattern!r} does not compile: {e}.") from None
    # Expand the template on a match of a regex with the same groups: this raises for a
    # group the regex lacks (\3, \g<name>) or a bad escape, as a real match would later.
    names = {number: name for name, number in regex.groupindex.items()}
    groups = range(1, regex.groups + 1)
    same_groups = "".join(f"(?P<{names[g]}>)" if g in names else "()" for g in groups)
    try:
        re.fullmatch(same_groups, "").expand(replacement)
    except (re.error, IndexError) as e:
        have = [f"\\{g}" for g in groups] + [f"\\g<{name}>" for name in regex.groupindex]
        raise ValueError(
            f"{where}: the replacement {replacement!r} does not fit the regex {pattern!r}: "
            f"{e}. The regex has the groups: {', '.join(have) or 'none'}."
        ) from None
    return pattern, replacement


def is_source(x: Any) -> bool:
    return isinstance(x, CheckpointSource)


def restore(path: str | os.PathLike, target: Any) -> Any:
    """Reads a whole checkpointed tree into the structure and shardings of ``target``.

    ``target`` is an abstract tree, typically ``flaxlazy.abstract_train_state(...)`` or
    ``flaxlazy.abstract_init(..., mesh=...)``: each leaf is read straight into its
    ``sharding`` (the default device where it has none). Flax boxes in ``target`` are
    kept around the restored arrays. A ``None`` in ``target`` stays ``None`` where the
    checkpoint has nothing (``save`` stores nothing for ``None``). An NNX module or
    optimizer (e.g. from ``abstract_init``) is read as ``save`` wrote it,
    ``nnx.state(target)``, and a new object of the same graph is returned: a variable
    reachable under two attributes (tied weights) is read once and stays shared.

    Args:
      path: the checkpoint directory.
      target: a pytree of ``jax.ShapeDtypeStruct``s (or arrays) naming what to read.

    Returns:
      ``target`` with every leaf replaced by the array read from the checkpoint.

    Raises:
      TypeError: a leaf of ``target`` is not an array or ``jax.ShapeDtypeStruct`` (a
        Python number, a string, or ``None`` where the checkpoint has data), naming it.
      ValueError: a leaf missing from the checkpoint or of another shape or dtype; or a
        damaged checkpoint, or data that differs from what was saved (see ``read``).

    Examples:
      >>> import tempfile, jax.numpy as jnp, flaxlazy
      >>> d = tempfile.mkdtemp() + "/ckpt"
      >>> flaxlazy.save(d, {"w": jnp.arange(3.0)})
      >>> flaxlazy.restore(d, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})["w"]
      Array([0., 1., 2.], dtype=float32)
      >>> flaxlazy.restore(d, {"w": 3})
      Traceback (most recent call last):
      TypeError: restore: target leaf 'w' is 3 (int), not an array or jax.ShapeDtypeStruct...
    """
    if orbax_io.nnx_object(target):
        graphdef, state = nnx.split(target)  # shared variables appear once in ``state``
        return nnx.merge(graphdef, restore(path, state))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=lambda x: x is None or paths.is_box(x)
    )
    flat = [(paths.path_str(keypath), leaf) for keypath, leaf in leaves]
    targets = {}
    for name, leaf in flat:
        array = leaf.value if paths.is_box(leaf) else leaf
        if array is None:
            continue  # checked below, against the checkpoint
        if not (hasattr(array, "shape") and hasattr(array, "dtype")) or isinstance(array, str):
            raise TypeError(_BAD_TARGET.format(name=name or "<root>", leaf=array,
                                               kind=type(array).__name__))
        targets[name] = jax.ShapeDtypeStruct(
            array.shape, array.dtype, sharding=getattr(array, "sharding", None)
        )
    nones = [name for name, leaf in flat if leaf is None]
    if nones:
        saved = orbax_io.entries(path)
        for name in nones:
            under = [e for e in saved if not name or e == name or e.startswith(name + paths.SEP)]
            if under:
                raise TypeError(
                    _BAD_TARGET.format(name=name or "<root>", leaf=None, kind="NoneType")
                    + f" The checkpoint has {len(under)} entr{'y' if len(under) == 1 else 'ies'}"
                    f" there: {', '.join(map(repr, under[:3]))}{', ...' if len(under) > 3 else ''}."
                )
    keys = {n: t for n, t in targets.items() if _compat.is_key_array(t)}
    for name, target in keys.items():  # Orbax stores PRNG keys as their raw data
        targets[name] = _key_data_target(target)
    arrays = orbax_io.read(path, targets)
    for name, target in keys.items():
        arrays[name] = jax.random.wrap_key_data(arrays[name],
                                                impl=_compat.key_impl(target.dtype))
    out = [
        leaf if leaf is None
        else leaf.replace_boxed(arrays[name]) if paths.is_box(leaf) else arrays[name]
        for name, leaf in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _key_data_target(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The uint32 raw-data target of a PRNG-key target (one more, unsharded, axis)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(target.shape, target.dtype))
    sharding = target.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        extra = (None,) * (len(data.shape) - len(target.shape))
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, *extra))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
