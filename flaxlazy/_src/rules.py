"""Path-keyed rule sets: ``{pattern: value}`` maps, ``[(pattern, value)]`` lists, nested trees.

Initializer trees (and, built on the same matcher, other per-path settings) are written
in one of two forms, normalized here to an ordered list of ``Rule``s:

* a mapping (ordered) or a list of ``(pattern, value)`` pairs, where a pattern is a glob
  over the ``/``-joined path (``*`` within a segment, ``**`` across whole segments, the
  whole path must match) or a compiled ``re.Pattern`` (``fullmatch``);
* a nested dict mirroring the variables tree, with values at leaves or at whole subtrees.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

from flaxlazy._src import paths


class Rule(NamedTuple):
    """One ``pattern -> value`` rule.

    Attributes:
      label: how errors name the rule (the glob, regex or tree key as written).
      regex: the compiled full-match regex.
      value: what the rule assigns.
      target: the path text the rule was written as (for "closest path" hints).
    """

    label: str
    regex: re.Pattern
    value: Any
    target: str


def _is_nested(tree: Mapping) -> bool:
    return any(isinstance(v, Mapping) for v in tree.values())


def _tree_rules(tree: Mapping, prefix: str, is_value: Callable[[Any], bool]) -> list[Rule]:
    out = []
    for name, value in tree.items():
        if not isinstance(name, str):
            raise TypeError(
                f"Initializer tree keys must be strings, got {name!r} under {prefix!r}."
            )
        path = f"{prefix}{paths.SEP}{name}" if prefix else name
        if isinstance(value, Mapping) and not is_value(value):
            out.extend(_tree_rules(value, path, is_value))
        else:
            # A value at an inner node covers the whole subtree below it.
            regex = re.compile(re.escape(path) + r"(?:/.*)?")
            out.append(Rule(f"tree key {path!r}", regex, value, path))
    return out


def normalize(
    spec: Mapping | Sequence[tuple[Any, Any]] | None,
    *,
    what: str,
    is_value: Callable[[Any], bool] = lambda v: False,
) -> list[Rule]:
    """Turns any accepted rule form into an ordered list of ``Rule``s.

    Args:
      spec: a mapping of patterns, a list of ``(pattern, value)`` pairs, a nested dict, or
        None (no rules).
      what: how to name the argument in errors (``"initializers"``...).
      is_value: tells a mapping that is a value (not a subtree) in the nested form.

    Returns:
      The rules in priority order (first match wins).

    Raises:
      TypeError: for a form that is none of the above.
    """
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        if _is_nested(spec):
            return _tree_rules(spec, "", is_value)
        items: Iterable = spec.items()
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        items = spec
    else:
        raise TypeError(
            f"`{what}` must be a mapping or list of (pattern, value) pairs, or a nested dict "
            f"mirroring the variables tree; got {type(spec).__name__}."
        )
    out = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"`{what}` entries must be (pattern, value) pairs, got {item!r}.")
        pattern, value = item
        label = f"pattern {paths.pattern_text(pattern)}"
        regex = paths.compile_pattern(pattern)
        target = pattern if isinstance(pattern, str) else regex.pattern
        out.append(Rule(label, regex, value, target))
    return out


def assign(
    rules: Sequence[Rule], names: Sequence[str], *, what: str, allow_unused: bool = False
) -> dict[str, Rule]:
    """Gives each path the first rule that matches it.

    Args:
      rules: the rules in priority order.
      names: the paths to match.
      what: how to name the rules in errors.
      allow_unused: accept rules that match no path.

    Returns:
      ``{path: rule}`` for the paths some rule matches.

    Raises:
      ValueError: naming a rule that matches no path, with the closest real paths.
    """
    chosen: dict[str, Rule] = {}
    used = [False] * len(rules)
    for name in names:
        for i, rule in enumerate(rules):
            if rule.regex.fullmatch(name):
                used[i] = True
                chosen.setdefault(name, rule)
    if not allow_unused:
        for rule, hit in zip(rules, used, strict=True):
            if not hit:
                raise ValueError(f"{what}: " + _no_match(rule, names))
    return chosen


def _no_match(rule: Rule, names: Sequence[str]) -> str:
    hint = ", ".join(repr(p) for p in paths.closest(rule.target, names))
    return (
        f"{rule.label} matches no parameter. Closest real paths: {hint}. "
        "Patterns match whole '/'-joined paths: '*' stays within one segment, '**' spans "
        "segments (e.g. '**/kernel', 'head/**')."
    )
