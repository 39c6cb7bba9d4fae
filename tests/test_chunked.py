"""Chunked random draws are bit-identical to whole draws, with one block of scratch."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import _compat
from flaxlazy._src.draw import chunked
from flaxlazy._src.draw import flat

INITS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "normal": nn.initializers.normal(0.02),
    "truncated_normal": nn.initializers.truncated_normal(0.02),
    "uniform": nn.initializers.uniform(0.5),
    "variance_scaling": nn.initializers.variance_scaling(2.0, "fan_avg", "uniform"),
    "embed_default": nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
    "xavier_normal": nn.initializers.xavier_normal(),
}


def _matrix():
    """Every initializer x key kind x shape x dtype; the whole matrix runs with -m slow,
    and each initializer once (on one of the combinations, in turn) in the quick run."""
    keys = [("typed", jax.random.key), ("raw", jax.random.PRNGKey)]
    shapes, dtypes = [(300, 257), (4, 70, 33)], [("f32", jnp.float32), ("bf16", jnp.bfloat16)]
    combos = [(k, s, d) for k in keys for s in shapes for d in dtypes]
    for i, name in enumerate(INITS):
        for j, ((kid, key), shape, (did, dtype)) in enumerate(combos):
            marks = () if j == i % len(combos) else (pytest.mark.slow,)
            yield pytest.param(name, key, shape, dtype, marks=marks,
                               id=f"{did}-{shape}-{kid}-{name}")


@pytest.mark.parametrize(("name", "make_key", "shape", "dtype"), list(_matrix()))
def test_bit_identical(name, make_key, shape, dtype):
    key = make_key(7)
    fn = lambda k: INITS[name](k, shape, dtype)  # noqa: E731
    spec = jax.ShapeDtypeStruct(key.shape, key.dtype)
    draw = chunked.chunked(fn, spec, shape, dtype, chunk=4096)  # many blocks and a tail
    chex.assert_trees_all_equal(jax.jit(draw)(key), jax.jit(fn)(key))


@pytest.mark.parametrize("name", ["zeros", "ones"])
def test_constant_initializers_are_drawn_whole(name):
    init = getattr(nn.initializers, name)
    spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with pytest.raises(chunked.NotChunkable, match="non-random"):
        chunked.chunked(lambda k: init(k, (300, 257)), spec, (300, 257), jnp.float32, chunk=4096)


def test_not_elementwise_is_not_chunkable():
    spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    sort_init = lambda k: jnp.sort(jax.random.normal(k, (300, 257)), axis=0)  # noqa: E731
    with pytest.raises(chunked.NotChunkable, match="'sort'"):
        chunked.chunked(sort_init, spec, (300, 257), jnp.float32, chunk=4096)
    orthogonal = lambda k: nn.initializers.orthogonal()(k, (300, 257))  # noqa: E731
    with pytest.raises(chunked.NotChunkable):
        chunked.chunked(orthogonal, spec, (300, 257), jnp.float32, chunk=4096)


def test_scratch_is_one_block():
    shape = (2048, 1024)  # 8 MiB of f32
    spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    fn = lambda k: nn.initializers.lecun_normal()(k, shape)  # noqa: E731
    whole = jax.jit(fn).lower(jax.random.key(0)).compile().memory_analysis()
    draw = chunked.chunked(fn, spec, shape, jnp.float32, chunk=1 << 16)
    parts = jax.jit(draw).lower(jax.random.key(0)).compile().memory_analysis()
    out = 2048 * 1024 * 4
    assert whole.temp_size_in_bytes >= 2 * out  # the problem being solved
    assert parts.temp_size_in_bytes <= out // 4


def test_materialize_chunks_large_leaves_exactly(monkeypatch):
    monkeypatch.setattr(chunked, "MIN_ELEMENTS", 10_000)
    monkeypatch.setattr(flat, "usable", lambda root: False)  # as off CPU: one per program
    assert _compat.chunking_ok()  # the one-time self-check, before counting calls
    calls = []
    real = chunked.chunked_jaxpr
    monkeypatch.setattr(
        chunked, "chunked_jaxpr", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    flaxlazy.clear_caches()
    model = nn.Embed(3000, 64)  # 192k elements > the lowered threshold
    x = flaxlazy.spec("i32[2,3]")
    got = flaxlazy.materialize(model, jax.random.key(0), x)
    want = jax.jit(model.init)(jax.random.key(0), jnp.zeros(x.shape, jnp.int32))
    chex.assert_trees_all_equal(got, want)
    assert calls == [(3000, 64)]
    flaxlazy.clear_caches()


def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    return jax.make_mesh((2, 4), ("data", "model"))


@pytest.mark.parametrize("spec", [
    P("model", None), P(None, "model"), P("data", "model"), P(("data", "model"), None),
    P(None, ("model", "data")), P("model"), P(),
], ids=str)
@pytest.mark.parametrize("name", ["lecun_normal", "truncated_normal", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sharded_draw_is_bit_identical(spec, name, dtype):
    mesh = _mesh()
    shape = (48, 72)
    sharding = NamedSharding(mesh, spec)
    fn = lambda k: INITS[name](k, shape, dtype)  # noqa: E731
    key = jax.random.key(3)
    closed = jax.make_jaxpr(fn)(key)
    draw = chunked.sharded_chunked_jaxpr(closed, shape, dtype, sharding, chunk=100)
    got = jax.jit(lambda k: draw(k, closed.consts), out_shardings=sharding)(key)
    assert got.sharding.spec == sharding.spec
    chex.assert_trees_all_equal(got, jax.jit(fn)(key))


def test_sharded_scratch_is_one_block_per_device():
    mesh = _mesh()
    shape = (2048, 1024)
    sharding = NamedSharding(mesh, P(None, "model"))
    fn = lambda k: nn.initializers.lecun_normal()(k, shape)  # noqa: E731
    whole = jax.jit(fn, out_shardings=sharding).lower(jax.random.key(0)).compile()
    closed = jax.make_jaxpr(fn)(jax.random.key(0))
    draw = chunked.sharded_chunked_jaxpr(closed, shape, jnp.float32, sharding, chunk=1 << 14)
    parts = jax.jit(lambda k: draw(k, closed.consts), out_shardings=sharding).lower(
        jax.random.key(0)).compile()
    shard = 2048 * 1024 * 4 // 4
    assert whole.memory_analysis().temp_size_in_bytes >= 2 * shard  # the problem solved
    assert parts.memory_analysis().temp_size_in_bytes <= shard // 4


def test_materialize_chunks_sharded_leaves_exactly(monkeypatch):
    mesh = _mesh()
    monkeypatch.setattr(chunked, "SHARD_MIN_ELEMENTS", 10_000)
    assert _compat.chunking_ok()
    calls = []
    real = chunked.sharded_chunked_jaxpr
    monkeypatch.setattr(chunked, "sharded_chunked_jaxpr",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    flaxlazy.clear_caches()
    model = nn.Embed(3000, 64)
    x = flaxlazy.spec("i32[2,3]")
    got = flaxlazy.materialize(model, jax.random.key(0), x, mesh=mesh,
                               partition_rules=[("embedding", P("data", "model"))])
    want = jax.jit(model.init)(jax.random.key(0), jnp.zeros(x.shape, jnp.int32))
    chex.assert_trees_all_equal(got, want)
    assert got["params"]["embedding"].sharding.spec == P("data", "model")
    assert calls == [(3000, 64)]


def _stacked(key, n=4, count=3, shape=(2, 5), counts=None):
    """Per-layer draws as ``nnx.vmap`` over ``nnx.split_rngs`` makes them."""
    counts = jnp.full((n,), count, jnp.uint32) if counts is None else counts
    keys = jax.vmap(jax.random.fold_in)(jax.random.split(key, n), counts)
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def test_layer_split_finds_split_then_fold():
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    assert chunked.layer_split(jax.make_jaxpr(_stacked)(key)) == (4, 3)
    # counts computed from constants (a stream counter incremented per parameter)
    counted = jax.make_jaxpr(lambda k: _stacked(
        k, counts=jnp.zeros((4,), jnp.uint32) + 1 + 1))(key)
    assert chunked.layer_split(counted) == (4, 2)


@pytest.mark.parametrize("fn", [
    lambda k: _stacked(k, counts=jnp.arange(4, dtype=jnp.uint32)),  # counts differ
    lambda k: _stacked(k) + jax.random.normal(k, (4, 2, 5)),  # the key used twice
    lambda k: jax.random.normal(jax.random.split(k, 4)[0], (3,)),  # not folded
    lambda k: jax.random.normal(k, (3,)),  # not split
], ids=["counts differ", "key used twice", "not folded", "not split"])
def test_layer_split_rejects_anything_else(fn):
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    assert chunked.layer_split(jax.make_jaxpr(fn)(key)) is None


@pytest.mark.parametrize("shape", [(2, 5), (300, 257)], ids=str)
def test_layered_transform_draws_each_layer_from_its_key(shape):
    """The transform of a split-per-layer program applied to one layer's bits (under
    ``fold_in(split(key, n)[i], count)``) gives layer ``i`` of the whole draw."""
    key = jax.random.key(7)
    closed = jax.make_jaxpr(lambda k: _stacked(k, shape=shape))(key)
    want = _stacked(key, shape=shape)
    g = jax.jit(chunked.from_bits(closed, want.shape, want.dtype, layers=4))
    for i, layer_key in enumerate(jax.random.split(key, 4)):
        n = math.prod(shape)
        folded = jax.random.fold_in(layer_key, 3)
        halves = chunked.threefry(folded, jnp.arange(n, dtype=jnp.uint32))
        got = g(*halves, list(closed.consts)).reshape(shape)
        chex.assert_trees_all_equal(got, want[i])
