"""Flax NNX through flaxlazy: values, RNG state and compile counts equal NNX's own."""

import warnings

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from nnx_models import GPT
from nnx_models import Bridged
from nnx_models import Counter
from nnx_models import KeepsRngs
from nnx_models import Layer
from nnx_models import Sharded
from nnx_models import Stacked
from nnx_models import TwoRngs
from nnx_models import TwoStacks
from nnx_models import WithState
from nnx_models import values
from plans import plan_of

import flaxlazy
from flaxlazy._src import summary as summary_lib
from flaxlazy._src.compiles import count_compiles
from flaxlazy._src.draw import flat
from flaxlazy._src.sources import initializer


def _reference(ctor, *args, seed=0, **kwargs):
    """``nnx.jit`` of the constructor, as NNX users create models."""
    return nnx.jit(lambda: ctor(*args, rngs=nnx.Rngs(seed), **kwargs))()


def _same_structure(a, b):
    """Equal state trees, variable metadata included (e.g. ``eager_sharding``)."""
    assert jax.tree.structure(nnx.state(a)) == jax.tree.structure(nnx.state(b))


def _sources(ctor, *args, **kwargs):
    return {leaf.path: leaf.source for leaf in plan_of(ctor, *args, **kwargs).leaves}


@pytest.mark.parametrize("layers", [2, pytest.param(24, marks=pytest.mark.slow)])
def test_gpt_equals_nnx_jit(layers):
    model = flaxlazy.materialize(GPT, layers, 16, 50, rngs=nnx.Rngs(0))
    assert isinstance(model, GPT)
    reference = _reference(GPT, layers, 16, 50)
    chex.assert_trees_all_equal(values(model), values(reference))
    _same_structure(model, reference)
    # Every leaf (RngKey/RngCount of the Dropouts included) replays alone.
    assert set(_sources(GPT, layers, 16, 50, rngs=nnx.Rngs(0)).values()) == {"flax"}


def test_gpt_runs_and_has_the_types():
    model = flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0))
    model.eval()
    out = model(jnp.zeros((2, 5), jnp.int32))
    chex.assert_shape(out, (2, 5, 50))
    assert isinstance(model.blocks[0].bn.mean, nnx.BatchStat)
    assert isinstance(model.blocks[1].drop.rngs.key, nnx.RngKey)


def test_compile_count_flat_in_depth():
    counts = []
    for layers in (2, 24):
        flaxlazy.clear_caches()
        with count_compiles() as c:
            jax.block_until_ready(nnx.state(flaxlazy.materialize(GPT, layers, 16, 50,
                                                                 rngs=nnx.Rngs(0))))
        counts.append(c.count)
    assert counts[0] == counts[1] > 0
    with count_compiles() as c:
        flaxlazy.materialize(GPT, 24, 16, 50, rngs=nnx.Rngs(1))
    assert c.count == 0


def test_caller_rngs_end_as_after_the_constructor():
    mine, eager = nnx.Rngs(3, dropout=4), nnx.Rngs(3, dropout=4)
    flaxlazy.materialize(GPT, 2, 16, 50, rngs=mine)
    GPT(2, 16, 50, rngs=eager)
    chex.assert_trees_all_equal(values(mine), values(eager))
    untouched = nnx.Rngs(3)
    flaxlazy.abstract_init(GPT, 2, 16, 50, rngs=untouched)
    chex.assert_trees_all_equal(values(untouched), values(nnx.Rngs(3)))


def test_second_call_with_other_arguments_is_fresh():
    def make(std, *, rngs):
        return nnx.Linear(8, 8, kernel_init=nnx.initializers.normal(std), rngs=rngs)

    for std in (1.0, 0.5, 1.0):
        got = flaxlazy.materialize(make, std, rngs=nnx.Rngs(0))
        chex.assert_trees_all_equal(values(got), values(_reference(make, std)))


@pytest.mark.slow
def test_abstract_init_is_nnx_eval_shape():
    abstract = flaxlazy.abstract_init(GPT, 48, 1024, 32000, rngs=nnx.Rngs(0))
    expected = nnx.eval_shape(lambda: GPT(48, 1024, 32000, rngs=nnx.Rngs(0)))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(expected))
    assert got == want
    assert isinstance(abstract.blocks[47].up.kernel.get_value(), jax.ShapeDtypeStruct)


def test_vmap_stack_equals_and_replays_alone():
    model = flaxlazy.materialize(Stacked, 4, 8, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(values(model), values(_reference(Stacked, 4, 8)))
    assert model.layers.linear.kernel.shape == (4, 8, 8)
    assert set(_sources(Stacked, 4, 8, rngs=nnx.Rngs(0)).values()) == {"flax"}


@pytest.mark.parametrize("layers", [3, 5])
def test_vmap_stacks_are_drawn_flat_layer_by_layer(monkeypatch, layers):
    """Large stacked kernels are drawn flat, each layer from its own split key (the
    split of ``fold_in(root, count)``, then its own count folded in), equal to NNX's."""
    drawn = []
    monkeypatch.setattr(flat, "draw_all", lambda jobs, orig=flat.draw_all: drawn.extend(
        (j.leaf.path, len(j.roots), int(j.fold)) for j in jobs) or orig(jobs))
    model = flaxlazy.materialize(TwoStacks, layers, 64, rngs=nnx.Rngs(1))
    chex.assert_trees_all_equal(values(model), values(_reference(TwoStacks, layers, 64, seed=1)))
    by_path = {path: (n, fold) for path, n, fold in drawn}
    assert by_path["params/a/up/kernel"] == (layers, 0)
    assert by_path["params/a/down/kernel"] == (layers, 2)  # after up's kernel and bias
    assert by_path["params/b/down/kernel"] == (layers + 1, 2)


def test_a_deeper_vmap_stack_compiles_nothing():
    flaxlazy.materialize(TwoStacks, 3, 64, rngs=nnx.Rngs(0))
    with count_compiles() as c:
        model = flaxlazy.materialize(TwoStacks, 7, 64, rngs=nnx.Rngs(2))
    assert c.count == 0  # the layers' keys come from the bits kernel
    chex.assert_trees_all_equal(values(model), values(_reference(TwoStacks, 7, 64, seed=2)))


def test_inspect_counts_the_compiles_of_vmap_stacks():
    flaxlazy.materialize(Stacked, 2, 4, rngs=nnx.Rngs(0))  # one-time self-checks first
    report = flaxlazy.inspect(TwoStacks, 3, 64, rngs=nnx.Rngs(0))
    flaxlazy.clear_caches()
    with count_compiles() as c:
        flaxlazy.materialize(TwoStacks, 3, 64, rngs=nnx.Rngs(0))
    assert report.compiles_total == c.count


def test_linen_inside_nnx_shaped_by_a_spec():
    sample = jnp.ones((2, 7))
    model = flaxlazy.materialize(Bridged, flaxlazy.spec("f32[2,7]"), rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(values(model), values(_reference(Bridged, sample)))
    assert model.body.layers_0["kernel"].shape == (7, 16)


def test_data_dependent_values_need_the_array():
    table = jnp.arange(6.0).reshape(2, 3)
    model = flaxlazy.materialize(WithState, table, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(values(model), values(_reference(WithState, table)))
    assert isinstance(model.calls, Counter)
    sources = _sources(WithState, table, rngs=nnx.Rngs(0))
    assert sources["params/w"] == "flax" and sources["params/table"] == "traced"
    with pytest.raises(ValueError, match=r"'params/table' depends on the values of input"):
        flaxlazy.materialize(WithState, flaxlazy.spec("f32[2,3]"), rngs=nnx.Rngs(0))


def test_overrides_by_state_path():
    zeros = nnx.initializers.zeros
    model = flaxlazy.materialize(
        GPT, 2, 16, 50, rngs=nnx.Rngs(0),
        initializers={"head/kernel": zeros, "blocks/*/up/kernel": nnx.initializers.ones},
    )
    ref = values(_reference(GPT, 2, 16, 50))
    got = values(model)
    assert not got["head/kernel"].any()
    assert (got["blocks/1/up/kernel"] == 1).all()
    for path in ref:
        if path not in ("head/kernel", "blocks/0/up/kernel", "blocks/1/up/kernel"):
            np.testing.assert_array_equal(got[path], ref[path], err_msg=path)
    with pytest.raises(ValueError, match=r"'head/kernal'.*head/kernel"):
        flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0),
                             initializers={"head/kernal": zeros})


def test_override_of_a_random_initializer_is_stable():
    normal = nnx.initializers.normal(0.5)
    a = flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0), initializers={"head/kernel": normal})
    b = flaxlazy.materialize(GPT, 3, 16, 50, rngs=nnx.Rngs(0), initializers={"head/kernel": normal})
    np.testing.assert_array_equal(a.head.kernel.get_value(), b.head.kernel.get_value())
    assert abs(float(a.head.kernel.get_value().std()) - 0.5) < 0.05


@pytest.mark.parametrize("always_shard", [False, True])
def test_sharded_on_eight_devices(always_shard):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with flax.config.temp_flip_flag("always_shard_variable", always_shard):
        model = flaxlazy.materialize(Sharded, rngs=nnx.Rngs(0), mesh=mesh)
        with jax.set_mesh(mesh):
            reference = _reference(Sharded)
    _same_structure(model, reference)
    # flaxlazy honours the annotation with the flag on or off (NNX itself shards eagerly
    # only with it on, and not in every supported Flax version).
    up = model.up.kernel.get_value()
    assert up.sharding.spec == P(None, "model")
    assert {s.data.shape for s in up.addressable_shards} == {(16, 16)}
    assert model.down.kernel.get_value().sharding.spec == P()
    chex.assert_trees_all_equal(values(model), values(reference))
    # Rules override the annotation; abstract_init shows the same layout.
    rules = [("down/kernel", P("model", None)), ("**", P())]
    model = flaxlazy.materialize(Sharded, rngs=nnx.Rngs(0), mesh=mesh, partition_rules=rules)
    assert model.down.kernel.get_value().sharding.spec == P("model", None)
    assert model.up.kernel.get_value().sharding.spec == P()
    abstract = flaxlazy.abstract_init(Sharded, rngs=nnx.Rngs(0), mesh=mesh,
                                      partition_rules=rules)
    assert abstract.down.kernel.get_value().sharding.spec == P("model", None)


def test_gpt_sharded_values_unchanged():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("model",))
    rules = [("**/up/kernel", P(None, "model")), ("**/down/kernel", P("model", None)),
             ("embed/embedding", P("model", None)), ("**", P())]
    model = flaxlazy.materialize(GPT, 2, 16, 64, rngs=nnx.Rngs(0), mesh=mesh,
                                 partition_rules=rules)
    assert model.blocks[1].up.kernel.get_value().sharding.spec == P(None, "model")
    chex.assert_trees_all_equal(values(model), values(_reference(GPT, 2, 16, 64)))


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"already constructed NNX module \(GPT\).*"
                                        r"flaxlazy.materialize\(GPT, \.\.\."):
        flaxlazy.materialize(GPT(1, 8, 10, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"`mutable` is an option of Linen's Module.init"):
        flaxlazy.materialize(GPT, 1, 8, 10, rngs=nnx.Rngs(0), mutable=True)
    with pytest.raises(TypeError, match=r"Pass an nnx.Rngs \(rngs=nnx.Rngs\(0\)\) rather "
                                        r"than a stream"):
        flaxlazy.materialize(GPT, 1, 8, 10, rngs=nnx.Rngs(0).params)
    with pytest.raises(TypeError, match=r"abstract_init: `partition_rules`.*need a `mesh=`"):
        flaxlazy.abstract_init(GPT, 1, 8, 10, rngs=nnx.Rngs(0), partition_rules=[])


def test_summary_counts_and_shardings_of_nnx_modules():
    abstract = flaxlazy.abstract_init(GPT, 2, 16, 50, rngs=nnx.Rngs(0))
    model = flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_all = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model)))
    for tree in (abstract, model, nnx.state(model), nnx.state(model, nnx.Param)):
        assert flaxlazy.num_params(tree) == n_params  # Params only, as Flax counts
    assert n_params < n_all == flaxlazy.num_params(summary_lib.as_tree(model))  # every leaf
    text = flaxlazy.summary(abstract)
    assert "params/blocks/1/up/kernel" in text and "batch_stats/blocks/0/bn/mean" in text
    assert "RngKey/blocks/0/drop/rngs/key" in text and "kernel/value" not in text
    # The paths summary prints are the ones initializer trees take (inside params).
    flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0),
                         initializers={"blocks/1/up/kernel": nnx.initializers.zeros})
    if len(jax.devices()) >= 8:
        mesh = jax.make_mesh((8,), ("model",))
        tree = flaxlazy.shardings(flaxlazy.abstract_init(Sharded, rngs=nnx.Rngs(0)), mesh)
        assert isinstance(tree, nnx.State)
        assert tree["up"]["kernel"].get_value().spec == P(None, "model")
        assert "512 B" in flaxlazy.summary(
            flaxlazy.abstract_init(Sharded, rngs=nnx.Rngs(0), mesh=mesh))


def test_lazy_bundle_for_nnx():
    net = flaxlazy.lazy(GPT, initializers={"head/kernel": nnx.initializers.zeros})
    assert net.shapes(1, 8, 10, rngs=nnx.Rngs(0)).head.kernel.shape == (8, 10)
    model = net.init(1, 8, 10, rngs=nnx.Rngs(0))
    model.eval()
    out = net.apply(model, jnp.zeros((1, 3), jnp.int32))
    chex.assert_trees_all_equal(out, jnp.zeros((1, 3, 10)))


def test_train_state_gives_an_optimizer_sharded_like_its_parameters():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    import optax

    mesh = jax.make_mesh((8,), ("model",))
    rules = [("**/up/kernel", P(None, "model")), ("**", P())]
    tx = optax.adamw(1e-2)
    model, opt = flaxlazy.init_train_state(GPT, tx, 2, 16, 64, rngs=nnx.Rngs(0), mesh=mesh,
                                           partition_rules=rules)
    assert isinstance(opt, nnx.Optimizer)
    mu = opt.opt_state[0].mu["blocks"][1]["up"]["kernel"].get_value()
    assert mu.sharding.spec == P(None, "model") and not mu.any()
    assert model.blocks[1].up.kernel.get_value().sharding.spec == P(None, "model")
    # Equal to NNX's own optimizer on NNX's own model, before and after a step.
    ref_model = _reference(GPT, 2, 16, 64)
    ref_opt = nnx.Optimizer(ref_model, tx, wrt=nnx.Param)
    chex.assert_trees_all_equal(values(model), values(ref_model))
    chex.assert_trees_all_equal(values(opt), values(ref_opt))
    tokens = jnp.arange(12).reshape(2, 6) % 64

    @nnx.jit
    def step(model, opt):
        def loss(model):
            logits = model(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    for m in (model, ref_model):
        m.eval()
    # Same losses over two steps (Adam turns the rounding noise of the sharded run in
    # zero gradients, e.g. attention key biases, into full steps: compare losses).
    for _ in range(2):
        losses = [float(step(model, opt)), float(step(ref_model, ref_opt))]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert int(opt.step.get_value()) == 2
    # The abstract train state has the same layout, nothing allocated.
    abstract_model, abstract_opt = flaxlazy.abstract_train_state(
        GPT, tx, 2, 16, 64, rngs=nnx.Rngs(0), mesh=mesh, partition_rules=rules)
    leaf = abstract_opt.opt_state[0].nu["blocks"][1]["up"]["kernel"].get_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P(None, "model")
    with pytest.raises(ValueError, match=r"opt_state/.*typo"):
        flaxlazy.abstract_train_state(GPT, tx, 2, 16, 64, rngs=nnx.Rngs(0), mesh=mesh,
                                      partition_rules=[("opt_state/typo", P())] + rules)


def test_checkpoint_initializers_and_restore(tmp_path):
    import orbax.checkpoint as ocp

    pretrained = flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(7))
    # A checkpoint as NNX users write it (Orbax, nnx.state), and one from flaxlazy.save.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", nnx.state(pretrained))
    flaxlazy.save(tmp_path / "ours", pretrained)
    fresh, want = values(_reference(GPT, 2, 16, 50)), values(pretrained)
    kinds = {"/".join(map(str, p)): type(v) for p, v in nnx.to_flat_state(nnx.state(pretrained))}
    for name in ("orbax", "ours"):
        source = flaxlazy.from_checkpoint(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the checkpoint's other variables are expected
            got = values(flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0),
                                              initializers={"**": source}))
        for path in got:
            expected = want if issubclass(kinds[path], nnx.Param) else fresh
            np.testing.assert_array_equal(got[path], expected[path], err_msg=f"{name}: {path}")
        with pytest.warns(UserWarning, match=r"2 checkpoint entries .*'embed/embedding/value'"):
            flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0),
                                 initializers={"blocks/**": source})
    restored = flaxlazy.restore(
        tmp_path / "ours", flaxlazy.abstract_init(GPT, 2, 16, 50, rngs=nnx.Rngs(0)))
    assert isinstance(restored, GPT)
    chex.assert_trees_all_equal(values(restored), values(pretrained))
    renamed = flaxlazy.from_checkpoint(tmp_path / "ours", rename=[(r"head/(.*)", r"lm_head/\1")])
    with pytest.raises(ValueError, match=r"'params/head/kernel' .*maps to checkpoint entry "
                                         r"'lm_head/kernel', which the checkpoint does not "
                                         r"have. Closest entries: 'head/kernel/value'"):
        flaxlazy.materialize(GPT, 2, 16, 50, rngs=nnx.Rngs(0), initializers={"head/**": renamed})


def test_override_of_a_vmap_stack_draws_per_layer():
    init = nnx.initializers.lecun_normal()
    model = flaxlazy.materialize(Stacked, 4, 8, rngs=nnx.Rngs(0),
                                 initializers={"layers/linear/kernel": init})
    kernel = model.layers.linear.kernel.get_value()
    chex.assert_shape(kernel, (4, 8, 8))
    # Each layer its own 8x8 draw (fan-in 8, not 32), from its own key.
    key = jax.random.fold_in(jax.random.key(0), initializer.override_key(
        "params/layers/linear/kernel"))
    layers = jax.vmap(lambda k: init(k, (8, 8), jnp.float32))(jax.random.split(key, 4))
    np.testing.assert_array_equal(kernel, layers)


def test_placement_errors_name_nnx_paths():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("model",))
    with pytest.raises(ValueError, match=r"no partition rule matches 'batch_stats/blocks/0/bn/"
                                         r"mean', .*'blocks/0/ln1/bias'"):
        flaxlazy.materialize(GPT, 1, 16, 64, rngs=nnx.Rngs(0), mesh=mesh,
                             partition_rules=[("**/kernel", P())])
    with pytest.raises(ValueError, match=r"'params/head/kernel'.*not divisible|"
                                         r"'params/head/kernel'.*divid"):
        flaxlazy.materialize(GPT, 1, 16, 60, rngs=nnx.Rngs(0), mesh=mesh,
                             partition_rules=[("head/kernel", P(None, "model")), ("**", P())])
    # Batch statistics are addressed by their collection, like Linen's.
    model = flaxlazy.materialize(GPT, 1, 16, 64, rngs=nnx.Rngs(0), mesh=mesh,
                                 partition_rules=[("batch_stats/**", P("model")), ("**", P())])
    assert model.blocks[0].bn.mean.get_value().sharding.spec == P("model")


def test_rngs_held_by_the_module_and_two_rngs_arguments():
    mine, eager = nnx.Rngs(0, noise=5), nnx.Rngs(0, noise=5)
    model = flaxlazy.materialize(KeepsRngs, rngs=mine)
    KeepsRngs(rngs=eager)
    reference = nnx.jit(lambda: KeepsRngs(rngs=nnx.Rngs(0, noise=5)))()
    chex.assert_trees_all_equal(values(model), values(reference))
    chex.assert_trees_all_equal(values(mine), values(eager))
    both = flaxlazy.materialize(TwoRngs, nnx.Rngs(1), nnx.Rngs(2))
    reference = nnx.jit(lambda: TwoRngs(nnx.Rngs(1), nnx.Rngs(2)))()
    chex.assert_trees_all_equal(values(both), values(reference))
    # Overrides draw from the first Rngs' params/default stream.
    flaxlazy.materialize(TwoRngs, nnx.Rngs(1), nnx.Rngs(2),
                         initializers={"b/kernel": nnx.initializers.normal()})


class KeepsStream(nnx.Module):
    """Holds one stream of the caller's Rngs (as Dropout(rngs=rngs.dropout) may)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.noise = rngs.noise
        self.linear = nnx.Linear(3, 3, rngs=rngs)


def _next_keys(rngs):
    return [jax.random.key_data(rngs.params()), jax.random.key_data(rngs.noise())]


def test_a_module_that_keeps_the_callers_rngs_holds_that_object():
    # As nnx.jit and a direct call: one Rngs, so the model never draws the keys the
    # caller draws next (it used to hold a copy in the same state: correlated draws).
    mine, jitted, direct = (nnx.Rngs(0, noise=5) for _ in range(3))
    model = flaxlazy.materialize(KeepsRngs, rngs=mine)
    reference = nnx.jit(lambda rngs: KeepsRngs(rngs=rngs))(jitted)
    eager = KeepsRngs(rngs=direct)
    assert model.rngs is mine and reference.rngs is jitted and eager.rngs is direct
    chex.assert_trees_all_equal(values(model), values(reference))
    chex.assert_trees_all_equal(values(mine), values(jitted), values(direct))
    chex.assert_trees_all_equal(_next_keys(mine), _next_keys(jitted), _next_keys(direct))
    chex.assert_trees_all_equal(_next_keys(model.rngs), _next_keys(reference.rngs))
    # A stream alone, under a mesh too.
    mesh = jax.make_mesh((8,), ("model",)) if len(jax.devices()) >= 8 else None
    for placement in ({}, {"mesh": mesh, "partition_rules": [("**", P())]}):
        if placement and mesh is None:
            continue
        mine, jitted = nnx.Rngs(0, noise=5), nnx.Rngs(0, noise=5)
        model = flaxlazy.materialize(KeepsStream, rngs=mine, **placement)
        reference = nnx.jit(lambda rngs: KeepsStream(rngs=rngs))(jitted)
        assert model.noise is mine.noise and reference.noise is jitted.noise
        chex.assert_trees_all_equal(values(model), values(reference))
        chex.assert_trees_all_equal(_next_keys(mine), _next_keys(jitted))
    # abstract_init, as nnx.eval_shape, gives an abstract copy and leaves the caller's be.
    mine = nnx.Rngs(0, noise=5)
    abstract = flaxlazy.abstract_init(KeepsRngs, rngs=mine)
    assert abstract.rngs is not mine
    chex.assert_trees_all_equal(values(mine), values(nnx.Rngs(0, noise=5)))


@pytest.mark.parametrize("rule, match", [
    pytest.param(("RngKey/**", P("tensor")),
                 r"`partition_rules`: pattern 'RngKey/\*\*' gives 'RngKey/drop/rngs/key' "
                 r"\(key<fry>\[\]\) the spec P\('tensor',\), but the mesh has no axis "
                 r"'tensor'", id="unknown-axis"),
    pytest.param(("RngCount/**", P("model")),
                 r"`partition_rules`: pattern 'RngCount/\*\*' gives 'RngCount/drop/rngs/count' "
                 r"\(uint32\[\]\) the spec P\('model',\), but the spec has 1 entries for "
                 r"an array of 0 dimension\(s\).*A scalar \(such as NNX RNG state.*can only "
                 r"be replicated", id="too-many-entries"),
])
def test_partition_rules_on_rng_state_are_checked(rule, match):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("model",))
    rules = [rule, ("**", P())]
    for fn in (flaxlazy.materialize, flaxlazy.abstract_init):
        with pytest.raises(ValueError, match=match):
            fn(Layer, 8, rngs=nnx.Rngs(0), mesh=mesh, partition_rules=rules)
    with pytest.raises(ValueError, match=match):
        flaxlazy.shardings(flaxlazy.abstract_init(Layer, 8, rngs=nnx.Rngs(0)),
                           mesh, partition_rules=rules)
    # A broad rule that shards arrays leaves the RNG state replicated, as before.
    model = flaxlazy.materialize(Layer, 8, rngs=nnx.Rngs(0), mesh=mesh,
                                 partition_rules=[("**", P("model"))])
    assert model.drop.rngs.key.get_value().sharding.spec == P()
    assert model.linear.kernel.get_value().sharding.spec == P("model")


def test_logical_annotations_with_logical_axis_rules():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((2, 4), ("data", "model"))

    def make(*, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        return nnx.Linear(16, 64, kernel_init=init, rngs=rngs)

    rules = [("embed", "data"), ("mlp", "model")]
    model = flaxlazy.materialize(make, rngs=nnx.Rngs(0), mesh=mesh, logical_axis_rules=rules)
    assert model.kernel.get_value().sharding.spec == P("data", "model")
    with flax.config.temp_flip_flag("always_shard_variable", False):  # NNX needs a mesh
        reference = _reference(make)
    chex.assert_trees_all_equal(values(model), values(reference))
    with pytest.raises(ValueError, match=r"logical axes \('embed', 'mlp'\).*no rule for 'mlp'"):
        flaxlazy.materialize(make, rngs=nnx.Rngs(0), mesh=mesh,
                             logical_axis_rules=[("embed", "data")])


def _rekeyed(table, *, rngs):
    """Replaces the params stream's key with one derived from ``table``'s data."""
    rngs.params.key[...] = jax.random.fold_in(rngs.params.key[...],
                                              jnp.sum(table).astype(jnp.uint32))
    return nnx.Linear(2, 2, rngs=nnx.Rngs(1))


def test_constructor_that_replaces_a_stream_key():
    table = jnp.arange(3)
    mine, eager = nnx.Rngs(params=4), nnx.Rngs(params=4)
    model = flaxlazy.materialize(_rekeyed, table, rngs=mine)
    reference = _rekeyed(table, rngs=eager)
    chex.assert_trees_all_equal(values(model), values(reference))
    chex.assert_trees_all_equal(values(mine), values(eager))  # the new key, computed
    with pytest.raises(ValueError, match=r"'nnx.Rngs params/key' depends on the values of "
                                         r"input\(s\) #0"):
        flaxlazy.materialize(_rekeyed, flaxlazy.spec("i32[3]"), rngs=nnx.Rngs(params=4))


def test_overrides_need_a_params_or_default_stream():
    def make(*, rngs):
        return nnx.Linear(2, 2, rngs=nnx.Rngs(1))  # its own Rngs; the caller's has none

    with pytest.raises(ValueError, match=r"overriding parameters needs .*NNX: a 'params' "
                                         r"or 'default' stream"):
        flaxlazy.materialize(make, rngs=nnx.Rngs(dropout=0),
                             initializers={"kernel": nnx.initializers.ones})
