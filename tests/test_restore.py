"""from_checkpoint through the initializer tree, and restore() of whole trees."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from plans import plan_of

import flaxlazy

X = flaxlazy.spec("f32[4,12]")


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(16)(nn.relu(nn.Dense(24)(x))))


class Classifier(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes, name="head")(Backbone(name="backbone")(x))


@pytest.fixture
def pretrained(tmp_path):
    variables = flaxlazy.materialize(Classifier(5), jax.random.key(1), X)
    path = str(tmp_path / "ckpt")
    flaxlazy.save(path, variables)
    return path, variables


def test_full_restore_equals_saved(pretrained):
    path, saved = pretrained
    got = flaxlazy.materialize(
        Classifier(5), jax.random.key(0), X, initializers={"**": flaxlazy.from_checkpoint(path)}
    )
    chex.assert_trees_all_equal(got, saved)


def test_partial_restore_keeps_pretrained_and_inits_the_rest(pretrained):
    path, saved = pretrained
    key = jax.random.key(0)
    initializers = {"backbone/**": flaxlazy.from_checkpoint(path)}
    with pytest.warns(UserWarning, match=r"2 checkpoint entries under 'params' not used.*head"):
        got = flaxlazy.materialize(Classifier(10), key, X, initializers=initializers)
    chex.assert_trees_all_equal(got["params"]["backbone"], saved["params"]["backbone"])
    plain = flaxlazy.materialize(Classifier(10), key, X)
    chex.assert_trees_all_equal(got["params"]["head"], plain["params"]["head"])
    with pytest.warns(UserWarning, match="not used"):  # plans are never cached: warned again
        plan = plan_of(Classifier(10), key, X, initializers=initializers)
    sources = {leaf.path: leaf.source for leaf in plan.leaves}
    assert sources["params/backbone/Dense_0/kernel"] == "checkpoint"  # nothing drawn for it
    assert sources["params/head/kernel"] == "flax"


def test_unconsumed_entries_error_when_strict(pretrained):
    path, _ = pretrained
    with pytest.raises(ValueError, match=r"not used by the model: 'params/head/bias'"):
        flaxlazy.materialize(
            Classifier(10), jax.random.key(0), X,
            initializers={"backbone/**": flaxlazy.from_checkpoint(path, strict=True)},
        )


def test_rename_and_subtree(tmp_path):
    encoder = {"encoder": flaxlazy.materialize(Backbone(), jax.random.key(3), X)["params"]}
    path = str(tmp_path / "bare")
    flaxlazy.save(path, encoder)  # a bare params tree: subtree=""
    source = flaxlazy.from_checkpoint(path, subtree="", rename=[(r"backbone/(.*)", r"encoder/\1")])
    got = flaxlazy.materialize(Classifier(3), jax.random.key(0), X,
                               initializers={"backbone/**": source})
    chex.assert_trees_all_equal(got["params"]["backbone"], encoder["encoder"])


def test_missing_entry_and_shape_mismatch(pretrained, tmp_path):
    path, _ = pretrained
    mismatch = r"'params/head/bias' is float32\[10\] in the model but checkpoint entry "
    with pytest.raises(ValueError, match=mismatch + r"'params/head/bias' is float32\[5\]"):
        flaxlazy.materialize(Classifier(10), jax.random.key(0), X,
                             initializers={"head/**": flaxlazy.from_checkpoint(path)})
    missing = (r"'params/backbone/Dense_0/bias' \(float32\[16\]\) maps to checkpoint entry "
               r"'params/backbone/Dense_9/bias', which the checkpoint does not have\. Closest")
    with pytest.raises(ValueError, match=missing):
        flaxlazy.materialize(
            Classifier(5), jax.random.key(0), X,
            initializers={"backbone/**": flaxlazy.from_checkpoint(
                path, rename=[(r"backbone/Dense_0/(.*)", r"backbone/Dense_9/\1")])},
        )


def test_sharded_restore_yields_requested_shardings(pretrained):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    path, saved = pretrained
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rules = [("backbone/**/kernel", P(None, "model")), ("**", P())]
    got = flaxlazy.materialize(
        Classifier(5), jax.random.key(0), X, mesh=mesh, partition_rules=rules,
        initializers={"**": flaxlazy.from_checkpoint(path)},
    )
    kernel = got["params"]["backbone"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(24, 4)}  # (24, 16) / 4
    chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(saved))


def test_resume_train_state_with_abstract_target(tmp_path):
    tx = optax.adamw(1e-3)
    state = flaxlazy.init_train_state(Classifier(5), tx, jax.random.key(0), X)
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)
    path = str(tmp_path / "state")
    flaxlazy.save(path, state)
    target = flaxlazy.abstract_train_state(Classifier(5), tx, jax.random.key(0), X)
    restored = flaxlazy.restore(path, target)
    assert int(restored.step) == 1
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)


def test_from_checkpoint_argument_errors():
    with pytest.raises(TypeError, match="`path` must be a directory path"):
        flaxlazy.from_checkpoint("")
    with pytest.raises(ValueError, match=r"`rename\[0\]`: the regex '\(' does not compile"):
        flaxlazy.from_checkpoint("x", rename=[("(", "y")])


class Tied(nnx.Module):
    """An output projection tied to the embedding: one nnx.Param under two attributes."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.lm_head_w = self.embed.embedding
        self.out = nnx.Linear(4, 3, rngs=rngs)


def test_restore_into_abstract_nnx_module_with_tied_params(tmp_path):
    model = flaxlazy.materialize(Tied, rngs=nnx.Rngs(3))
    path = tmp_path / "tied"
    flaxlazy.save(path, model)
    abstract = flaxlazy.abstract_init(Tied, rngs=nnx.Rngs(0))
    restored = flaxlazy.restore(path, abstract)
    assert isinstance(restored, Tied)
    assert restored.lm_head_w is restored.embed.embedding  # still one parameter
    chex.assert_trees_all_equal(nnx.state(restored), nnx.state(model))
    assert isinstance(abstract.embed.embedding.get_value(), jax.ShapeDtypeStruct)  # untouched
