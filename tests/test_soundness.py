"""Every call returns what a fresh process returns: no cache serves an earlier call's values.

Each case in tests/_soundness_cases.py runs stage 1 then stage 2 in this process; stage 2
is compared with stage 2 run alone in a fresh process, and (for the module's own
initializers) with ``jax.jit(module.init)``.
"""

import os
import subprocess
import sys

import _soundness_cases as cases
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxlazy
from flaxlazy._src import compiles

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Stage 2 of every case, computed in a fresh process."""
    out = tmp_path_factory.mktemp("fresh") / "stage2.npz"
    subprocess.run(
        [sys.executable, os.path.join(HERE, "_soundness_cases.py"), str(out)],
        check=True, timeout=300,
    )
    with np.load(out) as data:
        return dict(data)


def _flat(name, tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{name}{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cases.CASES))
def test_second_call_equals_fresh_process(name, fresh):
    case = cases.CASES[name]
    first = _flat(name, case(1))
    second = _flat(name, case(2))
    expected = {k: v for k, v in fresh.items() if k.startswith(name + "[")}
    assert second.keys() == expected.keys()
    chex.assert_trees_all_equal(second, expected)
    # The two stages really differ: a cache returning stage 1 would fail above.
    assert any(not np.array_equal(first[k], second[k]) for k in first), name


@pytest.mark.parametrize("name", list(cases.OWN))
def test_module_own_initializers_equal_jit_init(name):
    for stage in (1, 2, 1):
        cases.set_stage_globals(stage)
        got = cases.CASES[name](stage)
        model = cases.OWN[name](stage)
        want = jax.jit(model.init)(cases.key(), jnp.zeros(cases.X.shape, cases.X.dtype))
        chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("name", list(cases.NNX_OWN))
def test_nnx_own_initializers_equal_nnx_jit(name):
    for stage in (1, 2, 1):
        cases.set_stage_globals(stage)
        got = cases.CASES[name](stage)
        ctor = cases.NNX_OWN[name](stage)
        want = cases.nnx_values(nnx.jit(lambda c=ctor: c(rngs=nnx.Rngs(cases.KEY_SEED)))())
        chex.assert_trees_all_equal(got, want)


def test_equal_closures_share_compiled_code():
    # Equal computations still share one compiled function: no recompile on repeat,
    # and two distinct-but-equal closures compile once.
    init_a = jax.nn.initializers.normal(0.5)
    init_b = jax.nn.initializers.normal(0.5)
    cases.dense_params({"kernel": init_a})
    with compiles.count_compiles() as c:
        cases.dense_params({"kernel": init_b})
    assert c.count == 0
    with compiles.count_compiles() as c:
        cases.dense_params({"kernel": jax.nn.initializers.normal(0.25)})
    assert c.count >= 1  # another stddev is another program


def test_clear_caches_keeps_values():
    a = cases.dense_params({"kernel": jax.nn.initializers.normal(0.5)})
    flaxlazy.clear_caches()
    b = cases.dense_params({"kernel": jax.nn.initializers.normal(0.5)})
    chex.assert_trees_all_equal(a, b)


def test_checkpoint_overwritten_between_calls(tmp_path):
    ckpt = tmp_path / "ckpt"
    model = cases.nn.Dense(3)
    flaxlazy.save(ckpt, {"params": {"bias": jnp.ones(3), "kernel": jnp.ones((4, 3))}})
    init = {"**": flaxlazy.from_checkpoint(ckpt)}
    first = flaxlazy.materialize(model, cases.key(), cases.X, initializers=init)
    flaxlazy.save(
        ckpt, {"params": {"bias": jnp.full(3, 2.0), "kernel": jnp.zeros((4, 3))}}, force=True
    )
    second = flaxlazy.materialize(model, cases.key(), cases.X, initializers=init)
    chex.assert_trees_all_equal(first["params"]["bias"], jnp.ones(3))
    chex.assert_trees_all_equal(second["params"]["bias"], jnp.full(3, 2.0))
    # A checkpoint overwritten with another shape is re-validated, not read stale.
    flaxlazy.save(ckpt, {"params": {"bias": jnp.ones(5), "kernel": jnp.ones((4, 3))}},
                  force=True)
    with pytest.raises(ValueError, match="checkpoint entry 'params/bias' is float32"):
        flaxlazy.materialize(model, cases.key(), cases.X, initializers=init)


def test_prng_configuration_change_between_calls():
    # A chunked draw is only valid for the partitionable threefry; flipping the flag
    # between calls must not serve the first call's compiled draw.
    import flax.linen as nn

    model = nn.Dense(1100)  # 1100 * 1000 elements: above the chunking threshold
    x = flaxlazy.spec("f32[1,1000]")
    key = cases.key()
    flaxlazy.materialize(model, key, x)
    prior = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not prior)
        got = flaxlazy.materialize(model, key, x)
        want = jax.jit(model.init)(key, jnp.zeros(x.shape))
    finally:
        jax.config.update("jax_threefry_partitionable", prior)
    chex.assert_trees_all_equal(got, want)
