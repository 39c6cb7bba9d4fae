"""Compiled code is cached by the context it was compiled under (``compile_context``).

A kernel compiled inside ``jax.set_mesh`` takes and gives the ambient mesh's shardings;
served to a plain call (or the reverse) it fails with "Computation was compiled for input
shardings that disagree", or it would place values where the call did not ask.
"""

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import flaxlazy
from flaxlazy._src import compile_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(axis_type):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def test_key_changes_with_ambient_mesh_and_axis_types():
    plain = compile_context.key()
    with jax.set_mesh(_mesh(AxisType.Explicit)):
        explicit = compile_context.key()
    with jax.set_mesh(_mesh(AxisType.Auto)):
        auto = compile_context.key()
    with jax.sharding.use_abstract_mesh(_mesh(AxisType.Auto).abstract_mesh):
        abstract = compile_context.key()
    assert len({plain, explicit, auto, abstract}) == 4
    assert compile_context.key() == plain


def _nnx_pair():
    # 256x256 and 1000x64: large enough to be drawn flat by the shared bits kernel
    got_linear = flaxlazy.materialize(nnx.Linear, 256, 256, rngs=nnx.Rngs(0))
    got_embed = flaxlazy.materialize(nnx.Embed, 1000, 64, rngs=nnx.Rngs(1))
    want_linear = nnx.jit(lambda: nnx.Linear(256, 256, rngs=nnx.Rngs(0)))()
    want_embed = nnx.jit(lambda: nnx.Embed(1000, 64, rngs=nnx.Rngs(1)))()
    return (nnx.state(got_linear), nnx.state(got_embed)), (nnx.state(want_linear),
                                                          nnx.state(want_embed))


def _linen_pair():
    model, key, x = nn.Dense(256), jax.random.key(0), jnp.ones((2, 256))
    got = flaxlazy.materialize(model, key, x)
    return got, jax.jit(model.init)(key, x)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("entrance", [_nnx_pair, _linen_pair])
def test_mesh_then_plain_and_plain_then_mesh_in_process(entrance, axis_type):
    mesh = _mesh(axis_type)
    for under_mesh in (True, False, True, False):
        if under_mesh:
            with jax.set_mesh(mesh):
                got, want = entrance()
        else:
            got, want = entrance()
        got = jax.tree.map(np.asarray, got)
        chex.assert_trees_all_equal(got, jax.tree.map(np.asarray, want))


_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, flaxlazy
from flax import nnx
mesh = jax.make_mesh((2, 4), ("data", "model"))
def nnx_call(seed):
    got = flaxlazy.materialize(nnx.Embed, 1000, 64, rngs=nnx.Rngs(seed))
    want = nnx.jit(lambda: nnx.Embed(1000, 64, rngs=nnx.Rngs(seed)))()
    return np.asarray(got.embedding.get_value()), np.asarray(want.embedding.get_value())
def linen_call(seed):
    model, x = nn.Dense(256), jnp.ones((2, 256))
    got = flaxlazy.materialize(model, jax.random.key(seed), x)
    want = jax.jit(model.init)(jax.random.key(seed), x)
    return (np.asarray(got["params"]["kernel"]),
            np.asarray(want["params"]["kernel"]))
call = {entrance}_call
for seed, under_mesh in enumerate({order}):
    if under_mesh:
        with jax.set_mesh(mesh):
            got, want = call(seed)
    else:
        got, want = call(seed)
    assert (got == want).all(), (seed, under_mesh)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", [(True, False), (False, True)],
                         ids=["mesh_then_plain", "plain_then_mesh"])
@pytest.mark.parametrize("entrance", ["nnx", "linen"])
def test_fresh_process_mesh_and_plain_calls(entrance, order):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = textwrap.dedent(_SCRIPT).format(entrance=entrance, order=order)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
