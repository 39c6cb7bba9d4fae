"""Parameter paths: the canonical ``"Block_0/Dense_1/kernel"`` form, patterns, suggestions."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

import jax
from flax.core import meta

Pattern = str | re.Pattern

SEP = "/"
PARAMS = "params"


def is_box(x: Any) -> bool:
    """True for Flax partitioning boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``...)."""
    return isinstance(x, meta.AxisMetadata)


def unbox(x: Any) -> Any:
    """The value inside a Flax box, without the sharding constraint ``unbox()`` adds."""
    if isinstance(x, meta.Partitioned):  # LogicallyPartitioned too
        return x.value
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def _key_name(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Iterable[Any]) -> str:
    """The canonical string of a jax key path: names joined by ``/``.

    Examples:
      >>> import jax
      >>> leaves, _ = jax.tree_util.tree_flatten_with_path({"Dense_0": {"kernel": 1}})
      >>> path_str(leaves[0][0])
      'Dense_0/kernel'
    """
    return SEP.join(_key_name(k) for k in keypath)


def flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Flattens a variables tree to ``[(path, leaf)]``; Flax boxes count as one leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    return [(path_str(kp), leaf) for kp, leaf in leaves], treedef


def glob_to_regex(pattern: str) -> re.Pattern:
    """Compiles a path glob: ``*`` stays inside one segment, ``**`` spans whole segments.

    Examples:
      >>> bool(glob_to_regex("**/kernel").fullmatch("Block_0/Dense_1/kernel"))
      True
      >>> bool(glob_to_regex("**/kernel").fullmatch("kernel"))
      True
      >>> bool(glob_to_regex("Dense_*/bias").fullmatch("Block_0/Dense_1/bias"))
      False
    """
    if not pattern:
        raise ValueError("Empty path pattern; use '**' to match every parameter.")
    segments = pattern.split(SEP)
    out = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            # Any number (also zero) of whole segments, with their separators.
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in seg:
            raise ValueError(
                f"Invalid pattern {pattern!r}: '**' must be a whole path segment "
                "(e.g. 'encoder/**/kernel'); use '*' inside a segment."
            )
        body = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
        out.append(body if last else body + "/")
    return re.compile("".join(out))


def compile_pattern(pattern: Pattern, what: str = "pattern") -> re.Pattern:
    """A glob string or an already compiled regex, as a regex to ``fullmatch``.

    Args:
      pattern: a glob (see ``glob_to_regex``) or a compiled ``re.Pattern``.
      what: how to name the argument the pattern came from in errors.

    Raises:
      TypeError: for anything else (naming ``what``).
    """
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(
            f"`{what}`: a path pattern must be a str glob such as '**/kernel' or a compiled "
            f"re.Pattern, got {type(pattern).__name__} {pattern!r}."
        )
    return glob_to_regex(pattern)


def split_params(path: str) -> tuple[str, str]:
    """The two printed forms of a path: inside ``params``, and collection-qualified.

    A path of another collection has one form only (both entries equal).

    Examples:
      >>> split_params("params/Block_0/kernel")
      ('Block_0/kernel', 'params/Block_0/kernel')
      >>> split_params("batch_stats/BatchNorm_0/mean")
      ('batch_stats/BatchNorm_0/mean', 'batch_stats/BatchNorm_0/mean')
    """
    prefix = PARAMS + SEP
    return (path[len(prefix):], path) if path.startswith(prefix) else (path, path)


def is_qualified(pattern: str) -> bool:
    """True for a pattern written with the ``params`` collection (``"params/head/**"``)."""
    return pattern == PARAMS or pattern.startswith(PARAMS + SEP)


def pattern_text(pattern: Pattern) -> str:
    return f"re.compile({pattern.pattern!r})" if isinstance(pattern, re.Pattern) else repr(pattern)


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The real paths most like ``name`` (for "did you mean" hints)."""
    candidates = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
    if not found:
        # Rank by shared last segment (a typo in the module name keeps the leaf name).
        tail = name.rsplit(SEP, 1)[-1]
        found = [c for c in candidates if c.rsplit(SEP, 1)[-1] == tail][:n]
    return found or candidates[:n]

