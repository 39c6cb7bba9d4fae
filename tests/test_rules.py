"""The one rule engine (``rules.py``) on its own: forms, priority, scopes and errors.

Property-based: random paths and random rule lists, checked against a reference matcher
written from the documented semantics (a glob's ``*`` stays in a segment, ``**`` spans
whole segments, zero or more inside a glob and at least one at its end, first match wins,
a ``params/`` glob matches the qualified form).
"""

import re

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flaxlazy._src import rules as rules_lib

SEGMENTS = ["up", "down", "kernel", "bias", "layers_0", "layers_1", "head", "norm"]
paths_st = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4).map("/".join)


def glob_matches(glob: str, path: str) -> bool:
    """The documented glob semantics, segment by segment (a reference, not the engine)."""
    def match(g: list[str], p: list[str]) -> bool:
        if not g:
            return not p
        if g[0] == "**":  # whole segments: any number inside, at least one at the end
            return any(match(g[1:], p[i:]) for i in range(0 if g[1:] else 1, len(p) + 1))
        if not p:
            return False
        pattern = "".join(".*" if part == "*" else re.escape(part)
                          for part in re.split(r"(\*)", g[0]) if part)
        return bool(re.fullmatch(pattern.replace(".*", "[^/]*"), p[0])) and match(g[1:], p[1:])

    return match(glob.split("/"), path.split("/"))


def globs_from(path: str, data) -> str:
    """A glob that may or may not match: segments kept, starred or replaced by ``**``."""
    parts = []
    for segment in path.split("/"):
        choice = data.draw(st.sampled_from(["keep", "star", "stars", "other", "prefix"]))
        parts.append({"keep": segment, "star": "*", "stars": "**",
                      "other": data.draw(st.sampled_from(SEGMENTS)),
                      "prefix": segment[:2] + "*"}[choice])
    glob = "/".join(parts)
    return re.sub(r"(\*\*/)+\*\*", "**", glob)


@settings(max_examples=150, deadline=None)
@given(st.lists(paths_st, min_size=1, max_size=6, unique=True), st.data())
def test_first_matching_rule_wins_as_the_documented_globs_say(names, data):
    globs = [globs_from(data.draw(st.sampled_from(names)), data)
             for _ in range(data.draw(st.integers(1, 4)))]
    rules = rules_lib.normalize([(g, i) for i, g in enumerate(globs)], what="rules")
    chosen = rules_lib.assign(rules, names, what="rules", allow_unused=True)
    for name in names:
        want = next((i for i, g in enumerate(globs) if glob_matches(g, name)), None)
        got = chosen[name].value if name in chosen else None
        assert got == want, (name, globs)


@settings(max_examples=60, deadline=None)
@given(st.lists(paths_st, min_size=1, max_size=5, unique=True))
def test_the_three_forms_give_the_same_assignment(names):
    # A mapping, a list of pairs and a nested dict of the same literal paths.
    pairs = [(name, i) for i, name in enumerate(names)]
    nested: dict = {}
    leaves_only = [n for n in names if not any(m.startswith(n + "/") for m in names)]
    for name in leaves_only:
        node = nested
        *head, last = name.split("/")
        for segment in head:
            node = node.setdefault(segment, {})
        if isinstance(node, dict) and last not in node:
            node[last] = names.index(name)
    by_list = rules_lib.assign(rules_lib.normalize(pairs, what="r"), names, what="r",
                               allow_unused=True)
    by_map = rules_lib.assign(rules_lib.normalize(dict(pairs), what="r"), names, what="r",
                              allow_unused=True)
    assert {k: r.value for k, r in by_list.items()} == {k: r.value for k, r in by_map.items()}
    if any(isinstance(v, dict) for v in nested.values()):
        by_tree = rules_lib.assign(rules_lib.normalize(nested, what="r"), leaves_only,
                                   what="r", allow_unused=True)
        for name in leaves_only:
            assert by_tree[name].value == names.index(name)


def test_a_params_glob_matches_the_qualified_form_and_a_regex_either():
    rules = rules_lib.normalize([("params/head/**", "q"), (re.compile(r".*bias"), "r"),
                                 ("up/kernel", "s")], what="rules")
    chosen = rules_lib.assign(rules, ["head/kernel", "up/bias", "up/kernel"], what="rules")
    assert {k: r.value for k, r in chosen.items()} == {
        "head/kernel": "q", "up/bias": "r", "up/kernel": "s"}
    # Qualified names: a plain glob matches inside params, other collections only whole.
    chosen = rules_lib.assign(rules_lib.normalize([("bn/mean", 1), ("batch_stats/**", 2)],
                                                  what="rules"),
                              ["batch_stats/bn/mean"], what="rules", qualified=True,
                              allow_unused=True)
    assert chosen["batch_stats/bn/mean"].value == 2


@pytest.mark.parametrize("spec, error, match", [
    ("**/kernel", TypeError, r"`rules` must be a mapping or list .*got str; for one rule "
                             r"write \[\('\*\*/kernel', value\)\]"),
    ([("a", 1, 2)], TypeError, r"`rules` entries must be \(pattern, value\) pairs"),
    (["a"], TypeError, r"pair the pattern with its value: \('a', value\)"),
    ({"up": {"k*": 1}}, ValueError, r"key 'up/k\*' of the nested-dict form .* contains '\*'"),
    ({"up": {3: 1}}, TypeError, r"3 \(under 'up'\) is not a str"),
])
def test_malformed_rules_name_the_argument_and_the_fix(spec, error, match):
    with pytest.raises(error, match=match):
        rules_lib.normalize(spec, what="rules")


def test_a_rule_matching_nothing_names_the_closest_paths():
    rules = rules_lib.normalize([("up/kernal", 1)], what="initializers")
    with pytest.raises(ValueError, match=r"initializers: pattern 'up/kernal' matches no "
                                         r"parameter\. Closest real paths: 'up/kernel'"):
        rules_lib.assign(rules, ["up/kernel", "down/bias"], what="initializers")
