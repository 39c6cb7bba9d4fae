"""materialize / lazy: values equal module.init, overrides, keys, placement, errors."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from plans import plan_of

import flaxlazy
from flaxlazy._src import _compat
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.compiles import count_compiles
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.linen import recorder
from flaxlazy._src.sources import initializer

X = flaxlazy.spec("f32[4,16]")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dense(8, kernel_init=nn.initializers.normal(0.02))(nn.relu(x))
        return nn.Dense(2, name="head")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return nn.relu(nn.Dense(16)(carry)), None


class Scanned(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = stack(name="stack")(x, None)
        return nn.Dense(4, name="head")(x)


def _plan(module, *inputs, initializers=None, rngs=None, **kwargs):
    rngs = jax.random.key(0) if rngs is None else rngs
    return plan_of(module, rngs, *inputs, initializers=initializers, **kwargs)


def test_flax_static_hash_matches_flax():
    from flax.core import scope

    root = jax.random.key(3)
    for data in [("Dense_0", 1), ("a", "b", 7), ("x" * 40, 2**40)]:
        want = scope._fold_in_static(root, data)
        got = jax.random.fold_in(root, _compat.static_hash(data))
        chex.assert_trees_all_equal(jax.random.key_data(want), jax.random.key_data(got))


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_equals_jit_init_and_eager_init(make_key):
    key = make_key(0)
    x = jnp.ones(X.shape)
    got = flaxlazy.materialize(Net(), key, X, train=True)
    jit_init = jax.jit(lambda k: Net().init(k, x, train=True))
    chex.assert_trees_all_equal(got, jit_init(key))
    # Eager init rounds some initializers differently from compiled code (<= 1 ulp).
    chex.assert_trees_all_close(got, Net().init(key, x, train=True), rtol=1e-6, atol=1e-7)
    for leaf in jax.tree.leaves(got):
        assert isinstance(leaf, jax.Array)


def test_static_recipes_replayed_scan_stacks_included():
    plan = _plan(Scanned(), X)
    assert plan.counts() == {"flax": 4}  # head kernel/bias; stacked kernel/bias
    assert {leaf.path: leaf.layers for leaf in plan.leaves} == {
        "params/head/bias": (), "params/head/kernel": (),
        "params/stack/Dense_0/bias": (3,), "params/stack/Dense_0/kernel": (3,),
    }
    got = flaxlazy.materialize(Scanned(), jax.random.key(1), X)
    want = jax.jit(Scanned().init)(jax.random.key(1), jnp.ones(X.shape))
    chex.assert_trees_all_equal(got, want)


class SharedInits(nn.Module):
    """Three Dense layers sharing one JAX kernel initializer, two of one shape; a user
    initializer on the last."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(8, kernel_init=init, name="a")(x)
        x = nn.Dense(8, kernel_init=init, name="b")(x)
        x = nn.Dense(6, kernel_init=init, name="c")(x)
        user = lambda k, s, d=jnp.float32: 0.5 * jax.random.normal(k, s, d)  # noqa: E731
        x = nn.Dense(6, kernel_init=user, name="d")(x)
        return nn.Dense(6, kernel_init=user, name="e")(x)


def test_jax_initializers_traced_once_per_call_signature():
    call = linen_call.make_call(SharedInits(), jax.random.key(0), (jnp.ones((2, 8)),), {})
    records = linen_call.trace(call).records
    program = {path[0]: rec.program for (col, path), rec in records.items()
               if path[-1] == "kernel"}
    assert program["a"] is program["b"]  # same function, same shape: traced once
    assert program["c"] is not program["a"]  # another shape
    assert program["d"] is not program["e"]  # user initializers: traced every call
    assert recorder.pure_call(nn.initializers.constant(np.ones(3)), ((3,),), {}) is None
    assert recorder.pure_call(nn.initializers.zeros, ((3,), True), {}) != recorder.pure_call(
        nn.initializers.zeros, ((3,), 1), {})
    key, x = jax.random.key(4), jnp.ones((2, 8))
    chex.assert_trees_all_equal(flaxlazy.materialize(SharedInits(), key, x),
                                jax.jit(SharedInits().init)(key, x))


def test_concrete_inputs_equal_spec_inputs():
    x = jax.random.normal(jax.random.key(5), X.shape)
    a = flaxlazy.materialize(Net(), jax.random.key(0), x)
    b = flaxlazy.materialize(Net(), jax.random.key(0), X)
    chex.assert_trees_all_equal(a, b)


def test_device_placement():
    device = jax.devices()[-1]
    got = flaxlazy.materialize(Net(), jax.random.key(0), X, device=device)
    for leaf in jax.tree.leaves(got):
        assert leaf.devices() == {device}
    with pytest.raises(TypeError, match="`device` must be a jax.Device"):
        flaxlazy.materialize(Net(), jax.random.key(0), X, device="cpu:0")


def test_warm_materialize_compiles_nothing():
    flaxlazy.materialize(Scanned(), jax.random.key(0), X)
    with count_compiles() as c:
        flaxlazy.materialize(Scanned(), jax.random.key(1), X)
        flaxlazy.materialize(Scanned(), jax.random.key(2), X)
    assert c.count == 0


def test_compiles_once_per_signature_not_per_layer():
    flaxlazy.materialize(models.DenseStack(2), jax.random.key(0), X)  # warms the shared signatures
    with count_compiles() as c:
        flaxlazy.materialize(models.DenseStack(12), jax.random.key(0), X)
    assert c.count <= 1  # only the key derivation for the new number of keys


def test_overrides_change_only_matched_leaves():
    key = jax.random.key(0)
    base = flaxlazy.materialize(Net(), key, X)
    got = flaxlazy.materialize(
        Net(), key, X, initializers={"**/bias": nn.initializers.ones, "head/kernel": None}
    )
    flat_base = dict(plan_lib.paths.flatten(base)[0])
    for path, leaf in plan_lib.paths.flatten(got)[0]:
        if path.startswith("params/") and path.endswith("/bias"):
            chex.assert_trees_all_equal(leaf, jnp.ones_like(leaf))
        else:
            chex.assert_trees_all_equal(leaf, flat_base[path])


def test_first_match_wins_and_regex_patterns():
    got = flaxlazy.materialize(
        Net(), jax.random.key(0), X,
        initializers=[
            (re.compile(r"head/.*"), nn.initializers.constant(3.0)),
            ("**/kernel", nn.initializers.zeros),
        ],
    )
    p = got["params"]
    assert (p["head"]["kernel"] == 3).all() and (p["head"]["bias"] == 3).all()
    assert (p["Dense_0"]["kernel"] == 0).all() and (p["Dense_1"]["kernel"] == 0).all()


def test_nested_tree_form_with_subtrees():
    w = np.arange(16.0, dtype=np.float32).reshape(8, 2)
    got = flaxlazy.materialize(
        Net(), jax.random.key(0), X,
        initializers={"head": {"kernel": w}, "Dense_0": nn.initializers.zeros},
    )
    chex.assert_trees_all_equal(got["params"]["head"]["kernel"], jnp.asarray(w))
    assert all((leaf == 0).all() for leaf in jax.tree.leaves(got["params"]["Dense_0"]))


def test_override_keys_are_per_path_and_stable():
    """Same key for the same path, whatever else is in the model; distinct per path."""

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="a")(x) + nn.Dense(8, name="b")(x)

    class Bigger(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(8, name="extra")(nn.Dense(16, name="first")(x))
            return nn.Dense(8, name="a")(x) + nn.Dense(8, name="b")(x) + y

    init = {"**/kernel": nn.initializers.normal(1.0)}
    s = flaxlazy.materialize(Small(), jax.random.key(0), X, initializers=init)["params"]
    b = flaxlazy.materialize(Bigger(), jax.random.key(0), X, initializers=init)["params"]
    chex.assert_trees_all_equal(s["a"]["kernel"], b["a"]["kernel"])
    chex.assert_trees_all_equal(s["b"]["kernel"], b["b"]["kernel"])
    assert not np.allclose(s["a"]["kernel"], s["b"]["kernel"])
    # The key is the root key with a hash of the path folded in: reproducible by hand.
    k = jax.random.fold_in(jax.random.key(0), initializer.override_key("params/a/kernel"))
    chex.assert_trees_all_equal(s["a"]["kernel"], nn.initializers.normal(1.0)(k, (16, 8)))


def test_scan_override_is_per_layer():
    layers = 4
    got = flaxlazy.materialize(
        Scanned(layers), jax.random.key(0), X,
        initializers={"stack/**/kernel": nn.initializers.variance_scaling(1.0, "fan_in", "normal")},
    )
    kernel = got["params"]["stack"]["Dense_0"]["kernel"]
    chex.assert_shape(kernel, (layers, 16, 16))
    # Fan-in is per layer (16, not layers*16), and every layer has its own key.
    key = jax.random.fold_in(
        jax.random.key(0), initializer.override_key("params/stack/Dense_0/kernel")
    )
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    want = jnp.stack([init(k, (16, 16)) for k in jax.random.split(key, layers)])
    chex.assert_trees_all_close(kernel, want, rtol=1e-6)
    assert len({float(kernel[i, 0, 0]) for i in range(layers)}) == layers
    # Not overridden: bias equals module.init.
    want_bias = Scanned(layers).init(jax.random.key(0), jnp.ones(X.shape))
    chex.assert_trees_all_equal(
        got["params"]["stack"]["Dense_0"]["bias"],
        want_bias["params"]["stack"]["Dense_0"]["bias"],
    )


def test_data_dependent_init_needs_concrete_inputs():
    class DataInit(nn.Module):
        @nn.compact
        def __call__(self, x):
            scale = self.param("scale", lambda key: 1.0 / (x.std(axis=0) + 1e-6))
            return nn.Dense(3)(x * scale)

    x = jax.random.normal(jax.random.key(1), X.shape)
    got = flaxlazy.materialize(DataInit(), jax.random.key(0), x)
    chex.assert_trees_all_close(got, DataInit().init(jax.random.key(0), x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"'params/scale' depends on the values of input"):
        flaxlazy.materialize(DataInit(), jax.random.key(0), X)


def test_variable_changed_after_creation_is_exact():
    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x):
            count = self.variable("state", "count", jnp.zeros, (), jnp.int32)
            count.value += 1
            return nn.Dense(2)(x)

    got = flaxlazy.materialize(Counter(), jax.random.key(0), X)
    assert int(got["state"]["count"]) == 1
    chex.assert_trees_all_equal(got, Counter().init(jax.random.key(0), jnp.ones(X.shape)))


def test_lazy_bundle_and_use_inside_jit():
    net = flaxlazy.lazy(Scanned())
    assert isinstance(net, flaxlazy.Lazy)
    shapes = net.shapes(jax.random.key(0), X)
    variables = jax.jit(lambda k: net.init(k, X))(jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, shapes)
    chex.assert_trees_all_equal(variables, flaxlazy.materialize(Scanned(), jax.random.key(0), X))
    x = jnp.ones(X.shape)
    chex.assert_trees_all_equal(net.apply(variables, x), Scanned().apply(variables, x))


# ---------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "initializers, error, match",
    [
        ({"**/kernl": nn.initializers.zeros}, ValueError,
         r"pattern '\*\*/kernl' matches no parameter\. Closest real paths: .*kernel"),
        ({"Dense_0": nn.initializers.zeros}, ValueError,
         r"pattern 'Dense_0' matches no parameter.*'Dense_0/"),
        ({"head": {"kernal": nn.initializers.zeros}}, ValueError,
         r"tree key 'head/kernal' matches no parameter.*'head/kernel'"),
        ([(re.compile("nope.*"), nn.initializers.zeros)], ValueError,
         r"pattern re.compile\('nope\.\*'\) matches no parameter"),
        ({"head/kernel": np.zeros((3, 2), np.float32)}, ValueError,
         r"'params/head/kernel' gives float32\[3,2\], but the parameter is float32\[8,2\]"),
        ({"head/kernel": np.zeros((8, 2), np.float64)}, ValueError,
         r"gives float64\[8,2\], but the parameter is float32\[8,2\]\. Cast it"),
        ({"head/kernel": lambda k, s, d: jnp.zeros((2,), d)}, ValueError,
         r"initializer from pattern 'head/kernel' for 'params/head/kernel' gives float32\[2\]"),
        ({"head/kernel": lambda k, s, d: jnp.zeros(s, jnp.bfloat16)}, ValueError,
         r"gives bfloat16\[8,2\], but the parameter is float32\[8,2\]"),
        ({"head/kernel": lambda k: k}, ValueError,
         r"pattern 'head/kernel' failed for 'params/head/kernel' \(float32\[8,2\]\): TypeError"),
        ({"head/kernel": "zeros"}, TypeError,
         r"maps 'params/head/kernel' to 'zeros'; expected an initializer"),
        ({"head/kernel": nn.with_partitioning(nn.initializers.zeros, (None, "model"))},
         ValueError, r"pattern 'head/kernel' returns a Flax Partitioned for "
         r"'params/head/kernel'; an initializer must return the plain array"),
        ({"head/kernel": nn.Partitioned(jnp.zeros((8, 2)), names=(None, "model"))},
         ValueError, r"returns a Flax Partitioned .*Return the value inside"),
        ({"head/kernel": lambda k, s, d: {"w": jnp.zeros(s, d)}}, ValueError,
         r"returns dict .*must return one array"),
        ("**/kernel", TypeError, r"`initializers` must be a mapping"),
        ([("**/kernel",)], TypeError, r"entries must be \(pattern, value\) pairs"),
    ],
)
def test_initializer_errors(initializers, error, match):
    with pytest.raises(error, match=match):
        flaxlazy.materialize(Net(), jax.random.key(0), X, initializers=initializers)


@pytest.mark.parametrize(
    "rngs, match",
    [
        (0, r"materialize: `rngs` must be a PRNG key .*got 0"),
        (jnp.zeros(2), r"`rngs` must be a PRNG key .*got ArrayImpl of dtype float32"),
        (jnp.zeros(3, jnp.uint32), r"`rngs` must be .*shape \(3,\)"),
        ({"params": jax.random.key(0), "dropout": 1.5}, r"`rngs\['dropout'\]` must be"),
    ],
)
def test_rngs_that_are_not_keys(rngs, match):
    with pytest.raises(TypeError, match=match):
        flaxlazy.materialize(Net(), rngs, X)
    with pytest.raises(TypeError, match=match.replace("materialize", "abstract_init")):
        flaxlazy.abstract_init(Net(), rngs, X)


def test_rngs_without_params_key_when_params_are_created():
    rngs = {"dropout": jax.random.key(0)}
    for fn in (flaxlazy.materialize, flaxlazy.abstract_init):
        with pytest.raises(ValueError, match=r"`rngs` has no 'params' key \(it has \['dropout'\]"):
            fn(Net(), rngs, X)


def test_module_that_is_not_a_linen_module():
    # Any other callable is an NNX constructor; this one does not return a module.
    with pytest.raises(TypeError, match=r"materialize: <lambda> is neither a flax.linen."
                                        r"Module nor a constructor returning an nnx.Module: "
                                        r"called with the arguments given, it returned an "
                                        r"array of shape \(4, 16\), not an nnx.Module"):
        flaxlazy.materialize(lambda k, x: x, jax.random.key(0), X)
    with pytest.raises(TypeError, match=r"materialize: `module` must be a flax.linen.Module "
                                        r"instance .*got int 3"):
        flaxlazy.materialize(3, jax.random.key(0), X)
    with pytest.raises(TypeError, match=r"abstract_init: `module` .*Create an instance"):
        flaxlazy.abstract_init(nn.Dense, jax.random.key(0), X)


def test_raw_uint32_keys_still_work():
    got = flaxlazy.materialize(Net(), jax.random.PRNGKey(0), X)
    chex.assert_trees_all_equal(got, jax.jit(Net().init)(jax.random.PRNGKey(0), jnp.ones(X.shape)))


def test_override_without_params_key():
    class KeylessParams(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.variable("params", "w", jnp.zeros, x.shape[-1:]).value

    rngs = {"dropout": jax.random.key(0)}
    got = flaxlazy.materialize(KeylessParams(), rngs, X)
    chex.assert_trees_all_equal(got, KeylessParams().init(rngs, jnp.ones(X.shape)))
    with pytest.raises(ValueError, match="needs a 'params' key"):
        flaxlazy.materialize(KeylessParams(), rngs, X, initializers={"w": nn.initializers.ones})


def test_repeated_calls_rebuild_plans_but_reuse_compiled_code():
    # Plans are never cached (they hold arrays, closures and checkpoint entries); the
    # compiled initializers are, keyed by the program they compute.
    assert plan_of(Net(), jax.random.key(0), X) is not plan_of(Net(), jax.random.key(0), X)
    init = {"**/bias": nn.initializers.ones}
    first = flaxlazy.materialize(Net(), jax.random.key(0), X, initializers=init)
    with count_compiles() as c:
        again = flaxlazy.materialize(
            Net(), jax.random.key(0), X, initializers={"**/bias": nn.initializers.ones}
        )
    assert c.count == 0
    chex.assert_trees_all_equal(first, again)


def test_remat_parameters_replay_alone_bit_identical_and_flat_in_depth():
    # nn.remat changes no value: its parameters derive their keys from the root key as
    # outside, so they take the per-parameter fast path, not the traced run.
    key, x = jax.random.key(3), flaxlazy.spec("f32[2,8]")
    for depth in (2, 12):
        assert plan_of(models.RematStack(depth), key, x).counts() == {"flax": 6 * depth + 2}
        got = flaxlazy.materialize(models.RematStack(depth), key, x)
        want = jax.jit(models.RematStack(depth).init)(key, jnp.zeros(x.shape))
        chex.assert_trees_all_equal(got, want)
    flaxlazy.clear_caches()
    counts = []
    for depth in (2, 12):
        with count_compiles() as c:
            flaxlazy.materialize(models.RematStack(depth), key, x)
        counts.append(c.count)
        flaxlazy.clear_caches()
    assert counts[0] == counts[1], counts


def test_remat_with_static_args_and_scan_of_remat_stay_exact():
    for case in (models.remat_layers(), models.scan_remat()):
        rngs = models.make_rngs(case.rngs)
        got = flaxlazy.materialize(case.module, rngs, *case.args, **case.kwargs)
        want = jax.jit(functools.partial(case.module.init, **case.kwargs))(rngs, *case.args)
        chex.assert_trees_all_equal(got, want)
    plan = plan_of(models.RematMLP(), jax.random.key(0), X)
    assert plan.counts() == {"flax": 12}  # static_argnums too
