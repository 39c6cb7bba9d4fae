"""Misused entrances are one clear TypeError/ValueError from flaxlazy (issue 19).

An NNX ``rngs`` that is not an ``nnx.Rngs``, a plain function called Linen-style, and a
Linen ``mutable`` that creates nothing: each names the argument, what was expected,
what was received and the fix, through every public function that shares the entrance
(``materialize``, ``abstract_init``, ``init_train_state``, ``abstract_train_state``).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import flaxlazy

X = flaxlazy.spec("f32[4,3]")
KEY = jax.random.key(0)
TX = optax.sgd(0.1)


class MLP(nnx.Module):
    def __init__(self, din, *, rngs):
        self.linear = nnx.Linear(din, 4, rngs=rngs)


def _entrances(fn_name):
    """Each public function sharing an entrance, as ``(name, call(module, *args, **kw))``."""
    return {
        "materialize": flaxlazy.materialize,
        "abstract_init": flaxlazy.abstract_init,
        "init_train_state": lambda m, *a, **k: flaxlazy.init_train_state(m, TX, *a, **k),
        "abstract_train_state": lambda m, *a, **k: flaxlazy.abstract_train_state(m, TX, *a,
                                                                                 **k),
    }[fn_name]


ALL = ["materialize", "abstract_init", "init_train_state", "abstract_train_state"]
# Each message names the function the user called (the NNX train-state functions run
# materialize's and abstract_init's pipelines under their own names).
NAMED = {fn: fn for fn in ALL}


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("rngs, got, fix", [
    pytest.param(KEY, r"a PRNG key \(dtype key<fry>, shape \(\)\)",
                 r"Wrap the key in an nnx.Rngs: rngs=nnx.Rngs\(key\)", id="key"),
    pytest.param(jax.random.PRNGKey(0), r"a raw uint32\[2\] PRNG key \(dtype uint32, "
                 r"shape \(2,\)\)",
                 r"rngs=nnx.Rngs\(key\)", id="raw-key"),
    pytest.param(0, r"int 0", r"Pass rngs=nnx.Rngs\(0\)\.", id="int"),
    pytest.param(None, r"None", r"only layers that draw none, such as nnx.Dropout", id="none"),
    pytest.param([nnx.Rngs(0)], r"a list \(Rngs\)", r"Pass one nnx.Rngs, not a list",
                 id="list"),
])
def test_nnx_rngs_that_is_not_an_nnx_rngs(fn, rngs, got, fix):
    # The constructor's own error stays attached (``from``), and names what it tried.
    with pytest.raises(TypeError, match=rf"{NAMED[fn]}: `rngs` must be an nnx.Rngs such as "
                                        rf"nnx.Rngs\(0\).*, got {got}: MLP failed with it "
                                        rf"\((AttributeError|TypeError): .*\)\. .*{fix}") as e:
        _entrances(fn)(MLP, 3, rngs=rngs)
    assert e.value.__cause__ is not None
    # Positionally, to a parameter named rngs, as well.
    with pytest.raises(TypeError, match=rf"{NAMED[fn]}: `rngs` must be an nnx.Rngs"):
        _entrances(fn)(lambda din, rngs: MLP(din, rngs=rngs), 3, rngs)


def test_nnx_rngs_that_the_constructor_accepts_are_left_alone():
    # Only a constructor that fails on its `rngs` gets the message: None, an int seed or a
    # key are fine where the constructor takes them.
    model = flaxlazy.materialize(nnx.Dropout, 0.5, rngs=None)
    assert model.rngs is None

    def seeded(din, *, rngs):
        return MLP(din, rngs=nnx.Rngs(rngs))

    for seed in (7, jax.random.key(7)):
        model = flaxlazy.materialize(seeded, 3, rngs=seed)
        reference = seeded(3, rngs=7)
        assert jnp.array_equal(model.linear.kernel[...], reference.linear.kernel[...])
    # An error that has nothing to do with `rngs` is the constructor's own.

    def broken(*, rngs):
        raise KeyError("not about rngs")

    with pytest.raises(KeyError, match="not about rngs"):
        flaxlazy.materialize(broken, rngs=None)


@pytest.mark.parametrize("fn", ALL)
def test_a_function_called_linen_style(fn):
    def f(x):
        return x

    for module, name in ((lambda x: x, "<lambda>"), (f, "f")):
        with pytest.raises(TypeError, match=rf"{NAMED[fn]}: {name} is neither a "
                                            r"flax.linen.Module nor a constructor "
                                            r"returning an nnx.Module: it takes \(x\), and "
                                            r"the arguments given do not fit "
                                            r"\(too many positional arguments\)\. Its first "
                                            r"argument is a PRNG key, as in a Linen call.*"
                                            r"For Linen, pass a module instance, e.g\. "
                                            rf"flaxlazy\.{NAMED[fn]}\(nn\.Dense\(4\)"):
            _entrances(fn)(module, KEY, X)
    # Arguments that fit but a result that is no module: the same opening.
    with pytest.raises(TypeError, match=rf"{NAMED[fn]}: <lambda> is neither a "
                                        r"flax.linen.Module nor a constructor returning an "
                                        r"nnx.Module: called with "
                                        r"the arguments given, it returned an array of shape "
                                        r"\(4, 3\), not an nnx.Module"):
        _entrances(fn)(lambda k, x: x, KEY, X)
    # An NNX class keeps Python's own message, which names it.
    with pytest.raises(TypeError, match=r"MLP.__init__\(\) missing 1 required keyword-only "
                                        r"argument: 'rngs'"):
        _entrances(fn)(MLP, 3)


class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))


@pytest.mark.parametrize("fn", ["materialize", "abstract_init"])
@pytest.mark.parametrize("module, mutable, col, example", [
    pytest.param(nn.Dense(3), False, "params", ["params"], id="false"),
    pytest.param(nn.Dense(3), [], "params", ["params"], id="empty"),
    pytest.param(BN(), ["batch_stats"], "params", ["params", "batch_stats"], id="no-params"),
    pytest.param(BN(), "params", "batch_stats", ["params", "batch_stats"],
                 id="no-batch-stats"),
])
def test_linen_mutable_that_does_not_create_the_modules_collections(fn, module, mutable, col,
                                                                    example):
    with pytest.raises(ValueError, match=rf"{fn}: `mutable={re.escape(repr(mutable))}` does "
                                         rf"not let init create the '{col}' collection the "
                                         r"module creates .*Leave `mutable` out \(the default "
                                         r"creates every collection but 'intermediates'\), "
                                         r"or name every collection the module creates, "
                                         rf"e\.g\. mutable={re.escape(repr(example))}"):
        getattr(flaxlazy, fn)(module, KEY, X, mutable=mutable)


def test_linen_mutable_none_and_values_that_work():
    with pytest.raises(TypeError, match=r"materialize: `mutable` must be a collection filter "
                                        r"as in Module.init.*got None"):
        flaxlazy.materialize(nn.Dense(3), KEY, X, mutable=None)
    got = flaxlazy.abstract_init(BN(), KEY, X, mutable=["params", "batch_stats"])
    assert set(got) == {"params", "batch_stats"}
    assert set(flaxlazy.materialize(nn.Dense(3), KEY, X, mutable=True)) == {"params"}
