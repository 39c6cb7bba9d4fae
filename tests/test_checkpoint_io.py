"""Orbax checkpoint I/O: save, entries (metadata only), read (subset, into shardings)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

from flaxlazy._src import paths
from flaxlazy._src.checkpoint.orbax_io import entries
from flaxlazy._src.checkpoint.orbax_io import read
from flaxlazy._src.checkpoint.orbax_io import save

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(16), jnp.float32),
        },
        "Embed_0": {"embedding": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)},
        "counts": jnp.asarray(rng.integers(-100, 100, (4, 6)), jnp.int32),
    }


def _structs(tree, sharding=None):
    return {
        p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        for p, x in paths.flatten(tree)[0]
    }


def _bits(x):
    return np.asarray(x).tobytes()


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    save(path, _params())
    return path


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    return jax.make_mesh((2, 4), ("data", "model"))


def test_round_trip_is_bit_equal(ckpt):
    params = _params()
    assert entries(ckpt) == _structs(params)
    out = read(ckpt, _structs(params))
    assert list(out) == list(_structs(params))
    for p, x in paths.flatten(params)[0]:
        assert out[p].dtype == x.dtype and out[p].shape == x.shape
        assert _bits(out[p]) == _bits(x), p


def test_read_subset_returns_only_requested(ckpt):
    want = {
        "counts": jax.ShapeDtypeStruct((4, 6), jnp.int32),
        "Dense_0/bias": jax.ShapeDtypeStruct((16,), jnp.float32),
    }
    out = read(ckpt, want)
    assert list(out) == ["counts", "Dense_0/bias"]
    assert _bits(out["Dense_0/bias"]) == _bits(_params()["Dense_0"]["bias"])
    assert read(ckpt, {}) == {}


def test_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save("rel", {"w": jnp.arange(3.0)})
    assert (tmp_path / "rel").is_dir()
    assert read("rel", {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})["w"].tolist() == [0, 1, 2]


@needs_8
@pytest.mark.parametrize("spec", [P("data", "model"), P(None, "model"), P("model"), P()], ids=str)
def test_read_into_named_sharding(ckpt, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    x = _params()["Dense_0"]["kernel"]
    out = read(ckpt, {"Dense_0/kernel": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
    y = out["Dense_0/kernel"]
    assert y.sharding == sharding
    expected = sharding.shard_shape(x.shape)
    assert [s.data.shape for s in y.addressable_shards] == [expected] * 8
    for shard in y.addressable_shards:
        assert _bits(shard.data) == _bits(x[shard.index])
    assert _bits(y) == _bits(x)


@needs_8
def test_sharded_save_reads_back_elsewhere(tmp_path, mesh):
    params = _params()
    sharded = jax.device_put(params, NamedSharding(mesh, P("data")))
    save(tmp_path / "ckpt", sharded)
    assert entries(tmp_path / "ckpt") == _structs(params)

    # Into one (non-default) device.
    one = SingleDeviceSharding(jax.devices()[5])
    out = read(tmp_path / "ckpt", _structs(params, one))
    for p, x in paths.flatten(params)[0]:
        assert out[p].sharding == one and _bits(out[p]) == _bits(x)

    # Sharding None: the default device.
    out = read(tmp_path / "ckpt", _structs(params))
    assert all(a.sharding == SingleDeviceSharding(jax.devices()[0]) for a in out.values())

    # Into another layout on the same mesh.
    other = {
        p: NamedSharding(mesh, P(*("model", "data")[: x.ndim])) for p, x in paths.flatten(params)[0]
    }
    targets = {
        p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=other[p])
        for p, s in _structs(params).items()
    }
    out = read(tmp_path / "ckpt", targets)
    for p, x in paths.flatten(params)[0]:
        assert out[p].sharding == other[p] and _bits(out[p]) == _bits(x)


def test_boxes_are_unboxed(tmp_path):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.ones, ("data", "model"))
            return nn.Dense(4, kernel_init=init)(x)

    variables = Model().init(jax.random.key(0), jnp.ones((1, 3)))
    assert isinstance(variables["params"]["Dense_0"]["kernel"], nn.Partitioned)
    save(tmp_path / "ckpt", variables)
    assert entries(tmp_path / "ckpt") == {
        "params/Dense_0/bias": jax.ShapeDtypeStruct((4,), jnp.float32),
        "params/Dense_0/kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
    }
    out = read(tmp_path / "ckpt", entries(tmp_path / "ckpt"))
    assert out["params/Dense_0/kernel"].tolist() == [[1.0] * 4] * 3


def test_train_state_entries_match_paths(tmp_path):
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    mask = {"Dense_0": {"kernel": True, "bias": False}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adamw(1e-3), mask))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    state = state.replace(step=7)
    save(tmp_path / "ckpt", state)
    found = entries(tmp_path / "ckpt")
    assert set(found) == {p for p, _ in paths.flatten(state)[0]}
    assert found["step"] == jax.ShapeDtypeStruct((), jnp.int32)  # a Python int, canonical
    out = read(tmp_path / "ckpt", found)
    assert out["step"] == 7 and out["step"].dtype == jnp.int32
    flat_state = dict(paths.flatten(state)[0])
    for p, value in out.items():
        assert _bits(value) == _bits(jnp.asarray(flat_state[p], value.dtype)), p


def test_missing_entry_names_it_and_suggests(ckpt):
    with pytest.raises(ValueError, match=r"no entry 'Dense_0/kernal'.*'Dense_0/kernel'"):
        read(ckpt, {"Dense_0/kernal": jax.ShapeDtypeStruct((8, 16), jnp.float32)})
    with pytest.raises(ValueError, match=r"no entry 'params/Dense_0/bias'.*entries\(path\)"):
        read(ckpt, {"params/Dense_0/bias": jax.ShapeDtypeStruct((16,), jnp.float32)})


@pytest.mark.parametrize(
    "target, saved, wanted",
    [
        (jax.ShapeDtypeStruct((16, 8), jnp.float32), r"float32\[8,16\]", r"float32\[16,8\]"),
        (jax.ShapeDtypeStruct((8, 16), jnp.bfloat16), r"float32\[8,16\]", r"bfloat16\[8,16\]"),
    ],
)
def test_shape_or_dtype_mismatch(ckpt, target, saved, wanted):
    match = rf"'Dense_0/kernel' in {ckpt} is {saved} but the target is {wanted}"
    with pytest.raises(ValueError, match=match):
        read(ckpt, {"Dense_0/kernel": target})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        entries(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not an Orbax PyTree checkpoint"):
        read(tmp_path, {})
    # A CheckpointManager-like layout: the hint names the item directory inside.
    save(tmp_path / "run" / "100" / "state", {"w": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"contains checkpoints at .*100/state"):
        entries(tmp_path / "run")


def test_save_refuses_to_overwrite_without_force(ckpt):
    with pytest.raises(FileExistsError, match="force=True"):
        save(ckpt, {"w": jnp.ones(2)})
    save(ckpt, {"w": jnp.ones(2)}, force=True)
    assert entries(ckpt) == {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ValueError, match="no leaves"):
        save(ckpt.parent / "empty", {"a": {}, "b": None})


def _bytes_read():
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
        return metric["values"][0]["value"]
    return 0


def test_read_does_not_touch_unrequested_entries(tmp_path):
    # 16 MiB of incompressible data next to a 64-byte entry: reading the small one must
    # not read the big one from disk (measured by TensorStore's file read counter).
    big = np.random.default_rng(0).integers(0, 2**32, (1024, 4096), dtype=np.uint32)
    save(tmp_path / "ckpt", {"big": jnp.asarray(big), "small": jnp.arange(16.0)})
    small_target = {"small": jax.ShapeDtypeStruct((16,), jnp.float32)}

    before = _bytes_read()
    assert read(tmp_path / "ckpt", small_target)["small"].tolist() == list(range(16))
    small_cost = _bytes_read() - before
    assert small_cost < big.nbytes / 16

    # The counter does see array reads: reading the big entry costs its size.
    before = _bytes_read()
    out = read(tmp_path / "ckpt", {"big": jax.ShapeDtypeStruct(big.shape, jnp.uint32)})
    assert _bits(out["big"]) == _bits(big)
    assert _bytes_read() - before >= big.nbytes


@needs_8
def test_target_over_an_abstract_mesh_is_named(ckpt, mesh):
    # jax.eval_shape of sharded arrays gives shardings over an abstract mesh: no devices.
    x = jax.device_put(_params()["counts"], NamedSharding(mesh, P("data")))
    target = jax.eval_shape(lambda: x)
    assert isinstance(target.sharding.mesh, jax.sharding.AbstractMesh)
    with pytest.raises(ValueError, match=r"target for 'counts' has a sharding over an "
                                         r"abstract mesh .*NamedSharding over a jax\.sharding"):
        read(ckpt, {"counts": target})
