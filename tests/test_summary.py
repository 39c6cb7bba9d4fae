import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import summary as summary_lib

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_counts_and_bytes_abstract_equal_concrete(key):
    x = flaxlazy.spec("f32[1,5,5,1]")
    shapes = flaxlazy.abstract_init(CNN(), key, x)
    values = flaxlazy.materialize(CNN(), key, x)
    n = (3 * 3 * 1 * 4 + 4) + (4 + 4) + (100 * 2 + 2)
    assert flaxlazy.num_params(shapes["params"]) == n
    assert flaxlazy.num_params(values["params"]) == n
    assert flaxlazy.num_params(shapes) == n + 8  # batch_stats mean and var
    assert flaxlazy.nbytes(shapes) == flaxlazy.nbytes(values) == 4 * (n + 8)
    assert flaxlazy.nbytes({"h": jnp.zeros(3, jnp.bfloat16)}) == 6


class DropNorm(nnx.Module):
    """An NNX module with RNG state (Dropout) and batch statistics besides its Params."""

    def __init__(self, *, rngs):
        self.linear = nnx.Linear(5, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def test_num_params_of_nnx_counts_params_only():
    model = flaxlazy.materialize(DropNorm, rngs=nnx.Rngs(0))
    abstract = flaxlazy.abstract_init(DropNorm, rngs=nnx.Rngs(0))
    n = 5 * 6 + 6 + 6 + 6  # linear kernel and bias, bn scale and bias
    assert n == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for tree in (model, abstract, nnx.state(model)):
        assert flaxlazy.num_params(tree) == n
    table = flaxlazy.summary(model)  # the rest, per collection
    assert any(r.split()[:2] == ["params", str(n)] for r in table.splitlines())
    assert any(r.split()[:2] == ["batch_stats", "12"] for r in table.splitlines())


def test_table_has_paths_and_per_collection_totals(key):
    table = flaxlazy.summary(flaxlazy.abstract_init(CNN(), key, flaxlazy.spec("f32[1,5,5,1]")))
    lines = table.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "params", "bytes"]
    assert any(r.startswith("params/Conv_0/kernel") and "(3, 3, 1, 4)" in r for r in lines)
    assert any(r.startswith("batch_stats/BatchNorm_0/mean") for r in lines)
    assert lines[-3].split()[:2] == ["batch_stats", "8"]
    assert lines[-2].split()[:2] == ["params", "250"]
    assert lines[-1].split()[:2] == ["total", "258"]


def test_table_shows_partition_names(key):
    model = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.zeros, ("data", None)))
    table = flaxlazy.summary(flaxlazy.abstract_init(model, key, flaxlazy.spec("f32[1,2]")))
    assert "partition" in table.splitlines()[0]
    assert "('data', None)" in table


def test_plain_pytrees():
    table = flaxlazy.summary({"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)})
    assert "4.0 MiB" in table and "1,048,576" in table


def test_rows_in_natural_order():
    tree = {"params": {f"block_{i}": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
                       for i in (0, 1, 2, 10, 11)}}
    rows = [r.split()[0] for r in flaxlazy.summary(tree).splitlines()[2:7]]
    assert rows == [f"params/block_{i}/w" for i in (0, 1, 2, 10, 11)]


@needs_8
def test_per_device_bytes():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    assert summary_lib.per_device_bytes((64, 32), jnp.float32, NamedSharding(mesh, P())) == 8192
    assert summary_lib.per_device_bytes(
        (64, 32), jnp.bfloat16, NamedSharding(mesh, P("data", "model"))
    ) == 64 * 32 * 2 // 8
    assert summary_lib.per_device_bytes((64, 32), "float32", None) == 8192
    assert summary_lib.per_device_bytes((), "int32", NamedSharding(mesh, P())) == 4


class Wide(nn.Module):
    """A logically annotated kernel next to a large unannotated head."""

    @nn.compact
    def __call__(self, x):
        k = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(64, kernel_init=k, name="up")(x)
        return nn.Dense(1024, name="head")(x)


@needs_8
def test_marks_leaves_replicated_by_default():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shapes = flaxlazy.abstract_init(Wide(), jax.random.key(0), flaxlazy.spec("f32[2,16]"))
    lr = [("embed", "data"), ("mlp", "model")]
    lines = flaxlazy.summary(shapes, mesh=mesh, logical_axis_rules=lr).splitlines()
    rows = {line.split()[0]: line for line in lines[2:6]}
    assert "('data', 'model')" in rows["params/up/kernel"] and "*" not in rows["params/up/kernel"]
    for path in ("params/head/kernel", "params/head/bias", "params/up/bias"):
        assert "() *" in rows[path], rows[path]
    assert lines[-1] == (
        "* replicated by default: no partition rule or Flax annotation covers these 3 leaves "
        "(260.2 KiB on each device; largest 'params/head/kernel', 256.0 KiB). Pass "
        "require_rules=True to make uncovered leaves an error."
    )
    # A rule that replicates is no default: nothing marked.
    table = flaxlazy.summary(shapes, mesh=mesh, logical_axis_rules=lr,
                             partition_rules=[("**", None), ("**", P())])
    assert "*" not in table.replace("**", "")
    with pytest.raises(ValueError, match=r"no partition rule matches 'head/bias'"):
        flaxlazy.summary(shapes, mesh=mesh, logical_axis_rules=lr, require_rules=True)


def test_params_subtree_totals_are_not_per_layer(key):
    shapes = flaxlazy.abstract_init(CNN(), key, flaxlazy.spec("f32[1,5,5,1]"))
    lines = flaxlazy.summary(shapes["params"]).splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(("-", "path"))][-1:] == [
        "total"]
    assert not any(line.split()[0] in ("Conv_0", "Dense_0", "BatchNorm_0") for line in lines)
    assert lines[-1].split()[:2] == ["total", "250"]
    # A variables dict and a train state still get per-collection / per-field totals.
    assert flaxlazy.summary(shapes).splitlines()[-3].split()[0] == "batch_stats"


def test_train_state_params_subtree(key):
    import optax

    state = flaxlazy.abstract_train_state(CNN(), optax.sgd(0.1), key, flaxlazy.spec("f32[1,5,5,1]"))
    totals = [line.split()[0] for line in flaxlazy.summary(state).splitlines()[-4:]]
    assert totals == ["collections", "params", "step", "total"]
    assert flaxlazy.summary(state.params).splitlines()[-1].split()[:2] == ["total", "250"]


@needs_8
def test_summary_reads_the_shardings_a_sharded_abstract_tree_carries(key):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = [("Conv_0/kernel", P(None, None, None, "model")),
             ("Dense_0/kernel", P(("data", "model"), None)), ("**", P())]
    abstract = flaxlazy.abstract_init(CNN(), key, flaxlazy.spec("f32[1,4,4,1]"), mesh=mesh,
                                      partition_rules=rules)
    for text in (flaxlazy.summary(abstract, mesh=mesh), flaxlazy.summary(abstract)):
        rows = {r.split()[0]: r for r in text.splitlines() if r.startswith("params/")}
        assert "(('data', 'model'), None)" in rows["params/Dense_0/kernel"]
        assert "(None, None, None, 'model')" in rows["params/Conv_0/kernel"]
        assert "*" not in text and "replicated by default" not in text
    # A rule passed to summary still overrides what the leaves carry.
    text = flaxlazy.summary(abstract, mesh=mesh,
                            partition_rules=[("Dense_0/kernel", P("model", None))],
                            require_rules=False)
    assert "('model', None)" in next(r for r in text.splitlines()
                                     if r.startswith("params/Dense_0/kernel"))
