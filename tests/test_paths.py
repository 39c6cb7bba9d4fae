import re

import pytest

from flaxlazy._src import paths


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
