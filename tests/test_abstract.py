"""abstract_init: same tree as module.init, ShapeDtypeStruct leaves, nothing computed."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flaxlazy
from flaxlazy._src.compiles import count_compiles


class Annotated(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(
            16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        )(x)
        x = nn.Dense(
            4,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp", "embed")),
        )(x)
        return nn.BatchNorm(use_running_average=not train)(x)


def _specs(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def test_same_tree_as_init_with_boxes(key):
    x = jnp.ones((3, 8))
    got = flaxlazy.abstract_init(Annotated(), key, flaxlazy.spec("f32[3,8]"), train=True)
    want = Annotated().init(key, x, train=True)
    assert jax.tree.structure(got) == jax.tree.structure(_specs(want))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    assert isinstance(got["params"]["Dense_0"]["kernel"], nn.Partitioned)
    assert got["params"]["Dense_0"]["kernel"].names == (None, "model")
    assert isinstance(got["params"]["Dense_1"]["kernel"], nn.LogicallyPartitioned)
    assert set(got) == {"params", "batch_stats"}
    for leaf in jax.tree.leaves(got):
        assert isinstance(leaf, jax.ShapeDtypeStruct)


def test_inputs_mix_arrays_specs_and_python_values(key):
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, batch, noise_key, *, scale: int, use_bias: bool):
            h = nn.Dense(5 * scale, use_bias=use_bias)(batch["x"])
            return h + jax.random.normal(noise_key, h.shape) + batch["y"].sum()

    batch = {"x": np.ones((2, 3), np.float32), "y": flaxlazy.spec("i32[2]")}
    got = flaxlazy.abstract_init(Mixed(), key, batch, jax.random.key(1), scale=2, use_bias=False)
    assert got["params"]["Dense_0"]["kernel"].shape == (3, 10)
    assert "bias" not in got["params"]["Dense_0"]


def test_method_and_mutable_like_init(key):
    class Enc(nn.Module):
        def setup(self):
            self.enc = nn.Dense(3)
            self.dec = nn.Dense(5)

        def encode(self, x):
            return self.enc(x)

        def __call__(self, x):
            return self.dec(self.enc(x))

    got = flaxlazy.abstract_init(Enc(), key, flaxlazy.spec("f32[1,5]"), method="encode")
    assert set(got["params"]) == {"enc"}
    got = flaxlazy.abstract_init(Enc(), key, flaxlazy.spec("f32[1,5]"), method=Enc.encode)
    assert set(got["params"]) == {"enc"}


def test_no_compute(key):
    class Huge(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(50_000)(nn.Dense(50_000)(x))  # 2.5e9 parameters: 10 GB

    with count_compiles() as c:
        shapes = flaxlazy.abstract_init(Huge(), key, flaxlazy.spec("f32[1,8]"))
        again = flaxlazy.abstract_init(Huge(), key, flaxlazy.spec("f32[1,8]"))
    assert c.count == 0
    assert shapes == again  # traced afresh each call (never cached), nothing compiled
    assert flaxlazy.num_params(shapes) == 8 * 50_000 + 50_000 + 50_000**2 + 50_000


def test_dict_rngs_and_spec_rngs():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(nn.Dense(3)(x))

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    got = flaxlazy.abstract_init(Drop(), rngs, flaxlazy.spec("f32[2,2]"))
    assert got["params"]["Dense_0"]["kernel"].shape == (2, 3)
    key_spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    got = flaxlazy.abstract_init(Drop(), {"params": key_spec, "dropout": key_spec},
                                 flaxlazy.spec("f32[2,2]"))
    assert got["params"]["Dense_0"]["bias"].shape == (3,)
