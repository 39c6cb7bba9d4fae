"""The plan stage on its own, for both entrances: what ``plan.build`` says of each leaf
(source, key, sharding, rule) from an entrance's trace, and that executing it gives the
framework's own values.

The same two-layer model is written once in Linen and once in NNX; every test runs on
both through the entrances' table, as the public functions do.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import plans
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import engine
from flaxlazy._src import entrances
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib

X = flaxlazy.spec("f32[2,3]")


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="up")(x)
        return nn.LayerNorm(name="norm")(nn.Dense(5, name="down")(x))


class NNXNet(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(3, 4, rngs=rngs)
        self.down = nnx.Linear(4, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)


CALLS = {
    "linen": (LinenNet(), (jax.random.key(0), X), {}),
    "nnx": (NNXNet, (), {"rngs": nnx.Rngs(0)}),
}
PARAMS = ["params/down/bias", "params/down/kernel", "params/norm/bias", "params/norm/scale",
          "params/up/bias", "params/up/kernel"]


def reference(framework):
    """The framework's own init of the same model on the same key: ``{path: array}``."""
    if framework == "linen":
        tree = jax.jit(LinenNet().init)(jax.random.key(0), jnp.zeros(X.shape))
    else:
        tree = nnx.state(nnx.jit(lambda: NNXNet(rngs=nnx.Rngs(0)))(), nnx.Param)
        tree = {"params": nnx.to_pure_dict(tree)}
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def traced_call(framework, placement=None):
    """The model's call traced by its entrance, as ``materialize`` runs the stages."""
    module, args, kwargs = CALLS[framework]
    assert entrances.find(module, fn="materialize").name == framework
    return plans.traced_call(module, args, kwargs, placement=placement)


def by_path(plan):
    return {leaf.path: leaf for leaf in plan.leaves}


@pytest.fixture(params=["linen", "nnx"])
def framework(request):
    return request.param


def test_every_parameter_replays_its_own_initializer_with_a_key_of_its_own(framework):
    with traced_call(framework) as traced:
        plan = plan_lib.build(traced.records)
        leaves = by_path(plan)
        assert sorted(p for p in leaves if p.startswith("params/")) == PARAMS
        params = [leaves[p] for p in PARAMS]
        assert {leaf.source for leaf in params} == {plan_lib.FLAX}
        random = [leaf for leaf in params if leaf.path.endswith("kernel")]
        assert all(leaf.key is not None and leaf.program is not None for leaf in random)
        assert len({leaf.key for leaf in random}) == len(random)  # distinct per layer
        assert all(leaf.sharding is None and leaf.rule is None for leaf in params)
        assert leaves["params/up/kernel"].shape == (3, 4)
        assert leaves["params/down/kernel"].dtype == jnp.float32


def test_executing_the_plan_gives_the_frameworks_own_values(framework):
    with traced_call(framework) as traced:
        plan = plan_lib.build(traced.records)
        got = traced.build(engine.execute(plan, traced.keys, traced.inputs))
        if framework == "nnx":
            got = {"params": nnx.to_pure_dict(nnx.state(got, nnx.Param))}
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]}
        want = reference(framework)
        chex.assert_trees_all_equal({p: flat[p] for p in want}, want)


def test_overrides_name_their_source_and_rule_and_leave_the_rest(framework):
    with traced_call(framework) as traced:
        initializers = {"up/kernel": nn.initializers.zeros,
                        "down/bias": np.full((5,), 2.0, np.float32), "norm/**": None}
        plan = plan_lib.build(traced.records, initializers=initializers)
        leaves = by_path(plan)
        assert leaves["params/up/kernel"].source == plan_lib.INITIALIZER
        assert leaves["params/up/kernel"].rule == "pattern 'up/kernel'"
        assert leaves["params/down/bias"].source == plan_lib.ARRAY
        assert leaves["params/down/kernel"].source == plan_lib.FLAX
        # None keeps the leaf's own initializer, under the rule that said so.
        assert leaves["params/norm/scale"].source == plan_lib.FLAX
        assert leaves["params/norm/scale"].rule == "pattern 'norm/**'"


def test_an_overridden_leafs_key_is_the_same_for_both_entrances():
    keys = {}
    for framework in CALLS:
        with traced_call(framework) as traced:
            plan = plan_lib.build(traced.records,
                                  initializers={"up/kernel": nn.initializers.normal(1.0)})
            keys[framework] = by_path(plan)["params/up/kernel"].key
    assert keys["linen"] == keys["nnx"] is not None


def test_the_placement_gives_each_leaf_its_sharding(framework):
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    place = placement_lib.Placement.from_args(
        fn="materialize", mesh=mesh,
        partition_rules=[("params/**/kernel", P(None, "model")), ("**", P())])
    with traced_call(framework, placement=place) as traced:
        plan = plan_lib.build(traced.records, shardings=place.for_plan(traced.variables))
        leaves = by_path(plan)
        assert leaves["params/up/kernel"].sharding == NamedSharding(mesh, P(None, "model"))
        assert leaves["params/up/bias"].sharding == NamedSharding(mesh, P())


@pytest.mark.parametrize("initializers, error, match", [
    ({"nothing/here": None}, ValueError, r"initializers.*'nothing/here'.*matches no"),
    ({"up/kernel": np.zeros((2, 2), np.float32)}, ValueError, r"up/kernel"),
    ({"up/kernel": "zeros"}, TypeError, r"initializers: .*'up/kernel'.*expected an "
                                        r"initializer"),
])
def test_plan_errors_name_the_path(framework, initializers, error, match):
    with traced_call(framework) as traced:
        with pytest.raises(error, match=match):
            plan_lib.build(traced.records, initializers=initializers)


def test_counts_tally_the_sources(framework):
    with traced_call(framework) as traced:
        plan = plan_lib.build(traced.records, initializers={"up/bias": np.ones(4, np.float32)})
        counts = plan.counts()
        assert counts[plan_lib.ARRAY] == 1
        assert sum(counts.values()) == len(plan.leaves)
