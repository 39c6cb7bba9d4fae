"""Values never depend on the mesh: the same parameters on 1, 2, 4 and 8 devices.

Every leaf kind is covered at once by one rule set (rows, columns, 2-D, one dimension over
two axes, replicated), for leaves drawn whole, drawn flat (a large kernel on one device)
and drawn in chunks (thresholds lowered), on Auto and Explicit axes, through both
entrances; each result equals the framework's own init without a mesh, bit for bit. The
guarantee rests on the partitionable threefry (``jax_threefry_partitionable``, JAX's
default), under which a shard's random bits do not depend on how the array is split.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src.draw import chunked

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2), (8, 1), (1, 8)]
QUICK = {(1, 1), (2, 1), (2, 2), (2, 4)}  # 1, 2, 4 and 8 devices; the rest with -m slow
AXES = ("data", "model")
RULES = [
    ("rows/kernel", P("data", None)),
    ("cols/kernel", P(None, "model")),
    ("grid/kernel", P("data", "model")),
    ("both/kernel", P(("data", "model"), None)),
    ("embed/embedding", P(None, ("model", "data"))),
    ("**", P()),
]


class Linen(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(512, 64, name="embed")(ids)  # chunked (thresholds lowered below)
        x = nn.Dense(64, name="rows")(x)
        x = nn.Dense(64, name="cols")(x)
        x = nn.Dense(64, kernel_init=nn.initializers.normal(0.02), name="grid")(x)
        x = nn.Dense(64, kernel_init=nn.initializers.uniform(), name="both")(x)
        return nn.Dense(8, name="head")(nn.LayerNorm()(x))


class NNX(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Embed(512, 64, rngs=rngs)
        self.rows = nnx.Linear(64, 64, rngs=rngs)
        self.cols = nnx.Linear(64, 64, rngs=rngs)
        self.grid = nnx.Linear(64, 64, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.both = nnx.Linear(64, 64, kernel_init=nnx.initializers.uniform(), rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.head = nnx.Linear(64, 8, rngs=rngs)


IDS = flaxlazy.spec("i32[2,3]")


@pytest.fixture(autouse=True)
def _chunk_small_leaves(monkeypatch):
    # The embedding (32k elements) is drawn in chunks, per device shard and whole.
    monkeypatch.setattr(chunked, "MIN_ELEMENTS", 10_000)
    monkeypatch.setattr(chunked, "SHARD_MIN_ELEMENTS", 4_000)
    flaxlazy.clear_caches()
    yield
    flaxlazy.clear_caches()


def _mesh(shape, axis_type):
    n = shape[0] * shape[1]
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices")
    return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * 2, devices=jax.devices()[:n])


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _reference(entrance):
    if entrance == "linen":
        return _host(jax.jit(Linen().init)(jax.random.key(0), jnp.zeros(IDS.shape, jnp.int32)))
    return _host(nnx.state(nnx.jit(lambda: NNX(rngs=nnx.Rngs(0)))(), nnx.Param))


def _materialize(entrance, mesh, rules=RULES):
    if entrance == "linen":
        return flaxlazy.materialize(Linen(), jax.random.key(0), IDS, mesh=mesh,
                                    partition_rules=rules)
    return nnx.state(flaxlazy.materialize(NNX, rngs=nnx.Rngs(0), mesh=mesh,
                                          partition_rules=rules), nnx.Param)


def _params(mesh_shapes):
    return [pytest.param(s, marks=() if s in QUICK else (pytest.mark.slow,),
                         id="x".join(map(str, s))) for s in mesh_shapes]


@pytest.mark.parametrize("shape", _params(MESHES))
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("entrance", ["linen", "nnx"])
def test_same_values_on_every_mesh(entrance, axis_type, shape):
    mesh = _mesh(shape, axis_type)
    got = _materialize(entrance, mesh)
    sharded = {jax.tree_util.keystr(p): x.sharding.spec
               for p, x in jax.tree_util.tree_leaves_with_path(got)}
    assert any(spec == P(None, ("model", "data")) for spec in sharded.values()), sharded
    chex.assert_trees_all_equal(_host(got), _reference(entrance))


def test_flat_drawn_leaf_on_one_device_equals_sharded_draws():
    # On one device a kernel of >= 1,024 elements is drawn flat on the host; on a mesh each
    # device draws its shard: the same bits.
    model = nn.Dense(256)
    x = flaxlazy.spec("f32[2,128]")
    one = flaxlazy.materialize(model, jax.random.key(5), x)
    mesh = _mesh((2, 4), AxisType.Explicit)
    eight = flaxlazy.materialize(model, jax.random.key(5), x, mesh=mesh,
                                 partition_rules=[("kernel", P("data", "model")), ("**", P())])
    chex.assert_trees_all_equal(_host(one), _host(eight))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from(MESHES),
    specs=st.lists(
        st.sampled_from([P(), P("data"), P(None, "model"), P("data", "model"),
                         P("model", "data"), P(("data", "model")), P(None, ("model", "data")),
                         None]),
        min_size=6, max_size=6,
    ),
)
def test_any_rules_on_any_mesh_give_the_same_values(shape, specs):
    # Rules drawn at random per leaf (None: replicated); every dimension here divides by 8.
    mesh = _mesh(shape, AxisType.Auto)
    names = ["embed/embedding", "rows/kernel", "cols/kernel", "grid/kernel", "both/kernel",
             "head/kernel"]
    rules = [(n, s if s is not None else P()) for n, s in zip(names, specs, strict=True)]
    got = _materialize("linen", mesh, rules + [("**", P())])
    chex.assert_trees_all_equal(_host(got), _reference("linen"))
