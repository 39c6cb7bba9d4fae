"""The source registry: one ``Source`` per kind, consulted by plan, engine and reports."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlazy
from flaxlazy._src import initializer_names
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import registry


def _traced(module, *inputs):
    call = linen_call.make_call(module, jax.random.key(0), list(inputs), {}, fn="test")
    return linen_call.trace(call)


def test_kinds_are_unique_and_found_by_kind():
    kinds_seen = [source.kind for source in registry.SOURCES]
    assert len(set(kinds_seen)) == len(kinds_seen)
    for source in registry.SOURCES:
        assert registry.by_kind(source.kind) is source
        assert isinstance(source, kinds.Source)


@pytest.mark.parametrize(
    "value, kind",
    [
        (nn.initializers.zeros, kinds.INITIALIZER),
        (np.zeros((2, 3), np.float32), kinds.ARRAY),
        (jnp.zeros((2, 3)), kinds.ARRAY),
        (flaxlazy.from_checkpoint("ckpt"), kinds.CHECKPOINT),
    ],
)
def test_one_source_recognizes_each_value(value, kind):
    assert [s.kind for s in registry.SOURCES if s.recognizes(value)] == [kind]


def test_none_is_the_module_own_then_the_traced_fallback():
    assert [s.kind for s in registry.SOURCES if s.recognizes(None)] == [
        kinds.FLAX, kinds.TRACED]


def test_plan_kinds_and_descriptions():
    model = nn.Sequential([nn.Dense(4), nn.Dense(3)])
    traced = _traced(model, flaxlazy.spec("f32[2,5]"))
    inits = {"layers_1/kernel": np.ones((4, 3), np.float32),
             "layers_1/bias": nn.initializers.normal(0.5)}
    plan = plan_lib.build(traced, initializers=inits)
    names = initializer_names.Names(traced, inits)
    got = {leaf.path: (leaf.source, names.of(leaf)) for leaf in plan.leaves}
    assert got == {
        "params/layers_0/kernel": (kinds.FLAX, "lecun_normal"),
        "params/layers_0/bias": (kinds.FLAX, "zeros"),
        "params/layers_1/kernel": (kinds.ARRAY, "array"),
        "params/layers_1/bias": (kinds.INITIALIZER, "override normal(stddev=0.5)"),
    }


def test_unrecognized_value_is_a_type_error_naming_the_path():
    with pytest.raises(TypeError, match=r"pattern '\*\*/bias' maps 'params/bias' "
                       r"to 3\.0; expected an initializer"):
        flaxlazy.materialize(nn.Dense(2), jax.random.key(0), flaxlazy.spec("f32[1,3]"),
                             initializers={"**/bias": 3.0})


class Fill(NamedTuple):
    """A test-only initializer-tree value: fill the matched leaves with ``value``."""

    value: float


def _fill_source() -> kinds.Source:
    def plan(query: kinds.Query, memo: dict) -> kinds.Planned:
        memo.setdefault("paths", []).append(query.path)
        return kinds.Planned(value=query.rule.value.value)

    def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
        del context
        return {i: jnp.full(plan.leaves[i].shape, plan.leaves[i].value, plan.leaves[i].dtype)
                for i in indices}

    finished = []

    def finish(leaves, memo):
        finished.append(list(memo.get("paths", [])))

    source = kinds.Source("fill", lambda v: isinstance(v, Fill), plan,
                          lambda leaf, found: f"fill {leaf.value}", execute, finish)
    return source, finished


def test_a_new_source_is_one_registration(monkeypatch):
    source, finished = _fill_source()
    monkeypatch.setattr(registry, "SOURCES", registry.SOURCES + (source,))
    monkeypatch.setattr(registry, "_BY_KIND", {**registry._BY_KIND, "fill": source})
    model = nn.Dense(3)
    x = flaxlazy.spec("f32[2,5]")
    inits = {"kernel": Fill(2.5)}
    got = flaxlazy.materialize(model, jax.random.key(0), x, initializers=inits)
    want = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 5)))
    chex.assert_trees_all_equal(got["params"]["kernel"], jnp.full((5, 3), 2.5))
    chex.assert_trees_all_equal(got["params"]["bias"], want["params"]["bias"])
    assert finished == [["params/kernel"]]
    report = flaxlazy.inspect(model, jax.random.key(0), x, initializers=inits)
    assert {leaf.path: leaf.init for leaf in report.leaves}["params/kernel"] == "fill 2.5"
