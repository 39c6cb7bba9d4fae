"""The parameter-initialization walk-through of "Dive into Deep Learning" (JAX), with
``initializers=`` in place of ``kernel_init=`` on every layer."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flaxlazy

X = flaxlazy.spec("f32[2,20]")  # D2L's X = jax.random.uniform(key, (2, 20))


@pytest.fixture
def net():
    # D2L: nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)]), input size never given.
    return nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])


def test_shapes_resolved_from_the_first_input(net, key):
    shapes = flaxlazy.abstract_init(net, key, X)
    assert jax.tree.map(lambda s: s.shape, shapes) == {
        "params": {
            "layers_0": {"kernel": (20, 8), "bias": (8,)},
            "layers_2": {"kernel": (8, 1), "bias": (1,)},
        }
    }
    assert flaxlazy.num_params(shapes) == 20 * 8 + 8 + 8 + 1


def test_default_init_equals_module_init(net, key):
    x = jax.random.uniform(key, X.shape)
    got = flaxlazy.materialize(net, key, X)
    chex.assert_trees_all_equal(got, jax.jit(net.init)(key, x))
    chex.assert_trees_all_equal(net.apply(got, x), net.apply(net.init(key, x), x))


def test_normal_weights_zero_biases(net, key):
    params = flaxlazy.materialize(
        net, key, X,
        initializers={"**/kernel": nn.initializers.normal(0.01), "**/bias": nn.initializers.zeros},
    )["params"]
    for layer in ("layers_0", "layers_2"):
        assert (params[layer]["bias"] == 0).all()
    w = params["layers_0"]["kernel"]
    assert 0.005 < float(w.std()) < 0.015 and abs(float(w.mean())) < 0.005


def test_constant_one(net, key):
    params = flaxlazy.materialize(
        net, key, X, initializers={"**/kernel": nn.initializers.constant(1.0),
                                   "**/bias": nn.initializers.zeros},
    )["params"]
    chex.assert_trees_all_equal(params["layers_0"]["kernel"], jnp.ones((20, 8)))
    chex.assert_trees_all_equal(params["layers_2"]["kernel"], jnp.ones((8, 1)))


def test_xavier_first_constant_42_last(net, key):
    params = flaxlazy.materialize(
        net, key, X,
        initializers={"layers_0/kernel": nn.initializers.xavier_uniform(),
                      "layers_2/kernel": nn.initializers.constant(42.0)},
    )["params"]
    limit = (6 / (20 + 8)) ** 0.5
    w = params["layers_0"]["kernel"]
    assert float(jnp.abs(w).max()) <= limit and float(jnp.abs(w).max()) > 0.5 * limit
    chex.assert_trees_all_equal(params["layers_2"]["kernel"], jnp.full((8, 1), 42.0))
    # Biases keep the module's own initializer (zeros for nn.Dense).
    assert (params["layers_0"]["bias"] == 0).all()


def my_init(key, shape, dtype=jnp.float32):
    """D2L's custom initializer: U(-10, 10), then zero every |w| < 5."""
    w = jax.random.uniform(key, shape, dtype, minval=-10, maxval=10)
    return w * (jnp.abs(w) >= 5)


def test_custom_initializer(net, key):
    params = flaxlazy.materialize(net, key, X, initializers={"**/kernel": my_init})["params"]
    w = params["layers_0"]["kernel"]
    nonzero = w[w != 0]
    assert float(jnp.abs(nonzero).min()) >= 5 and float(jnp.abs(w).max()) <= 10
    assert 0.25 < float((w == 0).mean()) < 0.75
    # Reproducible: the same root key gives the same custom values.
    again = flaxlazy.materialize(net, key, X, initializers={"**/kernel": my_init})["params"]
    chex.assert_trees_all_equal(params, again)
