"""Flat draws: random leaves of every shape from a bits kernel and per-initializer
transforms shared across shapes, bit-identical to each leaf's whole draw."""

import math
import threading
import time
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlazy
from flaxlazy._src import compiles
from flaxlazy._src import programs
from flaxlazy._src.compiles import count_compiles
from flaxlazy._src.draw import flat
from flaxlazy._src.draw import host
from flaxlazy._src.draw import keys as keys_lib

INITS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "normal": nn.initializers.normal(0.02),
    "truncated_normal": nn.initializers.truncated_normal(0.02),
    "uniform": nn.initializers.uniform(0.5),
    "he_uniform": nn.initializers.he_uniform(),
    "embed_default": nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
    "xavier_normal": nn.initializers.xavier_normal(),
}


def _leaf(init, shape, dtype, root, fold=5):
    spec = jax.ShapeDtypeStruct(root.shape, root.dtype)
    program = programs.trace(lambda k: init(k, shape, dtype), spec)
    return types.SimpleNamespace(program=program, shape=shape, dtype=dtype, key=fold,
                                 sharding=None)


def _assert_drawn_whole(init, shape, dtype, root):
    """The leaf drawn flat equals jit of its initializer on the same key."""
    leaf = _leaf(init, shape, dtype, root)
    transform = flat.transform(leaf)
    assert transform is not None and transform.split is None and flat.usable(root)
    (got,) = flat.draw_all([flat.Job(leaf, flat.layer_roots(root, ()), np.uint32(5),
                                     transform.program)])
    want = jax.jit(lambda r: init(jax.random.fold_in(r, 5), shape, dtype))(root)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)


def _assert_like_init(model, key, x):
    chex.assert_trees_all_equal(flaxlazy.materialize(model, key, x),
                                jax.jit(model.init)(key, x))


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_known_bits_are_jaxs(make_key):
    bits = np.asarray(jax.random.bits(jax.random.fold_in(make_key(0), 7), (3, 65536)))
    assert {i: int(bits.reshape(-1)[i]) for i in flat._KNOWN_BITS} == flat._KNOWN_BITS


def test_known_split_is_jaxs():
    split = jax.random.key_data(jax.random.split(jax.random.key(0), len(flat._KNOWN_SPLIT)))
    assert np.asarray(split).tolist() == [list(row) for row in flat._KNOWN_SPLIT]


@pytest.mark.parametrize("layers", [(3,), (2, 3), (70000,)], ids=str)
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_layer_roots_are_jaxs_split(layers, make_key):
    root = make_key(4)
    keys = keys_lib.layer_keys(root, layers)
    want = jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype,
                                                               jax.dtypes.prng_key) else keys
    got = np.stack(flat.layer_roots(root, layers))
    np.testing.assert_array_equal(got, np.asarray(want).reshape(-1, 2))


@pytest.mark.parametrize("name", list(INITS))
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@pytest.mark.parametrize("shape", [(3, 5), (256, 256), (300, 257), (4, 70, 33), ()], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bit_identical_to_the_whole_draw(name, make_key, shape, dtype):
    if shape == () and name in ("lecun_normal", "he_uniform", "xavier_normal",
                                "embed_default"):
        pytest.skip("fan-in initializers need two dimensions")
    _assert_drawn_whole(INITS[name], shape, dtype, make_key(3))


def test_one_transform_per_initializer_whatever_the_shapes():
    init = nn.initializers.normal(0.02)
    root = jax.random.key(0)
    shapes = [(7, 9), (300, 257), (1024,), (2, 3, 4)]
    keys = {flat.transform(_leaf(init, s, jnp.float32, root)).program.key for s in shapes}
    assert len(keys) == 1
    other = flat.transform(_leaf(nn.initializers.normal(0.03), (7, 9), jnp.float32, root))
    assert other.program.key not in keys  # a literal differs: its own transform


@pytest.fixture(scope="module")
def warm():
    """JAX's own one-time eager helpers (key creation...) compile before counting."""
    flaxlazy.materialize(nn.Dense(3), jax.random.key(0), jnp.ones((1, 2)))


class Widths(nn.Module):
    """Dense layers of five shapes and a small head, every kernel and embedding
    normal(std)."""

    std: float = 0.02

    @nn.compact
    def __call__(self, ids):
        init = nn.initializers.normal(self.std)
        x = nn.Embed(500, 48, embedding_init=init)(ids)
        for width in (128, 96, 64, 200, 30):
            x = nn.Dense(width, kernel_init=init)(x)
        return nn.Dense(3, kernel_init=init)(x)  # 90 elements: below flat.MIN_ELEMENTS


def test_materialize_compiles_two_kernels_for_many_shapes(warm):
    del warm
    ids = jnp.zeros((2, 3), jnp.int32)
    flaxlazy.clear_caches()
    with count_compiles() as compiles:
        got = flaxlazy.materialize(Widths(), jax.random.key(1), ids)
        jax.block_until_ready(got)
    # The bits kernel, the one normal(0.02) transform, and the head's own function.
    assert compiles.count == 3
    chex.assert_trees_all_equal(got, jax.jit(Widths().init)(jax.random.key(1), ids))


def test_repeated_calls_follow_literals_and_keys():
    """The transform cache is keyed by the traced program: a changed scale or key in
    the same process gives what a fresh jax.jit(init) gives."""
    ids = jnp.zeros((2, 3), jnp.int32)
    for std, seed in [(0.02, 0), (0.05, 0), (0.02, 4), (0.02, 0)]:
        got = flaxlazy.materialize(Widths(std), jax.random.key(seed), ids)
        chex.assert_trees_all_equal(got, jax.jit(Widths(std).init)(jax.random.key(seed), ids))


def test_not_flat_falls_back_to_the_per_program_path():
    root = jax.random.key(0)

    def split_then_draw(key, shape, dtype=jnp.float32):
        return jax.random.normal(jax.random.split(key)[1], shape, dtype)

    for init in (split_then_draw, nn.initializers.orthogonal(), nn.initializers.zeros):
        assert flat.transform(_leaf(init, (8, 8), jnp.float32, root)) is None
    _assert_like_init(nn.Dense(8, kernel_init=split_then_draw), root, jnp.ones((1, 5)))


def test_inside_jit_is_traced_not_flat():
    model = nn.Dense(8)
    x = jnp.ones((1, 5))
    assert not jax.jit(lambda k: flat.usable(k))(jax.random.key(0))
    got = jax.jit(lambda k: flaxlazy.materialize(model, k, x))(jax.random.key(2))
    chex.assert_trees_all_equal(got, jax.jit(model.init)(jax.random.key(2), x))


@pytest.mark.parametrize("known", ["bits", "split"])
def test_a_failed_known_answer_check_draws_per_program(monkeypatch, known):
    if known == "bits":
        monkeypatch.setitem(flat._KNOWN_BITS, 1, 12345)
    else:
        monkeypatch.setattr(flat, "_KNOWN_SPLIT", ((1, 2), (3, 4)))
    flaxlazy.clear_caches()
    try:
        assert not flat.usable(jax.random.key(0))
        _assert_like_init(nn.Dense(128), jax.random.key(0), jnp.ones((1, 64)))
    finally:
        flaxlazy.clear_caches()


def test_drawn_leaves_are_ordinary_arrays():
    """A flat leaf is backed by its host buffer: it must still behave as an immutable
    device array, donated or not."""
    ids = jnp.zeros((2, 3), jnp.int32)
    params = flaxlazy.materialize(Widths(), jax.random.key(1), ids)
    before = jax.tree.map(np.array, params)
    doubled = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p), donate_argnums=0)(params)
    chex.assert_trees_all_equal(doubled, jax.tree.map(lambda x: 2 * x, before))
    again = flaxlazy.materialize(Widths(), jax.random.key(1), ids)
    chex.assert_trees_all_equal(again, before)


def _reshaped(key, shape, dtype=jnp.float32):
    """As Flax's DenseGeneral: drawn at a 2-D shape of the same size, then reshaped."""
    flat_shape = (shape[0], int(np.prod(shape[1:])))
    return nn.initializers.lecun_normal()(key, flat_shape, dtype).reshape(shape)


def _transposed(key, shape, dtype=jnp.float32):
    return nn.initializers.lecun_normal()(key, shape[::-1], dtype).T


def test_reshaped_draws_are_flat_transposed_ones_are_not():
    root = jax.random.key(0)
    _assert_drawn_whole(_reshaped, (96, 4, 40), jnp.float32, root)  # a quarter block
    assert flat.transform(_leaf(_transposed, (96, 40), jnp.float32, root)) is None
    _assert_like_init(nn.Dense(40, kernel_init=_transposed), root, jnp.ones((1, 96)))


def test_placed_like_the_per_program_path():
    """No sharding asked: a leaf lands where its compiled function would put it, on the
    device of a committed key (else the default device, uncommitted)."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    ids = jnp.zeros((2, 3), jnp.int32)
    device = jax.devices()[3]
    key = jax.device_put(jax.random.key(1), device)
    got = flaxlazy.materialize(Widths(), key, ids)
    want = jax.jit(Widths().init)(key, ids)
    chex.assert_trees_all_equal(got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.devices() == w.devices() == {device} and g.committed == w.committed
    loose = flaxlazy.materialize(Widths(), jax.random.key(1), ids)
    assert all(not x.committed for x in jax.tree.leaves(loose))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("populate_later", [True, False], ids=["madvise", "map_populate"])
def test_shared_out_draws_equal_whole_draws(monkeypatch, threads, populate_later):
    """Leaves drawn together, their blocks shared out among threads (a leaf larger than
    one unit split between them), equal each leaf's whole draw, whichever thread drew a
    block and however the buffer's pages were populated."""
    monkeypatch.setattr(host, "workers", lambda: threads)
    monkeypatch.setattr(host, "populate_write_ok", lambda: populate_later)
    root = jax.random.key(3)
    cases = [("lecun_normal", (3 * 1024, 1100), 11), ("normal", (300, 257), 12),
             ("uniform", (2, 40, 70000), 13), ("lecun_normal", (4, 70, 33), 14)]
    jobs, want = [], []
    for name, shape, fold in cases:
        leaf = _leaf(INITS[name], shape, jnp.float32, root, fold)
        jobs.append(flat.Job(leaf, flat.layer_roots(root, ()), np.uint32(fold),
                             flat.transform(leaf).program))
        want.append(jax.jit(lambda r, i=INITS[name], s=shape, f=fold: i(
            jax.random.fold_in(r, f), s, jnp.float32))(root))
    assert math.prod(cases[0][1]) > 2 * flat._UNIT  # split among threads
    chex.assert_trees_all_equal(flat.draw_all(jobs), want)


def test_kernels_compile_on_the_calling_thread():
    """Compiling on the drawing threads would grow memory (malloc arenas per compiling
    thread): every kernel is compiled before the blocks are shared out."""
    threads = []

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event == compiles._BACKEND_COMPILE_EVENT:
            threads.append(threading.current_thread())

    flaxlazy.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        init = nn.initializers.normal(0.0371)  # a transform no other test compiles
        got = flaxlazy.materialize(nn.Dense(2048, kernel_init=init), jax.random.key(5),
                                   jnp.ones((1, 700)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert threads and set(threads) == {threading.current_thread()}
    # Compiled ahead of time: a drawing thread can only run them, never compile them.
    leaf = _leaf(init, (700, 2048), jnp.float32, jax.random.key(5))
    assert isinstance(flat._transform_fn(flat.transform(leaf).program), jax.stages.Compiled)
    assert isinstance(flat._bits_fn(), jax.stages.Compiled)
    model = nn.Dense(2048, kernel_init=init)
    chex.assert_trees_all_equal(got, jax.jit(model.init)(jax.random.key(5),
                                                         jnp.ones((1, 700))))


def test_a_drawing_thread_error_stops_the_others_and_is_raised(monkeypatch):
    monkeypatch.setattr(host, "workers", lambda: 3)
    done = []

    def work(take):
        while (unit := take()) is not None:
            if unit == 5:
                raise RuntimeError("unit 5 failed")
            time.sleep(0.002)
            done.append(unit)

    with pytest.raises(RuntimeError, match="unit 5 failed"):
        host.share_out(list(range(200)), work)
    stopped = len(done)
    assert 5 <= stopped < 20  # the others stop after their current unit
    time.sleep(0.05)
    assert len(done) == stopped  # and nothing runs after the raise


def test_a_forked_child_makes_its_own_drawing_pool(monkeypatch):
    """After ``os.fork`` the parent's pool threads do not exist in the child: the fork
    hook forgets the pool, and the next draw makes a new one."""
    monkeypatch.setattr(host, "workers", lambda: 2)
    done = []
    host.share_out([1, 2, 3], lambda take: [done.append(u) for u in iter(take, None)])
    before = host._pool()
    host._forget_pool()
    host.share_out([4, 5, 6], lambda take: [done.append(u) for u in iter(take, None)])
    assert host._pool() is not before and sorted(done) == [1, 2, 3, 4, 5, 6]
