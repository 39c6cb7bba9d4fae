"""init_train_state / abstract_train_state: params + optax state, sharded alike."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from nnx_models import KeepsRngs

import flaxlazy

X = flaxlazy.spec("f32[8,16]")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(8, name="head")(nn.relu(x))


RULES = [("Dense_0/kernel", P(None, "model")), ("head/kernel", P("model", None)), ("**", P())]


def _txs():
    labels = {"Dense_0": {"kernel": "adam", "bias": "sgd"},
              "BatchNorm_0": {"scale": "sgd", "bias": "sgd"},
              "head": {"kernel": "adam", "bias": "sgd"}}
    mask = jax.tree.map(lambda label: label == "adam", labels)
    return {
        "adamw": optax.adamw(1e-3),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        "multi_transform": optax.multi_transform(
            {"adam": optax.adam(1e-3), "sgd": optax.sgd(0.1, momentum=0.9)}, labels),
        "masked": optax.masked(optax.adam(1e-3), mask),
    }


@pytest.fixture
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize("name", list(_txs()))
def test_equals_flax_train_state_create(name):
    tx = _txs()[name]
    key = jax.random.key(0)
    state = flaxlazy.init_train_state(Net(), tx, key, X)
    variables = Net().init(key, jnp.zeros(X.shape))
    want = flax_train_state.TrainState.create(
        apply_fn=Net().apply, params=variables["params"], tx=tx)
    assert isinstance(state, flax_train_state.TrainState)
    chex.assert_trees_all_close(state.params, want.params, rtol=1e-6)
    chex.assert_trees_all_close(state.opt_state, want.opt_state)
    chex.assert_trees_all_close(state.collections, {"batch_stats": variables["batch_stats"]})
    assert int(state.step) == 0
    # It trains like any TrainState.
    grads = jax.tree.map(jnp.ones_like, state.params)
    assert int(state.apply_gradients(grads=grads).step) == 1


@pytest.mark.parametrize("name", list(_txs()))
def test_sharded_optimizer_state_mirrors_params(name, mesh):
    tx = _txs()[name]
    key = jax.random.key(0)
    state = flaxlazy.init_train_state(Net(), tx, key, X, mesh=mesh, partition_rules=RULES)
    abstract = flaxlazy.abstract_train_state(Net(), tx, key, X, mesh=mesh, partition_rules=RULES)
    got = jax.tree.leaves(state)
    want = jax.tree.leaves(abstract)
    assert [g.sharding for g in got] == [w.sharding for w in want]
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        text = jax.tree_util.keystr(path)
        if leaf.ndim == 0:
            assert leaf.sharding.spec == P(), text
        elif "Dense_0']['kernel']" in text:
            assert leaf.sharding.spec == P(None, "model"), text
            assert {s.data.shape for s in leaf.addressable_shards} == {(16, 8)}
        elif "head']['kernel']" in text:
            assert leaf.sharding.spec == P("model", None), text
    single = flaxlazy.init_train_state(Net(), tx, key, X)
    chex.assert_trees_all_close(jax.device_get(state.opt_state), jax.device_get(single.opt_state))


def test_summary_reports_params_and_optimizer_per_device(mesh):
    abstract = flaxlazy.abstract_train_state(
        Net(), optax.adam(1e-3), jax.random.key(0), X, mesh=mesh, partition_rules=RULES)
    table = flaxlazy.summary(abstract)
    totals = {line.split()[0]: line for line in table.splitlines()[-6:]}
    assert {"params", "opt_state", "step", "collections", "total"} <= set(totals)
    assert "per device" in table.splitlines()[0]


def test_optimizer_leaf_without_mirror_needs_a_rule(mesh):
    tx = optax.adafactor(1e-3, min_dim_size_to_factor=4)  # factored moments: new shapes
    rules = RULES[:2] + [("**/bias", P()), ("**/scale", P()), ("batch_stats/**", P())]
    with pytest.raises(ValueError, match=r"optimizer state leaves "
                                         r"'opt_state/0/v_row/Dense_0/kernel' "
                                         r"\(float32\[16\]\), .* mirror no parameter"):
        flaxlazy.init_train_state(Net(), tx, jax.random.key(0), X, mesh=mesh, partition_rules=rules)
    state = flaxlazy.init_train_state(
        Net(), tx, jax.random.key(0), X, mesh=mesh,
        partition_rules=rules + [("opt_state/**", P())])
    assert state.opt_state is not None


class Annotated(nn.Module):
    """Logical annotations on the kernels only (biases, batch stats unannotated)."""

    @nn.compact
    def __call__(self, x):
        k = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(32, kernel_init=k)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        k = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        return nn.Dense(8, kernel_init=k, name="head")(x)


LOGICAL = [("embed", "data"), ("mlp", "model")]


def test_annotated_model_without_rules(mesh):
    """As Flax: annotations shard, the rest is replicated; so are unmirrored moments."""
    key = jax.random.key(0)
    tx = optax.adafactor(1e-3, min_dim_size_to_factor=4)
    state = flaxlazy.init_train_state(Annotated(), tx, key, X, mesh=mesh,
                                      logical_axis_rules=LOGICAL)
    assert state.params["Dense_0"]["kernel"].sharding.spec == P("data", "model")
    assert state.params["Dense_0"]["bias"].sharding.spec == P()
    factored = state.opt_state[0].v_row["Dense_0"]["kernel"]  # mirrors no parameter
    assert factored.ndim == 1 and factored.sharding.spec == P()
    keep = [("params/**", None), ("params/**", P()), ("batch_stats/**", P())]
    with pytest.raises(ValueError, match=r"optimizer state leaves "
                                         r"'opt_state/0/v_row/BatchNorm_0/bias' \(float32\[1\]\)"):
        flaxlazy.abstract_train_state(Annotated(), tx, key, X, mesh=mesh,
                                      logical_axis_rules=LOGICAL, partition_rules=keep)
    relaxed = flaxlazy.abstract_train_state(Annotated(), tx, key, X, mesh=mesh,
                                            logical_axis_rules=LOGICAL, partition_rules=keep,
                                            require_rules=False)
    assert relaxed.opt_state[0].v_row["Dense_0"]["kernel"].sharding.spec == P()
    adam = flaxlazy.init_train_state(Annotated(), optax.adam(1e-3), key, X, mesh=mesh,
                                     logical_axis_rules=LOGICAL)
    assert adam.opt_state[0].mu["head"]["kernel"].sharding.spec == P("model", "data")
    chex.assert_trees_all_close(
        jax.device_get(adam.params),
        nn.meta.unbox(Annotated().init(key, jnp.zeros(X.shape))["params"]), rtol=1e-6)


@pytest.mark.parametrize(
    "opt_rules",
    [
        [("opt_state/*/v_row/Dense_0/kernel", P("model")),
         ("opt_state/*/v_col/head/kernel", P("model")), ("opt_state/**", P())],
        [(re.compile(r"opt_state/\d+/v_(row/Dense_0|col/head)/kernel"), P("model")),
         (re.compile(r"opt_state/.*"), P())],
        {"opt_state": {"0": {"v_row": {"Dense_0": {"kernel": P("model"), "bias": P()}, "head": P(),
                                       "BatchNorm_0": P()},
                             "v_col": {"head": {"kernel": P("model"), "bias": P()}, "Dense_0": P(),
                                       "BatchNorm_0": P()},
                             "v": P()}},
         "params": {"Dense_0": {"kernel": P(None, "model"), "bias": P()}, "BatchNorm_0": P(),
                    "head": {"kernel": P("model", None), "bias": P()}},
         "batch_stats": P()},
    ],
    ids=["glob", "regex", "nested"],
)
def test_optimizer_state_rules_in_every_form(opt_rules, mesh):
    tx = optax.adafactor(1e-3, min_dim_size_to_factor=4)
    rules = opt_rules if isinstance(opt_rules, dict) else opt_rules + RULES
    state = flaxlazy.abstract_train_state(Net(), tx, jax.random.key(0), X, mesh=mesh,
                                          partition_rules=rules)
    factored = state.opt_state[0]
    assert factored.v_row["Dense_0"]["kernel"].sharding.spec == P("model")  # (32,)
    assert factored.v_col["head"]["kernel"].sharding.spec == P("model")  # (32,)
    assert factored.v_row["head"]["kernel"].sharding.spec == P()
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    full = flaxlazy.init_train_state(Net(), tx, jax.random.key(0), X, mesh=mesh,
                                     partition_rules=rules)
    assert [x.sharding for x in jax.tree.leaves(full)] == [
        x.sharding for x in jax.tree.leaves(state)]


def test_collection_qualified_rules_for_parameters(mesh):
    rules = [("params/Dense_0/kernel", P(None, "model")), ("params/head/kernel", P("model")),
             ("**", P())]
    state = flaxlazy.init_train_state(Net(), optax.adam(1e-3), jax.random.key(0), X,
                                      mesh=mesh, partition_rules=rules)
    assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert state.opt_state[0].nu["head"]["kernel"].sharding.spec == P("model")


class NNXNet(nnx.Module):
    """Net in NNX: two linears around a batch norm, the head named ``head``."""

    def __init__(self, *, rngs):
        self.Dense_0 = nnx.Linear(16, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 8, rngs=rngs)


ORDER_CASES = {
    "linen": (Net(), (jax.random.key(0), X), {}),
    "nnx": (NNXNet, (), {"rngs": nnx.Rngs(0)}),
}


@pytest.mark.parametrize("entrance", list(ORDER_CASES))
def test_both_entrances_meet_placement_problems_in_one_order(entrance, mesh):
    """A rule matching nothing and an optimizer leaf no rule covers: every train state,
    Linen or NNX, real or abstract, stops on the unused rule first, and inspect lists the
    two problems in that order (train_state.PROBLEM_ORDER)."""
    module, args, kwargs = ORDER_CASES[entrance]
    tx = optax.adafactor(1e-3, min_dim_size_to_factor=4)  # factored moments: no mirror
    rules = [("params/**", P()), ("batch_stats/**", P()), ("nothere/kernel", P())]
    for fn in (flaxlazy.init_train_state, flaxlazy.abstract_train_state):
        with pytest.raises(ValueError, match=r"nothere/kernel.* matches no"):
            fn(module, tx, *args, mesh=mesh, partition_rules=rules, **kwargs)
        with pytest.raises(ValueError, match=r"optimizer state leaves .* mirror no parameter"):
            fn(module, tx, *args, mesh=mesh, partition_rules=rules, allow_unused_rules=True,
               **kwargs)
    report = flaxlazy.inspect(module, *args, mesh=mesh.abstract_mesh, partition_rules=rules,
                              optimizer=tx, **kwargs)
    assert [p.kind for p in report.problems][:2] == ["unused_rule", "uncovered"]


def test_nnx_train_state_leaves_the_callers_rngs_as_the_constructor_does():
    """The optimizer is laid out from a model apart from the caller's objects: the
    caller's nnx.Rngs ends as after the constructor, and the model holds that object."""
    tx = optax.adam(1e-3)
    rngs, reference_rngs = nnx.Rngs(0, dropout=1), nnx.Rngs(0, dropout=1)
    reference = KeepsRngs(rngs=reference_rngs)
    model, optimizer = flaxlazy.init_train_state(KeepsRngs, tx, rngs=rngs)
    assert model.rngs is rngs
    chex.assert_trees_all_equal(nnx.state(rngs), nnx.state(reference_rngs))
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))
    expected = nnx.Optimizer(reference, tx, wrt=nnx.Param)
    chex.assert_trees_all_equal(nnx.state(optimizer), nnx.state(expected))
    abstract_rngs = nnx.Rngs(0, dropout=1)
    before = nnx.state(abstract_rngs)
    flaxlazy.abstract_train_state(KeepsRngs, tx, rngs=abstract_rngs)
    chex.assert_trees_all_equal(nnx.state(abstract_rngs), before)  # shapes only: untouched


@pytest.mark.parametrize("entrance", list(ORDER_CASES))
def test_a_train_state_traces_the_model_once(entrance):
    module, args, kwargs = ORDER_CASES[entrance]
    calls = []
    if entrance == "nnx":
        def module(*, rngs):  # noqa: F811 - the NNX constructor, counted
            calls.append(1)
            return NNXNet(rngs=rngs)
    else:
        class Counted(nn.Module):
            @nn.compact
            def __call__(self, x):
                calls.append(1)
                return Net()(x)
        module = Counted()
    for fn in (flaxlazy.init_train_state, flaxlazy.abstract_train_state):
        calls.clear()
        fn(module, optax.adam(1e-3), *args, **kwargs)
        assert len(calls) == 1, fn.__name__


@pytest.mark.parametrize("entrance", list(ORDER_CASES))
def test_materialize_meets_an_unused_rule_before_an_uncovered_variable(entrance, mesh):
    """materialize's order (sharding.PROBLEM_ORDER), for both entrances, as inspect lists
    it without an optimizer."""
    module, args, kwargs = ORDER_CASES[entrance]
    rules = [("params/**", P()), ("nothere/kernel", P())]  # batch stats uncovered
    with pytest.raises(ValueError, match=r"nothere/kernel.* matches no"):
        flaxlazy.materialize(module, *args, mesh=mesh, partition_rules=rules, **kwargs)
    with pytest.raises(ValueError, match=r"no partition rule matches .batch_stats/"):
        flaxlazy.materialize(module, *args, mesh=mesh, partition_rules=rules,
                             allow_unused_rules=True, **kwargs)
    report = flaxlazy.inspect(module, *args, mesh=mesh.abstract_mesh, partition_rules=rules,
                              **kwargs)
    assert [p.kind for p in report.problems][:2] == ["unused_rule", "uncovered"]


@pytest.mark.parametrize("entrance", list(ORDER_CASES))
@pytest.mark.parametrize("fn", [flaxlazy.init_train_state, flaxlazy.abstract_train_state])
def test_malformed_rules_fail_before_the_model_is_traced(entrance, fn, mesh):
    """Rules are normalized once, with the placement arguments: a form no rule takes is
    a TypeError naming `partition_rules`, and the model is never traced."""
    module, args, kwargs = ORDER_CASES[entrance]
    traced = []
    if entrance == "nnx":
        def module(*, rngs):  # noqa: F811 - the NNX constructor, counted
            traced.append(1)
            return NNXNet(rngs=rngs)
    else:
        class Counted(nn.Module):
            @nn.compact
            def __call__(self, x):
                traced.append(1)
                return Net()(x)
        module = Counted()
    with pytest.raises(TypeError, match=r"^`partition_rules` must be a mapping or list .*"
                                        r"got str; for one rule write \[\('\*\*', value\)\]"):
        fn(module, optax.adam(1e-3), *args, mesh=mesh, partition_rules="**", **kwargs)
    assert traced == []
