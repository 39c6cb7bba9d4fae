"""One rule engine for every per-path setting: initializers, partition rules, optimizer state.

Rules are written in one of two forms, normalized here to an ordered list of ``Rule``s:

* a mapping (ordered) or a list of ``(pattern, value)`` pairs, where a pattern is a glob
  over the ``/``-joined path (``*`` within a segment, ``**`` across whole segments, the
  whole path must match) or a compiled ``re.Pattern`` (``fullmatch``). A mapping may mix
  glob and regex keys; its insertion order is the priority order (first match wins);
* a nested dict mirroring the variables tree, with values at leaves or at whole subtrees.

Every parameter has two printed forms: its path inside ``params`` (``"head/kernel"``,
what ``initializers=`` has always matched) and its collection-qualified path
(``"params/head/kernel"``, what ``summary`` prints). A glob (or nested-dict key) that
starts with ``params/`` is matched against the qualified form, any other glob against the
path inside ``params``, and a compiled regex against both. Leaves of other collections
(``"batch_stats/BatchNorm_0/mean"``) and optimizer state (``"opt_state/0/mu/..."``) have
only their qualified form.

Examples:
  >>> import re
  >>> rules = normalize({re.compile(r"layers_\\d+/bias"): "a", "params/head/**": "b"},
  ...                   what="initializers")
  >>> chosen = assign(rules, ["layers_0/bias", "head/kernel"], what="initializers")
  >>> {path: rule.value for path, rule in chosen.items()}
  {'layers_0/bias': 'a', 'head/kernel': 'b'}
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

SHORT = "short"  # matched against the path inside ``params``
FULL = "full"  # matched against the collection-qualified path
ANY = "any"  # either (compiled regexes)

FORMS = (
    "`{what}` must be a mapping or list of (pattern, value) pairs, or a nested dict "
    "mirroring the variables tree; got {type}{example}."
)
NESTED_KEY = (
    "`{what}`: {key!r} (under {prefix!r}) is not a str. In the nested-dict form (a mapping "
    "with a dict value) keys are path segments; use the flat form, a mapping or list of "
    "(pattern, value) pairs whose values are not dicts, for compiled-regex patterns."
)
NESTED_GLOB = (
    "`{what}`: key {path!r} of the nested-dict form (a mapping with a dict value) contains "
    "'*', but nested keys are literal path segments. Write globs in the flat form, a "
    "mapping or list of (pattern, value) pairs whose values are not dicts, e.g. "
    "[('params/up/kernel', ...), ('**', ...)]."
)
PAIR = "`{what}` entries must be (pattern, value) pairs, got {item!r}{hint}."


class Rule(NamedTuple):
    """One ``pattern -> value`` rule.

    Attributes:
      label: how errors name the rule (the glob, regex or tree key as written).
      regex: the compiled full-match regex.
      value: what the rule assigns.
      target: the path text the rule was written as (for "closest path" hints).
      scope: which form of a path the regex is matched against: ``"short"`` (inside
        ``params``), ``"full"`` (collection-qualified) or ``"any"`` (either).
    """

    label: str
    regex: re.Pattern
    value: Any
    target: str
    scope: str = SHORT

    def matches(self, short: str, full: str) -> bool:
        """Whether the rule matches a path given in both its forms (see ``forms``)."""
        if self.scope == SHORT:
            return bool(self.regex.fullmatch(short))
        if self.scope == FULL:
            return bool(self.regex.fullmatch(full))
        return bool(self.regex.fullmatch(short) or self.regex.fullmatch(full))


def forms(name: str, *, qualified: bool) -> tuple[str, str]:
    """``(path inside params, collection-qualified path)`` of a path.

    Args:
      name: the path.
      qualified: True if ``name`` is collection-qualified (``"params/a/b"``,
        ``"batch_stats/c"``, ``"opt_state/..."``); False if it is a path inside ``params``.

    Examples:
      >>> forms("Dense_0/kernel", qualified=False)
      ('Dense_0/kernel', 'params/Dense_0/kernel')
      >>> forms("batch_stats/BatchNorm_0/mean", qualified=True)
      ('batch_stats/BatchNorm_0/mean', 'batch_stats/BatchNorm_0/mean')
    """
    if qualified:
        return paths.split_params(name)
    return name, paths.PARAMS + paths.SEP + name


def _scope(text: str) -> str:
    return FULL if paths.is_qualified(text) else SHORT


def _is_nested(tree: Mapping) -> bool:
    return any(isinstance(v, Mapping) for v in tree.values())


def _tree_rules(
    tree: Mapping, prefix: str, is_value: Callable[[Any], bool], what: str
) -> list[Rule]:
    out = []
    for name, value in tree.items():
        if not isinstance(name, str):
            raise TypeError(NESTED_KEY.format(what=what, key=name, prefix=prefix))
        path = f"{prefix}{paths.SEP}{name}" if prefix else name
        if "*" in name:
            raise ValueError(NESTED_GLOB.format(what=what, path=path))
        if isinstance(value, Mapping) and not is_value(value):
            out.extend(_tree_rules(value, path, is_value, what))
        else:
            # A value at an inner node covers the whole subtree below it.
            regex = re.compile(re.escape(path) + r"(?:/.*)?")
            out.append(Rule(f"tree key {path!r}", regex, value, path, _scope(path)))
    return out


def _pattern_rule(pattern: Any, value: Any, what: str) -> Rule:
    try:
        regex = paths.compile_pattern(pattern, what)
    except ValueError as e:
        raise ValueError(f"`{what}`: {e}") from None
    label = f"pattern {paths.pattern_text(pattern)}"
    if isinstance(pattern, re.Pattern):
        return Rule(label, regex, value, regex.pattern, ANY)
    return Rule(label, regex, value, pattern, _scope(pattern))


def normalize(
    spec: Mapping | Sequence[tuple[Any, Any]] | None,
    *,
    what: str,
    is_value: Callable[[Any], bool] = lambda v: False,
) -> list[Rule]:
    """Turns any accepted rule form into an ordered list of ``Rule``s.

    Args:
      spec: a mapping of patterns (str globs and compiled regexes, in any mix), a list of
        ``(pattern, value)`` pairs, a nested dict, a list of ``Rule``s (returned as they
        are), or None (no rules).
      what: how to name the argument in errors (``"initializers"``...).
      is_value: tells a mapping that is a value (not a subtree) in the nested form.

    Returns:
      The rules in priority order (first match wins).

    Raises:
      TypeError: for a form that is none of the above, naming ``what``.
      ValueError: for a malformed glob.

    Examples:
      >>> import re
      >>> [r.label for r in normalize({re.compile("a.*"): 1, "b": 2, re.compile("c"): 3},
      ...                             what="rules")]
      ["pattern re.compile('a.*')", "pattern 'b'", "pattern re.compile('c')"]
    """
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        if _is_nested(spec):
            return _tree_rules(spec, "", is_value, what)
        items: Iterable = spec.items()
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        items = spec
    else:
        example = ""
        if isinstance(spec, (str, re.Pattern)):
            example = f"; for one rule write [({spec!r}, value)]"
        raise TypeError(FORMS.format(what=what, type=type(spec).__name__, example=example))
    out = []
    for item in items:
        if isinstance(item, Rule):
            out.append(item)
            continue
        if not (isinstance(item, tuple | list) and len(item) == 2):
            hint = ""
            if isinstance(item, (str, re.Pattern)):
                hint = f"; pair the pattern with its value: ({item!r}, value)"
            raise TypeError(PAIR.format(what=what, item=item, hint=hint))
        out.append(_pattern_rule(*item, what))
    return out


def first_match(rules: Sequence[Rule], short: str, full: str) -> Rule | None:
    """The first rule matching a path (given in both forms), or None."""
    return next((r for r in rules if r.matches(short, full)), None)


def assign(
    rules: Sequence[Rule],
    names: Sequence[str],
    *,
    what: str,
    allow_unused: bool = False,
    qualified: bool = False,
) -> dict[str, Rule]:
    """Gives each path the first rule that matches it.

    Args:
      rules: the rules in priority order.
      names: the paths to match: inside ``params`` (``qualified=False``), or
        collection-qualified (``qualified=True``).
      what: how to name the rules in errors.
      allow_unused: accept rules that match no path.
      qualified: how ``names`` are written (see ``forms``).

    Returns:
      ``{path: rule}`` for the paths some rule matches, keyed by ``names``.

    Raises:
      ValueError: naming a rule that matches no path, with the closest real paths.
    """
    chosen: dict[str, Rule] = {}
    used = [False] * len(rules)
    both = [forms(name, qualified=qualified) for name in names]
    for name, (short, full) in zip(names, both, strict=True):
        for i, rule in enumerate(rules):
            if rule.matches(short, full):
                used[i] = True
                chosen.setdefault(name, rule)
    if not allow_unused:
        for rule, hit in zip(rules, used, strict=True):
            if not hit:
                raise ValueError(f"{what}: " + no_match(rule, both))
    return chosen


def no_match(rule: Rule, both: Sequence[tuple[str, str]]) -> str:
    """The message for a rule that matches none of the paths (given in both forms)."""
    candidates = [full if rule.scope == FULL else short for short, full in both]
    hint = ", ".join(repr(p) for p in paths.closest(rule.target, candidates))
    return (
        f"{rule.label} matches no parameter. Closest real paths: {hint}. "
        "Patterns match whole '/'-joined paths: '*' stays within one segment, '**' spans "
        "segments (e.g. '**/kernel', 'head/**', or 'params/head/**' as summary prints it)."
    )
