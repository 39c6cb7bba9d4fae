"""The engine on its own, for both entrances: ``engine.execute`` runs a plan through
``sources.registry`` and gives every leaf the value the framework's own init gives it.

Each test traces a call through the entrances' table (``entrances.find``), plans it with
``plan.build`` and executes the plan directly, then compares with ``jax.jit(module.init)``
(Linen) or the ``nnx.jit``-ed constructor (NNX) on the same key, bit for bit. Covered:
each source kind gets exactly its own leaves (the module's own initializers, an
``initializers=`` override, an array, the traced fallback) and makes the right value for
each; leaves land on the sharding the plan gives them (an 8-device CPU mesh); Flax boxes
stay around the arrays; a second key, or a changed module, is never served stale values;
and data-dependent leaves need concrete inputs, not specs.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from plans import traced_call

import flaxlazy
from flaxlazy._src import engine
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.sources import initializer
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources import registry

# up's kernel (32 x 64) is large enough to be drawn flat on one CPU device; the other
# random leaves run compiled programs; the zero biases are filled without compiling.
X = flaxlazy.spec("f32[2,32]")
OVERRIDE = nn.initializers.normal(0.5)
BIAS = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
OVERRIDES = {"down/kernel": OVERRIDE, "down/bias": BIAS}
SOURCES = {
    "params/derived": plan_lib.TRACED,
    "params/down/bias": plan_lib.ARRAY,
    "params/down/kernel": plan_lib.INITIALIZER,
    "params/up/bias": plan_lib.FLAX,
    "params/up/kernel": plan_lib.FLAX,
    "params/w": plan_lib.FLAX,
}


class LinenNet(nn.Module):
    scale: float = 2.0

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(self.scale), (8,))
        # An initializer reading another parameter's traced value: no static recipe.
        self.param("derived", lambda key: w * self.scale + 1.0)
        x = nn.Dense(64, name="up")(x)
        return nn.Dense(8, name="down")(x) * w


class NNXNet(nnx.Module):
    def __init__(self, scale=2.0, *, rngs):
        self.up = nnx.Linear(32, 64, rngs=rngs)
        self.down = nnx.Linear(64, 8, rngs=rngs)
        self.w = nnx.Param(nnx.initializers.normal(scale)(rngs.params(), (8,)))
        # Drawn from two keys: no one cut of the constructor makes it, so no static recipe.
        k1, k2 = rngs.params(), rngs.params()
        self.derived = nnx.Param((jax.random.normal(k1, (8,)) + jax.random.normal(k2, (8,)))
                                 * scale)


def call(framework, seed=0, scale=2.0):
    """``(target, args, kwargs)`` of the public call that initializes the model."""
    if framework == "linen":
        return LinenNet(scale), (jax.random.key(seed), X), {}
    return NNXNet, (scale,), {"rngs": nnx.Rngs(seed)}


def root_keys(framework, seed):
    """The rngs ``engine.execute`` takes for ``key(seed)``, as each entrance hands them."""
    return jax.random.key(seed) if framework == "linen" else [jax.random.key(seed)]


def flat(tree):
    """``{path: array}`` of a variables tree, boxes unwrapped."""
    return traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


def framework_init(target, seed, *inputs):
    """The framework's own init on ``key(seed)``: ``{path: array}``."""
    if isinstance(target, nn.Module):
        return flat(jax.jit(target.init)(jax.random.key(seed), *inputs))
    model = nnx.jit(lambda *a: target(*a, rngs=nnx.Rngs(seed)))(*inputs)
    return flat({"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})


@functools.cache  # the arrays are immutable; callers copy the dict before changing it
def reference(framework, seed=0, scale=2.0):
    """The framework's own init of ``call(framework, seed, scale)``'s model."""
    if framework == "linen":
        return framework_init(LinenNet(scale), seed, jnp.zeros(X.shape, X.dtype))
    return framework_init(lambda *, rngs: NNXNet(scale, rngs=rngs), seed)


@functools.cache
def overridden(path, seed, shape):
    """An ``initializers=`` override's value: drawn with the path's own key, folded into
    the override stream's root (Linen ``params``; NNX ``default`` here)."""
    fold = initializer.override_key(path)
    return jax.jit(lambda k: OVERRIDE(jax.random.fold_in(k, fold), shape, jnp.float32))(
        jax.random.key(seed))


def expected(framework, seed=0):
    """Every leaf of the mixed plan: the framework's, the override's, the array."""
    want = dict(reference(framework, seed))
    want["params/down/kernel"] = overridden("params/down/kernel", seed, (64, 8))
    want["params/down/bias"] = BIAS
    return want


@pytest.fixture(params=["linen", "nnx"])
def framework(request):
    return request.param


def needs_eight_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")


def test_executing_a_plan_gives_the_frameworks_own_values(framework):
    with traced_call(*call(framework)) as traced:
        plan = plan_lib.build(traced.records)
        assert plan.counts() == {plan_lib.FLAX: 5, plan_lib.TRACED: 1}
        got = engine.execute(plan, traced.keys, traced.inputs)
    want = reference(framework)
    assert sorted(flat(got)) == sorted(want) == sorted(SOURCES)
    chex.assert_trees_all_equal(flat(got), want)


def test_each_source_executes_exactly_its_leaves_once_in_registry_order(framework,
                                                                        monkeypatch):
    seen = []

    def spy(source):
        def execute(plan, indices, context):
            seen.append((source.kind, list(indices)))
            out = source.execute(plan, indices, context)
            assert sorted(out) == sorted(indices)  # a source returns its leaves, no others
            return out

        return source._replace(execute=execute)

    monkeypatch.setattr(registry, "SOURCES", tuple(map(spy, registry.SOURCES)))
    with traced_call(*call(framework)) as traced:
        plan = plan_lib.build(traced.records, initializers=OVERRIDES)
        engine.execute(plan, traced.keys, traced.inputs)
    # Sources without leaves (checkpoint, safetensors) are not called at all.
    assert [kind for kind, _ in seen] == [plan_lib.FLAX, plan_lib.INITIALIZER,
                                          plan_lib.ARRAY, plan_lib.TRACED]
    for kind, indices in seen:
        assert indices == [i for i, leaf in enumerate(plan.leaves) if leaf.source == kind]
        assert {plan.leaves[i].path for i in indices} == {
            p for p, k in SOURCES.items() if k == kind}


def test_a_mixed_plan_gives_each_leaf_its_sources_value(framework):
    with traced_call(*call(framework)) as traced:
        plan = plan_lib.build(traced.records, initializers=OVERRIDES)
        assert {leaf.path: leaf.source for leaf in plan.leaves} == SOURCES
        assert plan.counts() == {plan_lib.FLAX: 3, plan_lib.INITIALIZER: 1,
                                 plan_lib.ARRAY: 1, plan_lib.TRACED: 1}
        got = flat(engine.execute(plan, traced.keys, traced.inputs))
    kernel = {leaf.path: leaf for leaf in plan.leaves}["params/down/kernel"]
    assert kernel.key == initializer.override_key("params/down/kernel")
    chex.assert_shape(got["params/down/kernel"], (64, 8))
    chex.assert_trees_all_equal(got, expected(framework))


def test_leaves_are_placed_on_the_plans_shardings(framework):
    needs_eight_devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rules = [("params/up/kernel", P("data", "model")), ("params/down/kernel", P(None, "model")),
             ("params/**/bias", P("model")), ("params/w", P("data")),
             ("params/derived", P("model"))]
    place = placement_lib.Placement.from_args(fn="materialize", mesh=mesh,
                                              partition_rules=rules)
    with traced_call(*call(framework), placement=place) as traced:
        plan = plan_lib.build(traced.records, initializers=OVERRIDES,
                              shardings=place.for_plan(traced.variables))
        got = flat(engine.execute(plan, traced.keys, traced.inputs))
    assert {leaf.source for leaf in plan.leaves} == set(SOURCES.values())
    for leaf in plan.leaves:  # every source places its own leaves
        value = got[leaf.path]
        assert isinstance(leaf.sharding, NamedSharding), leaf.path
        assert value.sharding == leaf.sharding, leaf.path
        shard = leaf.sharding.shard_shape(leaf.shape)
        assert {s.data.shape for s in value.addressable_shards} == {shard}, leaf.path
    assert got["params/up/kernel"].sharding.spec == P("data", "model")
    assert got["params/down/bias"].sharding.spec == P("model")
    # Values never depend on the mesh.
    chex.assert_trees_all_equal(got, expected(framework))


def test_unplaced_leaves_follow_a_committed_key_as_jit_init_does(tmp_path):
    """Every source puts a leaf the plan does not place where jax.jit(init) puts every
    leaf: on the device the key is committed to (sources.kinds.Context.home)."""
    needs_eight_devices()
    device = jax.devices()[3]
    key = jax.device_put(jax.random.key(0), device)
    x = jnp.zeros(X.shape, X.dtype)
    want = flat(jax.jit(LinenNet().init)(key, x))
    assert all(value.devices() == {device} for value in want.values())
    saved = str(tmp_path / "saved")
    flaxlazy.save(saved, {"params": {"up": {"bias": np.full(64, 3.0, np.float32)}}})
    initializers = {"down/kernel": OVERRIDE, "down/bias": BIAS,
                    "up/bias": flaxlazy.from_checkpoint(saved)}
    with traced_call(LinenNet(), (key, X), {}) as traced:
        plan = plan_lib.build(traced.records, initializers=initializers)
        got = flat(engine.execute(plan, key, traced.inputs))
    want["params/down/kernel"] = overridden("params/down/kernel", 0, (64, 8))
    want["params/down/bias"] = BIAS
    want["params/up/bias"] = np.full(64, 3.0, np.float32)
    assert set(plan.counts()) == {plan_lib.FLAX, plan_lib.INITIALIZER, plan_lib.TRACED,
                                  kinds.ARRAY, kinds.CHECKPOINT}
    for path, value in got.items():
        assert value.devices() == {device}, path
    chex.assert_trees_all_equal(got, want)


class LinenBoxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        part = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        logical = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("embed", "mlp"))
        x = nn.Dense(8, kernel_init=part, name="up")(x)
        w = self.param("w", nn.with_partitioning(nn.initializers.normal(1.0), ("model",)),
                       (8,))
        self.param("derived", lambda key: nn.meta.unbox(w) * 2.0)  # traced, unboxed
        return nn.Dense(8, kernel_init=logical, name="mid")(x)


def test_linen_boxes_are_kept_around_the_arrays_as_init_keeps_them():
    x = jnp.zeros(X.shape, X.dtype)
    with traced_call(LinenBoxed(), (jax.random.key(0), X), {}) as traced:
        plan = plan_lib.build(traced.records)
        got = engine.execute(plan, traced.keys, traced.inputs)
    want = jax.jit(LinenBoxed().init)(jax.random.key(0), x)
    params = got["params"]
    assert isinstance(params["up"]["kernel"], nn.Partitioned)
    assert params["up"]["kernel"].names == (None, "model")
    assert isinstance(params["mid"]["kernel"], nn.LogicallyPartitioned)
    assert params["mid"]["kernel"].names == ("embed", "mlp")
    assert isinstance(params["w"], nn.Partitioned)
    assert plan.counts()[plan_lib.TRACED] == 1
    # Structures (box types and their names included) and values are init's.
    chex.assert_trees_all_equal(got, want)


class NNXBoxed(nnx.Module):
    def __init__(self, *, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        self.up = nnx.Linear(16, 64, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)


def test_nnx_annotations_become_boxes_and_place_their_leaves():
    needs_eight_devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    place = placement_lib.Placement.from_args(fn="materialize", mesh=mesh)
    with traced_call(NNXBoxed, (), {"rngs": nnx.Rngs(0)}, placement=place) as traced:
        plan = plan_lib.build(traced.records, shardings=place.for_plan(traced.variables))
        got = engine.execute(plan, traced.keys, traced.inputs)
        kernel = got["params"]["up"]["kernel"]
        assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
        assert kernel.value.sharding.spec == P(None, "model")
        assert not isinstance(got["params"]["down"]["kernel"], nn.meta.AxisMetadata)
        model = traced.build(got)
    with jax.set_mesh(mesh):
        want = nnx.jit(lambda: NNXBoxed(rngs=nnx.Rngs(0)))()
    # The module's variables carry NNX's own metadata (out_sharding...) and values.
    chex.assert_trees_all_equal(nnx.state(model), nnx.state(want))


def test_another_key_gives_the_frameworks_values_for_that_key(framework):
    with traced_call(*call(framework)) as traced:
        plan = plan_lib.build(traced.records, initializers=OVERRIDES)
        runs = {seed: flat(engine.execute(plan, root_keys(framework, seed), traced.inputs))
                for seed in (0, 1)}
        again = flat(engine.execute(plan, root_keys(framework, 0), traced.inputs))
    for seed, got in runs.items():
        chex.assert_trees_all_equal(got, expected(framework, seed))
    chex.assert_trees_all_equal(again, runs[0])
    for path in ("params/up/kernel", "params/w", "params/down/kernel", "params/derived"):
        assert not np.array_equal(runs[0][path], runs[1][path]), path


def test_a_changed_module_is_never_served_anothers_values(framework):
    """The compiled programs and the traced run are cached by what they compute: a model
    that differs in one captured number gets its own values, in the same process."""
    got = {}
    for scale in (2.0, 3.0):
        with traced_call(*call(framework, scale=scale)) as traced:
            plan = plan_lib.build(traced.records)
            got[scale] = flat(engine.execute(plan, traced.keys, traced.inputs))
        chex.assert_trees_all_equal(got[scale], reference(framework, scale=scale))
    assert not np.array_equal(got[2.0]["params/derived"], got[3.0]["params/derived"])


def test_executing_inside_jit_with_traced_keys_gives_the_same_values(framework):
    with traced_call(*call(framework)) as traced:
        plan = plan_lib.build(traced.records, initializers=OVERRIDES)
        got = jax.jit(lambda keys: engine.execute(plan, keys, traced.inputs))(
            root_keys(framework, 1))
    chex.assert_trees_all_equal(flat(got), expected(framework, 1))


class TwoStreams(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(32, 64, rngs=rngs)
        self.noise = nnx.Param(jax.random.normal(rngs.noise(), (40, 40)))  # drawn flat
        self.small = nnx.Param(jax.random.uniform(rngs.noise(), (3,)))  # compiled
        self.mixed = nnx.Param(jax.random.uniform(rngs.noise(), (3,))
                               + jax.random.uniform(rngs.params(), (3,)))  # traced


def test_each_leaf_is_drawn_from_its_own_streams_root():
    with traced_call(TwoStreams, (), {"rngs": nnx.Rngs(params=0, noise=5)}) as traced:
        plan = plan_lib.build(traced.records)
        streams = traced.records.call.streams
        assert sorted(streams) == ["noise", "params"]
        by_path = {leaf.path: leaf for leaf in plan.leaves}
        assert by_path["params/noise"].stream == by_path["params/small"].stream == "noise"
        assert by_path["params/up/kernel"].stream == "params"
        assert by_path["params/mixed"].source == plan_lib.TRACED
        seeds = {"params": 0, "noise": 9}  # only the noise stream's key changes
        got = flat(engine.execute(plan, [jax.random.key(seeds[s]) for s in streams],
                                  traced.inputs))
    want = framework_init(lambda *, rngs: TwoStreams(rngs=nnx.Rngs(params=0, noise=9)), 0)
    chex.assert_trees_all_equal(got, want)
    before = framework_init(lambda *, rngs: TwoStreams(rngs=nnx.Rngs(params=0, noise=5)), 0)
    chex.assert_trees_all_equal(got["params/up/kernel"], before["params/up/kernel"])
    assert not np.array_equal(got["params/noise"], before["params/noise"])


class LinenData(nn.Module):
    """``scale`` from the first input's values, ``offset`` from the second's."""

    @nn.compact
    def __call__(self, x, y):
        self.param("scale", lambda key: jnp.abs(x).mean(0) + 1.0)
        self.param("offset", lambda key: y.sum(0))
        return nn.Dense(4, name="up")(x)


class NNXData(nnx.Module):
    def __init__(self, x, y, *, rngs):
        self.up = nnx.Linear(3, 4, rngs=rngs)
        self.scale = nnx.Param(jnp.abs(jnp.asarray(x)).mean(0) + 1.0)
        self.offset = nnx.Param(jnp.asarray(y).sum(0))


DATA_X = jnp.arange(6.0).reshape(2, 3) - 2.0
DATA_Y = jnp.arange(4.0).reshape(2, 2) * 0.5
SPEC_X, SPEC_Y = flaxlazy.spec("f32[2,3]"), flaxlazy.spec("f32[2,2]")


def data_call(framework, *inputs):
    if framework == "linen":
        return LinenData(), (jax.random.key(0), *inputs), {}
    return NNXData, inputs, {"rngs": nnx.Rngs(0)}


def test_data_dependent_leaves_take_the_inputs_values(framework):
    target = data_call(framework)[0]
    want = framework_init(target, 0, DATA_X, DATA_Y)
    with traced_call(*data_call(framework, SPEC_X, SPEC_Y)) as traced:
        plan = plan_lib.build(traced.records)
        sources = {leaf.path: leaf.source for leaf in plan.leaves}
        assert sources["params/scale"] == sources["params/offset"] == plan_lib.TRACED
        assert sources["params/up/kernel"] == plan_lib.FLAX
        got = flat(engine.execute(plan, traced.keys, [DATA_X, DATA_Y]))
        # Other data gives other values from the same plan.
        other = flat(engine.execute(plan, traced.keys, [DATA_X * 2.0, DATA_Y]))
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(other["params/scale"], jnp.abs(DATA_X * 2.0).mean(0) + 1.0)
    chex.assert_trees_all_equal(other["params/up/kernel"], want["params/up/kernel"])


def test_a_data_dependent_leaf_given_a_spec_is_an_error_naming_it(framework):
    with traced_call(*data_call(framework, DATA_X, DATA_Y)) as traced:
        plan = plan_lib.build(traced.records)
        with pytest.raises(ValueError, match=r"^'params/offset' depends on the values of "
                                             r"input\(s\) #1 .*\(2, 2\).*given as specs") as e:
            engine.execute(plan, traced.keys, [DATA_X, SPEC_Y])
        assert "params/scale" not in str(e.value) and "#0" not in str(e.value)
        with pytest.raises(ValueError, match=r"'params/offset', 'params/scale' depend on "
                                             r"the values of input\(s\) #0 .*, #1 "):
            engine.execute(plan, traced.keys, [SPEC_X, SPEC_Y])
