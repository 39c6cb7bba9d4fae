"""From model paths to checkpoint keys, and from stored tensors to parameters.

A mapping is an ordered list of rules ``(regex, key)`` or ``(regex, key, transform)``:
the first regex that fully matches a parameter's path inside ``params`` gives its key
(``re.Match.expand``: ``\\1``, ``\\g<name>``). ``key`` may be a tuple of alternatives, the
first the checkpoint has wins (a tied head: ``("lm_head.weight",
"model.embed_tokens.weight")``). A key containing ``{layer}`` reads a stacked parameter
(``nn.scan``, ``nnx.vmap``): layer ``i`` of its layer axis from the key with ``{layer}``
replaced by ``i``.

A transform is a comma-separated list of steps, applied in order to the stored tensor
(one layer's, when stacked):

==================  ==================================================================
``T``               reverse the axes (PyTorch's ``[out, in]`` into a kernel's ``[in, out]``)
``transpose(p...)`` permute the axes, as ``numpy.transpose``
``split(a,n,i)``    the ``i``-th of ``n`` equal parts along axis ``a`` (a fused ``qkv``)
``reshape``         to the parameter's shape (one layer's): ``[h*d, m]`` into ``(h, d, m)``
``reshape(s...)``   to the shape ``s`` (one ``-1`` allowed)
``stack(a)``        where the layer axis of a ``{layer}`` key goes (default 0)
==================  ==================================================================

Then the tensor is cast to the parameter's dtype. Every step is a NumPy view of the
memory-mapped tensor, so a device's shard of the parameter is copied straight out of the
file: nothing is transposed or reshaped whole. A ``reshape`` that no view can express
(merging axes a transpose made non-adjacent) is refused when the plan is made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

LAYER = "{layer}"
STEPS = "T, transpose(p0,p1,...), split(axis,n,i), reshape, reshape(d0,d1,...), stack(axis)"
_STEP = re.compile(r"\s*([A-Za-z_]+)\s*(?:\(([^()]*)\))?\s*")


class Step(NamedTuple):
    """One transform step: its name and integer arguments."""

    name: str
    args: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.name + (f"({','.join(map(str, self.args))})" if self.args else "")


class Rule(NamedTuple):
    """A checked mapping rule.

    Attributes:
      pattern: the regex over paths inside ``params``.
      keys: the key templates, first found wins.
      steps: the transform's steps, ``stack`` left out.
      stack: the layer axis, for keys with ``{layer}``; None otherwise.
    """

    pattern: str
    keys: tuple[str, ...]
    steps: tuple[Step, ...]
    stack: int | None


def text(steps: Sequence[Step]) -> str:
    """A transform as written: ``"T,reshape"``."""
    return ",".join(map(str, steps))


def parse(transform: str, where: str) -> tuple[Step, ...]:
    """The steps of a transform, each name and argument count checked.

    Examples:
      >>> parse("T, reshape", "rename[0]")
      (Step(name='T', args=()), Step(name='reshape', args=()))
      >>> parse("split(1,3,0)", "rename[0]")
      (Step(name='split', args=(1, 3, 0)),)
      >>> parse("transpose", "rename[2]")
      Traceback (most recent call last):
      ValueError: from_safetensors: `rename[2]`: step 'transpose' needs its axes...
    """
    steps = []
    for part in _split(transform):
        match = _STEP.fullmatch(part)
        name, raw = (match.group(1), match.group(2)) if match else (part.strip(), None)
        try:
            args = tuple(int(a) for a in raw.split(",")) if raw and raw.strip() else ()
        except ValueError:
            match = None
        if match is None or name not in ("T", "transpose", "split", "reshape", "stack"):
            raise ValueError(
                f"from_safetensors: `{where}`: {part.strip()!r} in the transform "
                f"{transform!r} is not a step. Steps: {STEPS}, separated by commas."
            )
        wrong = {"T": len(args) != 0, "transpose": len(args) == 0,
                 "split": len(args) != 3, "stack": len(args) != 1}.get(name, False)
        if wrong:
            need = {"T": "no arguments", "transpose": "its axes, transpose(1,0)",
                    "split": "(axis, parts, index), split(1,3,0)",
                    "stack": "one axis, stack(0)"}[name]
            raise ValueError(f"from_safetensors: `{where}`: step {str(Step(name, args))!r} "
                             f"needs {need}.")
        steps.append(Step(name, args))
    return tuple(steps)


def _split(transform: str) -> list[str]:
    """The comma-separated steps, commas inside parentheses kept."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(transform):
        depth += (c == "(") - (c == ")")
        if c == "," and depth == 0:
            parts.append(transform[start:i])
            start = i + 1
    parts.append(transform[start:])
    return [p for p in parts if p.strip()] or [transform]


def check_rule(rule: Any, index: int) -> Rule:
    """One ``rename`` entry as a checked ``Rule`` (TypeError/ValueError naming it)."""
    where = f"rename[{index}]"
    if isinstance(rule, str) or not isinstance(rule, tuple | list) or len(rule) not in (2, 3):
        raise TypeError(
            f"from_safetensors: `{where}` must be (regex, key) or (regex, key, transform), "
            f"got {rule!r}. Maybe you wrote rename=(regex, key) instead of "
            "rename=[(regex, key)]?"
        )
    pattern, keys, transform = (*rule, "")[:3]
    keys = (keys,) if isinstance(keys, str) else keys
    if not isinstance(pattern, str) or not isinstance(keys, tuple | list) or not keys or \
            not all(isinstance(k, str) for k in keys) or not isinstance(transform, str):
        raise TypeError(
            f"from_safetensors: `{where}` must hold a regex string, a key string (or a tuple "
            f"of alternatives) and a transform string, got {rule!r}."
        )
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"from_safetensors: `{where}`: the regex {pattern!r} does not "
                         f"compile: {e}.") from None
    empty = re.fullmatch("".join(
        f"(?P<{n}>)" if n else "()" for n in _group_names(regex)), "")
    for key in keys:
        try:
            empty.expand(key)
        except (re.error, IndexError) as e:
            have = [f"\\{g}" for g in range(1, regex.groups + 1)] + [
                f"\\g<{n}>" for n in regex.groupindex]
            raise ValueError(
                f"from_safetensors: `{where}`: the key {key!r} does not fit the regex "
                f"{pattern!r}: {e}. The regex has the groups: {', '.join(have) or 'none'}."
            ) from None
    layered = [LAYER in k for k in keys]
    if any(layered) and not all(layered):
        raise ValueError(f"from_safetensors: `{where}`: either every key alternative has "
                         f"{LAYER} or none does, got {tuple(keys)!r}.")
    steps = parse(transform, where) if transform.strip() else ()
    stacks = [s for s in steps if s.name == "stack"]
    if len(stacks) > 1 or (stacks and not any(layered)):
        raise ValueError(
            f"from_safetensors: `{where}`: 'stack(axis)' places the layer axis of a key "
            f"with {LAYER}, once; got the transform {transform!r} for {tuple(keys)!r}."
        )
    stack = (stacks[0].args[0] if stacks else 0) if any(layered) else None
    return Rule(pattern, tuple(keys), tuple(s for s in steps if s.name != "stack"), stack)


def _group_names(regex: re.Pattern) -> list[str | None]:
    names = {number: name for name, number in regex.groupindex.items()}
    return [names.get(g) for g in range(1, regex.groups + 1)]


def resolve(rules: Sequence[Rule], path: str) -> tuple[Rule | None, tuple[str, ...]]:
    """The rule for a path inside ``params`` and its key alternatives; with no rule, the
    path itself with ``/`` as ``.`` (a checkpoint written from this model's tree).

    Examples:
      >>> rule = check_rule((r"layers_(\\d+)/up/kernel", r"h.\\1.up.weight", "T"), 0)
      >>> resolve([rule], "layers_3/up/kernel")[1]
      ('h.3.up.weight',)
      >>> resolve([rule], "head/kernel")
      (None, ('head.kernel',))
    """
    for rule in rules:
        match = re.fullmatch(rule.pattern, path)
        if match:
            return rule, tuple(match.expand(k) for k in rule.keys)
    return None, (path.replace("/", "."),)


class Shaped(NamedTuple):
    """A transform checked against one stored tensor: what it gives, or why it fails."""

    shape: tuple[int, ...] | None
    error: str | None


def _c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _reshape_view(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``x`` reshaped without a copy, or None where that needs one."""
    try:
        return np.reshape(x, shape, copy=False)
    except ValueError:
        return None
    except TypeError:  # NumPy 2.0: no `copy=`
        y = x.view()
        try:
            y.shape = shape
        except AttributeError:
            return None
        return y


def _step(x: np.ndarray, step: Step, target: tuple[int, ...]) -> np.ndarray | str:
    """``x`` after one step, as a view, or the reason it cannot be."""
    if step.name == "T":
        return x.T
    if step.name == "transpose":
        if sorted(step.args) != list(range(x.ndim)):
            return f"{step} is not a permutation of the {x.ndim} axes of {list(x.shape)}"
        return x.transpose(step.args)
    if step.name == "split":
        axis, n, i = step.args
        if not -x.ndim <= axis < x.ndim or n <= 0 or not 0 <= i < n or x.shape[axis] % n:
            return f"{step} does not split {list(x.shape)} into {n} equal parts"
        size = x.shape[axis] // n
        return x[(slice(None),) * (axis % x.ndim) + (slice(i * size, (i + 1) * size),)]
    shape = list(step.args or target)
    if shape.count(-1) == 1:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = x.size // known if known and x.size % known == 0 else -1
    if math.prod(shape) != x.size or any(d < 0 for d in shape):
        return f"{step} cannot make {list(shape)} ({math.prod(shape):,} elements) of " \
               f"{list(x.shape)} ({x.size:,} elements)"
    y = _reshape_view(x, tuple(shape))
    if y is None:
        return (f"{step} of {list(x.shape)} merges axes that earlier steps made "
                "non-adjacent in the file, which would copy the whole tensor; reshape "
                "before transposing")
    return y


def apply(x: np.ndarray, steps: Sequence[Step], target: tuple[int, ...]) -> np.ndarray:
    """``x`` (a mapped tensor) after ``steps``, as a view; ``target`` is the shape a
    bare ``reshape`` makes (steps are checked by ``shaped`` first)."""
    for step in steps:
        x = _step(x, step, target)
        if isinstance(x, str):
            raise ValueError(x)
    return x


def shaped(shape: tuple[int, ...], steps: Sequence[Step], target: tuple[int, ...]) -> Shaped:
    """What ``steps`` make of a stored shape, checked on a stand-in with the file's
    strides (no data: the stand-in is never read).

    Examples:
      >>> shaped((12, 4), parse("T,reshape", "r"), (4, 3, 4))
      Shaped(shape=(4, 3, 4), error=None)
      >>> shaped((12, 4), parse("reshape", "r"), (4, 3, 4)).shape
      (4, 3, 4)
      >>> shaped((12, 4), parse("split(0,5,0)", "r"), (4,)).error
      'split(0,5,0) does not split [12, 4] into 5 equal parts'
    """
    base = np.zeros(1, np.uint8)
    x = np.lib.stride_tricks.as_strided(base, shape=shape, strides=_c_strides(shape),
                                        writeable=False)
    for step in steps:
        x = _step(x, step, target)
        if isinstance(x, str):
            return Shaped(None, x)
    return Shaped(tuple(x.shape), None)
