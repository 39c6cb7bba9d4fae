"""Stacked layers (``nn.scan``, ``nn.vmap``): each layer's key split from the root key.

Every case compares with ``jax.jit(module.init)`` on the same key, bit for bit, and
checks which leaves were replayed with a key per layer (``plan.Leaf.layers``) and which
went to the traced fallback.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from plans import plan_of

import flaxlazy
from flaxlazy._src.compiles import count_compiles
from flaxlazy._src.draw import flat

X = jax.ShapeDtypeStruct((2, 48), jnp.float32)
KEYS = pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey],
                               ids=["typed", "raw"])


class Block(nn.Module):
    width: int = 48

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(self.width, kernel_init=nn.initializers.normal(0.02))(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1])(nn.gelu(h)), None


class Stack(nn.Module):
    """``layers`` blocks under ``nn.scan``; the options are ``nn.scan``'s."""

    layers: int = 3
    split: bool = True
    axis: int = 0
    reverse: bool = False
    broadcast_params: bool = False

    @nn.compact
    def __call__(self, x):
        if self.broadcast_params:
            options = dict(variable_broadcast="params", split_rngs={"params": False})
        else:
            options = dict(variable_axes={"params": self.axis},
                           split_rngs={"params": self.split})
        stack = nn.scan(Block, length=self.layers, reverse=self.reverse, **options)
        x, _ = stack(name="stack")(x, None)
        return nn.Dense(4, name="head")(x)


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=2)
        x, _ = stack(name="inner")(x, None)
        return x, None


class Nested(nn.Module):
    """A scan of a scan: every parameter gets two layer axes, (3, 2)."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        return stack(name="outer")(x, None)[0]


class Member(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(40, kernel_init=nn.initializers.lecun_normal())(x)


class Ensemble(nn.Module):
    members: int = 4
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        stacked = nn.vmap(Member, variable_axes={"params": self.axis},
                          split_rngs={"params": True}, in_axes=None, out_axes=0,
                          axis_size=self.members)
        return stacked(name="members")(x)


def _plan(module, key, x):
    return plan_of(module, key, x)


def _layers(module, key=None):
    plan = _plan(module, jax.random.key(0) if key is None else key, X)
    return {leaf.path: (leaf.source, leaf.layers) for leaf in plan.leaves}


def _assert_like_init(module, key):
    got = flaxlazy.materialize(module, key, X)
    want = jax.jit(module.init)(key, jnp.zeros(X.shape, X.dtype))
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    return got


@KEYS
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_scan_layers_have_their_own_keys(make_key, reverse):
    module = Stack(reverse=reverse)
    layers = _layers(module, make_key(0))
    assert layers["params/stack/Dense_0/kernel"] == ("flax", (3,))
    assert layers["params/stack/LayerNorm_0/scale"] == ("flax", (3,))
    assert layers["params/head/kernel"] == ("flax", ())
    got = _assert_like_init(module, make_key(7))
    kernels = got["params"]["stack"]["Dense_0"]["kernel"]
    assert not np.array_equal(kernels[0], kernels[1])  # each layer its own draw


@KEYS
def test_nested_scans_split_twice(make_key):
    layers = _layers(Nested(), make_key(0))
    assert layers["params/outer/inner/Dense_0/kernel"] == ("flax", (3, 2))
    _assert_like_init(Nested(), make_key(3))


@KEYS
def test_vmap_members_have_their_own_keys(make_key):
    assert _layers(Ensemble(), make_key(0))["params/members/Dense_0/kernel"] == ("flax", (4,))
    _assert_like_init(Ensemble(), make_key(5))


def test_unsplit_key_repeats_one_layer():
    """``split_rngs={"params": False}``: every layer draws with the same key."""
    layers = _layers(Stack(split=False))
    assert layers["params/stack/Dense_0/kernel"] == ("flax", ())  # one layer, broadcast
    got = _assert_like_init(Stack(split=False), jax.random.key(2))
    kernels = got["params"]["stack"]["Dense_0"]["kernel"]
    chex.assert_trees_all_equal(kernels[0], kernels[2])


def test_broadcast_params_are_shared():
    layers = _layers(Stack(broadcast_params=True))
    assert layers["params/stack/Dense_0/kernel"][0] == "flax"
    _assert_like_init(Stack(broadcast_params=True), jax.random.key(2))


@pytest.mark.parametrize("module", [Stack(axis=1), Ensemble(axis=1)], ids=["scan", "vmap"])
def test_layers_on_another_axis_take_the_traced_run(module):
    assert all(source == "traced" for path, (source, _) in _layers(module).items()
               if "Dense_0" in path and "head" not in path)
    _assert_like_init(module, jax.random.key(4))


def test_stacked_leaves_drawn_flat_share_kernels(monkeypatch):
    """Each layer of a large stacked leaf is drawn flat from its own key; a deeper stack of
    the same block compiles nothing."""
    drawn = []
    monkeypatch.setattr(flat, "draw_all", functools.partial(
        lambda orig, jobs: drawn.extend((j.leaf.path, len(j.roots)) for j in jobs) or orig(
            jobs), flat.draw_all))
    _assert_like_init(Stack(layers=2), jax.random.key(0))
    assert ("params/stack/Dense_0/kernel", 2) in drawn  # 48x48 per layer: flat
    with count_compiles() as c:
        got = flaxlazy.materialize(Stack(layers=5), jax.random.key(1), X)
    assert ("params/stack/Dense_0/kernel", 5) in drawn
    assert c.count == 0  # the keys come from the bits kernel; zeros and ones are filled
    want = jax.jit(Stack(layers=5).init)(jax.random.key(1), jnp.zeros(X.shape, X.dtype))
    chex.assert_trees_all_equal(got, want)


def test_repeated_calls_match_fresh_values():
    """Lengths and keys that change between calls in one process are never served stale."""
    for layers, seed in [(3, 0), (4, 0), (3, 1), (4, 1)]:
        _assert_like_init(Stack(layers=layers), jax.random.key(seed))


class VmapInForward(nn.Module):
    """Uses ``jax.vmap`` and ``jax.random.split`` of its own in the forward pass."""

    @nn.compact
    def __call__(self, x):
        keys = jax.random.split(self.make_rng("params"), x.shape[0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
        return nn.Dense(8)(x + noise)


def test_user_vmap_and_split_unaffected():
    _assert_like_init(VmapInForward(), jax.random.key(1))
    assert _layers(VmapInForward())["params/Dense_0/kernel"] == ("flax", ())


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_stacked_on_a_mesh_matches_init(axis_type):
    # Values never depend on the mesh, in either axis mode: they equal the plain init
    # (under ``jax.set_mesh`` of Explicit axes JAX's own init moves by an ULP).
    mesh = jax.make_mesh((jax.device_count(),), ("model",), axis_types=(axis_type,))
    rules = [("stack/**/kernel", P(None, None, "model")), ("**", P())]
    got = flaxlazy.materialize(Stack(), jax.random.key(3), X, mesh=mesh, partition_rules=rules)
    kernel = got["params"]["stack"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "model")
    want = jax.jit(Stack().init)(jax.random.key(3), jnp.zeros(X.shape, X.dtype))
    chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(want))


def test_inspect_counts_the_compiles():
    flaxlazy.materialize(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,2]"))  # warm
    report = flaxlazy.inspect(Stack(layers=4), jax.eval_shape(jax.random.key, 0), X)
    flaxlazy.clear_caches()
    with count_compiles() as c:
        flaxlazy.materialize(Stack(layers=4), jax.random.key(0), X)
    assert report.compiles_total == c.count > 0
