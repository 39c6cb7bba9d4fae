import re

import pytest

from flaxlazy._src import paths
from flaxlazy._src import rules


@pytest.mark.parametrize(
    "pattern, path, hit",
    [
        ("**/kernel", "Block_0/Dense_1/kernel", True),
        ("**/kernel", "kernel", True),
        ("**/kernel", "Block_0/Dense_1/kernel_2", False),
        ("*/kernel", "Dense_0/kernel", True),
        ("*/kernel", "Block_0/Dense_1/kernel", False),
        ("Dense_*/bias", "Dense_12/bias", True),
        ("head/**", "head/Dense_0/kernel", True),
        ("head/**", "header/kernel", False),
        ("Block_?/**", "Block_3/x", True),
        ("encoder/**/kernel", "encoder/kernel", True),
        ("encoder/**/kernel", "encoder/a/b/kernel", True),
        ("layers_0/kernel", "layers_0/kernel", True),
        ("layers_0/kernel", "layers_0/kernel/x", False),
        ("a.b", "aXb", False),
    ],
)
def test_glob_semantics(pattern, path, hit):
    assert bool(paths.glob_to_regex(pattern).fullmatch(path)) is hit


def test_compile_pattern_accepts_regex():
    rx = re.compile(r"Dense_\d+/kernel")
    assert paths.compile_pattern(rx) is rx


@pytest.mark.parametrize("bad, match", [("a**/b", "whole path segment"), ("", "Empty")])
def test_bad_globs(bad, match):
    with pytest.raises(ValueError, match=match):
        paths.glob_to_regex(bad)


def test_pattern_type_error():
    with pytest.raises(TypeError, match=r"`initializers`: a path pattern must be a str glob .*"
                                        r"got int 3"):
        paths.compile_pattern(3, "initializers")


def test_flatten_keeps_boxes_and_joins_paths():
    import flax.linen as nn
    import jax.numpy as jnp

    tree = {"params": {"Dense_0": {"kernel": nn.Partitioned(jnp.ones(2), ("a",))}}}
    flat, _ = paths.flatten(tree)
    assert [p for p, _ in flat] == ["params/Dense_0/kernel"]
    assert isinstance(flat[0][1], nn.Partitioned)


def test_closest_paths():
    cands = ["Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel"]
    assert paths.closest("Dense_0/kernl", cands)[0] == "Dense_0/kernel"


# ---------------------------------------------------------------- the rule engine (rules.py)


NAMES = ["layers_0/kernel", "layers_0/bias", "layers_1/kernel", "head/kernel"]


def _values(spec, names=NAMES, qualified=False):
    chosen = rules.assign(rules.normalize(spec, what="initializers"), names,
                          what="initializers", qualified=qualified)
    return {name: rule.value for name, rule in chosen.items()}


def test_mapping_mixes_regex_and_glob_keys_in_insertion_order():
    spec = {
        re.compile(r"layers_0/.*"): "a",
        "**/kernel": "b",
        re.compile(r"layers_\d+/kernel"): "c",  # never first: shadowed by the glob
        re.compile(r".*"): "d",
    }
    assert _values(spec) == {
        "layers_0/kernel": "a", "layers_0/bias": "a", "layers_1/kernel": "b", "head/kernel": "b"
    }
    reordered = dict(reversed(list(spec.items())))
    assert set(_values(reordered).values()) == {"d"}
    # Two compiled-regex keys only (sorting them would raise TypeError).
    two = {re.compile("head/.*"): 1, re.compile("layers_.*"): 2}
    assert _values(two) == {"head/kernel": 1, "layers_0/kernel": 2, "layers_0/bias": 2,
                            "layers_1/kernel": 2}


@pytest.mark.parametrize(
    "pattern, hits",
    [
        ("params/layers_0/**", {"layers_0/kernel", "layers_0/bias"}),  # as summary prints it
        ("layers_0/**", {"layers_0/kernel", "layers_0/bias"}),  # inside params
        ("params/**/kernel", {"layers_0/kernel", "layers_1/kernel", "head/kernel"}),
        ("*/kernel", {"layers_0/kernel", "layers_1/kernel", "head/kernel"}),
        (re.compile(r"params/head/.*"), {"head/kernel"}),  # a regex matches either form
        (re.compile(r"head/.*"), {"head/kernel"}),
    ],
)
def test_patterns_match_the_short_and_the_printed_path(pattern, hits):
    got = rules.assign(rules.normalize([(pattern, 1)], what="initializers"), NAMES,
                       what="initializers")
    assert set(got) == hits


def test_qualified_names_of_other_collections():
    names = ["params/Dense_0/kernel", "batch_stats/BatchNorm_0/mean", "opt_state/0/mu/w"]
    spec = [("params/**", "p"), ("Dense_0/**", "short"), ("batch_stats/**", "b"),
            ("opt_state/**", "o")]
    got = rules.assign(rules.normalize(spec, what="r"), names, what="r", qualified=True)
    assert {n: r.value for n, r in got.items()} == {
        "params/Dense_0/kernel": "p", "batch_stats/BatchNorm_0/mean": "b",
        "opt_state/0/mu/w": "o",
    }
    # 'params/**' never matches another collection; the short glob only params.
    with pytest.raises(ValueError, match=r"r: pattern 'batch_stats/x' matches no parameter\. "
                                         r"Closest real paths: 'batch_stats/BatchNorm_0/mean'"):
        rules.assign(rules.normalize([("batch_stats/x", 1)], what="r"), names, what="r",
                     qualified=True)


def test_nested_form_and_normalized_rules_pass_through():
    nested = {"params": {"layers_0": 1}, "head": {"kernel": 2}}
    assert _values(nested) == {"layers_0/kernel": 1, "layers_0/bias": 1, "head/kernel": 2}
    normalized = rules.normalize({"head/**": 3}, what="initializers")
    assert rules.normalize(normalized, what="initializers") == normalized
    with pytest.raises(ValueError, match=r"`initializers`: key 'layers_\*' of the nested-dict "
                                         r"form .* contains '\*'"):
        rules.normalize({"layers_*": {"kernel": 1}}, what="initializers")
