"""``from_safetensors``: parameters read from safetensors files, each device its shard.

Planning resolves every matched parameter to its checkpoint key(s) and transform and
checks them against the files' headers (keys, shapes after the transform, dtypes,
damaged files) before any tensor data is read; unused tensors are reported once every
leaf is planned. Execution (``shards``) copies each device's shard straight out of the
memory-mapped tensor through the transform's views: a sharded parameter is never whole
on the host, and a replicated one is read once per process.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from flaxlazy._src import paths
from flaxlazy._src import warn
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources.from_safetensors import files
from flaxlazy._src.sources.from_safetensors import mapping
from flaxlazy._src.sources.from_safetensors import shards

KIND = "safetensors"
PARAMS = paths.PARAMS

MISSING = (
    "from_safetensors({path!r}): {param!r} ({fmt}) maps to {keys}, which the checkpoint "
    "does not have. Closest keys: {hint}. {fix}"
)
NO_RULE = (
    "No `rename` rule matches {inner!r}, so it was looked up under its own path; add a "
    "rule (regex over the path inside params, key, transform), or give it another "
    "initializer in a pattern before this one (a new head)."
)
SHAPE = (
    "from_safetensors({path!r}): {param!r} is {fmt} in the model{layer}, but checkpoint "
    "key {key!r} is {stored}{after}. Check the transform of {rule}{hint}."
)
UNUSED = (
    "from_safetensors({path!r}): {n} checkpoint tensor{s} not used by the model: "
    "{listing}. If the model should read them, fix `rename`; if it leaves them out on "
    "purpose (a head replaced), name them in `unused=` (regexes){fix}."
)


class SafetensorsSource(NamedTuple):
    """Where matched parameters come from (see ``from_safetensors``)."""

    path: str
    rules: tuple[mapping.Rule, ...]
    strict: bool | None
    unused: tuple[str, ...]


def from_safetensors(
    path: str | os.PathLike,
    *,
    rename: Sequence[tuple] | None = None,
    strict: bool | None = None,
    unused: Sequence[str] = (),
) -> SafetensorsSource:
    """Parameters read from safetensors files (Hugging Face checkpoints), as a value in
    ``initializers=``.

    Each matched parameter (its path inside ``params``, e.g. ``"layers_0/mlp/up/kernel"``,
    NNX ``"layers/0/mlp/up/kernel"``) is read from the checkpoint key that the first
    matching ``rename`` rule gives it, transformed (transposed, split, reshaped, stacked
    over layers) and cast to the parameter's dtype, each device's shard straight from the
    memory-mapped file: no host holds a whole sharded tensor. Every key, shape and file is
    checked when the plan is made, before any tensor data is read. Parameters the pattern
    does not match keep their own initializers.

    Args:
      path: a ``.safetensors`` file, a directory holding one or shards with an index
        (``model.safetensors.index.json``), or the index itself.
      rename: an ordered list of rules ``(regex, key)`` or ``(regex, key, transform)``;
        the first regex that fully matches the parameter's path gives the key
        (``re.Match.expand``: ``\\1``, ``\\g<name>``); a tuple of keys means the first
        the checkpoint has; ``{layer}`` in a key stacks layer ``i`` from key ``i``. The
        transform is a comma-separated list of steps: ``T``, ``transpose(1,0,2)``,
        ``split(axis,n,i)``, ``reshape`` (to the parameter's shape), ``reshape(2,-1)``,
        ``stack(axis)``. Without a matching rule, the key is the path with ``/`` as
        ``.``. Ready-made: ``flaxlazy.LLAMA_HF``, ``flaxlazy.GPT2_HF``.
      strict: checkpoint tensors no parameter reads are a ``UserWarning`` by default
        (None), a ``ValueError`` with ``strict=True``, and expected with ``strict=False``.
      unused: regexes of keys that are unused on purpose (a head replaced, buffers such
        as ``.*rotary_emb.inv_freq``): never reported.

    Returns:
      A ``SafetensorsSource`` to use as an ``initializers=`` value.

    Raises:
      TypeError: ``path`` not a path, ``strict`` not None or a bool, a ``rename`` rule or
        ``unused`` of the wrong form (naming the argument).
      ValueError: a regex that does not compile, a key that refers to a group its regex
        lacks, or a transform that is not a list of steps, naming the rule.
      (when the plan is made) ValueError: a missing, damaged or truncated file or
        shard; a parameter whose key the checkpoint lacks (with the closest keys) or
        whose shape after the transform differs, naming the model path and key; unused
        tensors with ``strict=True``.

    Examples:
      >>> import flaxlazy
      >>> src = flaxlazy.from_safetensors("llama", rename=[
      ...     (r"layers_(\\d+)/mlp/(gate|up|down)/kernel", r"model.layers.\\1.mlp.\\2_proj.weight",
      ...      "T")])
      >>> src.rules[0].keys, src.rules[0].steps
      (('model.layers.\\\\1.mlp.\\\\2_proj.weight',), (Step(name='T', args=()),))
      >>> flaxlazy.from_safetensors("llama", rename=[("head/kernel", "lm_head.weight", "t")])
      Traceback (most recent call last):
      ValueError: from_safetensors: `rename[0]`: 't' in the transform 't' is not a step. ...
    """
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TypeError(
            f"from_safetensors: `path` must be a .safetensors file, a directory or an index "
            f"path, got {path!r}."
        )
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(
            f"from_safetensors: `strict` must be None (warn about unused tensors), True "
            f"(raise) or False (expect them), got {strict!r}."
        )
    if isinstance(rename, str | dict) or (rename is not None and not isinstance(
            rename, Sequence)):
        raise TypeError(
            "from_safetensors: `rename` must be a list of (regex, key) or (regex, key, "
            f"transform) rules, got {rename!r}"
            + (" (for a dict, pass list(rename.items()))." if isinstance(rename, dict)
               else ".")
        )
    rules = tuple(mapping.check_rule(rule, i) for i, rule in enumerate(rename or ()))
    if isinstance(unused, str) or not isinstance(unused, Sequence) or not all(
            isinstance(u, str) for u in unused):
        raise TypeError(
            f"from_safetensors: `unused` must be a list of regexes over checkpoint keys, got "
            f"{unused!r}" + (f"; for one, write [{unused!r}]." if isinstance(unused, str)
                              else ".")
        )
    for i, pattern in enumerate(unused):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"from_safetensors: `unused[{i}]`: the regex {pattern!r} does "
                             f"not compile: {e}.") from None
    return SafetensorsSource(os.fspath(path), rules, strict, tuple(unused))


def recognizes(value: Any) -> bool:
    return isinstance(value, SafetensorsSource)


def _checkpoint(memo: dict, path: str) -> files.Checkpoint:
    """The checkpoint's headers, read once per plan."""
    opened = memo.setdefault("files", {})
    if path not in opened:
        opened[path] = files.open_checkpoint(path)
    return opened[path]


def _layered(keys: Sequence[str], layer: int | str) -> list[str]:
    return [k.replace(mapping.LAYER, str(layer)) for k in keys]


def _stored(t: files.Tensor) -> str:
    return f"{t.dtype}{list(t.shape)}"


def _rule_name(source: SafetensorsSource, rule: mapping.Rule | None) -> str:
    if rule is None:
        return "the key (no rule matched)"
    return f"`rename[{source.rules.index(rule)}]` ({rule.pattern!r})"


def _missing(source, query, inner, rule, keys, ckpt) -> ValueError:
    shown = " or ".join(repr(k) for k in keys)
    hint = ", ".join(repr(k) for k in paths.closest(keys[0], ckpt.tensors))
    fix = NO_RULE.format(inner=inner) if rule is None else (
        f"Check {_rule_name(source, rule)}.")
    return ValueError(MISSING.format(path=source.path, param=query.path, keys=shown,
                                     fmt=kinds.fmt(query.shape, query.dtype), hint=hint,
                                     fix=fix))


def _layer_tensors(source, query, rule, template, n, axis, ckpt) -> tuple[files.Tensor, ...]:
    keys = [template.replace(mapping.LAYER, str(i)) for i in range(n)]
    found = [ckpt.tensors.get(k) for k in keys]
    for i, (key, t) in enumerate(zip(keys, found, strict=True)):
        if t is None:
            have = next(j for j, f in enumerate(found) if f is None)
            raise ValueError(
                f"from_safetensors({source.path!r}): {query.path!r} "
                f"({kinds.fmt(query.shape, query.dtype)}) stacks {n} layers on axis {axis} "
                f"from {template!r}, but the checkpoint has no {key!r} (layer {i}); it has "
                f"layers 0 to {have - 1}. Check {_rule_name(source, rule)} and the model's "
                "depth."
            )
        if (t.shape, t.dtype) != (found[0].shape, found[0].dtype):
            raise ValueError(
                f"from_safetensors({source.path!r}): {query.path!r} stacks layers from "
                f"{template!r}, but {key!r} is {_stored(t)} where {keys[0]!r} is "
                f"{_stored(found[0])}; every layer must have the same shape and dtype."
            )
    return tuple(found)


def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
    """The recipe of a leaf read from safetensors files, checked against their headers."""
    source = query.rule.value
    ckpt = _checkpoint(memo, source.path)
    inner = query.path[len(PARAMS) + 1:]
    rule, keys = mapping.resolve(source.rules, inner)
    shape = tuple(query.shape)
    stack = None if rule is None else rule.stack
    steps = () if rule is None else rule.steps
    layer_shape = shape
    if stack is not None:
        if not -len(shape) <= stack < len(shape):
            raise ValueError(
                f"from_safetensors({source.path!r}): {_rule_name(source, rule)} stacks "
                f"layers on axis {stack}, but {query.path!r} is "
                f"{kinds.fmt(shape, query.dtype)}: it has no such axis."
            )
        stack %= len(shape)
        layer_shape = shape[:stack] + shape[stack + 1:]
    template = next((k for k in keys if _layered([k], 0)[0] in ckpt.tensors), None)
    if template is None:
        raise _missing(source, query, inner, rule, _layered(keys, 0) if stack is not None
                       else list(keys), ckpt)
    if stack is None:
        tensors = (ckpt.tensors[template],)
        label = template
    else:
        tensors = _layer_tensors(source, query, rule, template, shape[stack], stack, ckpt)
        label = template.replace(mapping.LAYER, f"{{0..{shape[stack] - 1}}}")
    first = tensors[0]
    first.np_dtype()  # a dtype flaxlazy cannot read: the error names the key and file
    got = mapping.shaped(first.shape, steps, layer_shape)
    if got.shape != layer_shape:
        after = (f"; after {mapping.text(steps)!r} " + (
            f"it is {list(got.shape)}" if got.error is None else f"it fails: {got.error}")
                 ) if steps else ""
        hint = ""
        if got.error is None and tuple(reversed(got.shape)) == layer_shape:
            hint = " (the reverse: add 'T'?)"
        raise ValueError(SHAPE.format(
            path=source.path, param=query.path, fmt=kinds.fmt(shape, query.dtype),
            layer=f" (one layer: {list(layer_shape)})" if stack is not None else "",
            key=first.key, stored=_stored(first), after=after,
            rule=_rule_name(source, rule), hint=hint))
    memo.setdefault("used", {}).setdefault(source, set()).update(t.key for t in tensors)
    return kinds.Planned(value=shards.Read(source, tensors, stack, steps, label))


def report_unused(leaves: Sequence[Any], memo: dict) -> None:
    """Tensors of each checkpoint that no leaf reads (and ``unused=`` does not name): a
    warning, or an error with ``strict=True``. Sources reading one checkpoint (a head and
    a body under two patterns) are reported together: a tensor one of them reads is
    used, one any of them names in ``unused=`` is expected, and ``strict`` is the
    strictest of theirs (True over None over False)."""
    del leaves
    by_path: dict[str, list[tuple[SafetensorsSource, set[str]]]] = {}
    for source, used in memo.get("used", {}).items():
        by_path.setdefault(source.path, []).append((source, used))
    for path, sources in by_path.items():
        stricts = {source.strict for source, _ in sources}
        strict = True if True in stricts else (None if None in stricts else False)
        if strict is False:
            continue
        used = set().union(*(u for _, u in sources))
        expected = [u for source, _ in sources for u in source.unused]
        left = sorted(k for k in _checkpoint(memo, path).tensors
                      if k not in used and not any(re.fullmatch(u, k) for u in expected))
        if not left:
            continue
        listing = ", ".join(repr(k) for k in left[:8]) + (", ..." if len(left) > 8 else "")
        message = UNUSED.format(
            path=path, n=len(left), s="" if len(left) == 1 else "s", listing=listing,
            fix=", or pass strict=False" + ("" if strict else
                                             "; strict=True makes this an error"))
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=warn.user_stacklevel())


def describe(leaf: Any, found: kinds.Found) -> str:
    """``safetensors KEY [TRANSFORM] [STORED->PARAM]``, e.g.
    ``safetensors model.layers.{0..1}.mlp.up_proj.weight T bf16->f32``."""
    del found
    read = leaf.value
    stored = read.tensors[0].np_dtype()
    parts = ["safetensors", read.label]
    if read.steps:
        parts.append(mapping.text(read.steps))
    if stored != np.dtype(leaf.dtype):
        parts.append(f"{_short(stored)}->{_short(leaf.dtype)}")
    return " ".join(parts)


def _short(dtype: Any) -> str:
    name = np.dtype(dtype).name
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "float64": "f64"}.get(
        name, name)


SOURCE = kinds.Source(KIND, recognizes, plan, describe, shards.execute,
                      finish=report_unused)
