"""Many distinct models in one process: flaxlazy's caches stay bounded, and nothing it
does leaves JAX holding compiled code or jaxprs per model.

The growth targets against the framework's own jit (at most 1.2x) are measured by
``benchmarks/memory_growth.py``; these are fast regression guards.
"""

import gc
import json
import os
import subprocess
import sys
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxlazy
from flaxlazy._src import programs
from flaxlazy._src.compiles import count_compiles

SCRIPT = r"""
import json
import flax.linen as nn
import jax
import flaxlazy

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

class Net(nn.Module):
    width: int
    @nn.compact
    def __call__(self, x):
        # a kernel of >= 1,024 elements (drawn flat: one transform per fan-in) and small ones
        return nn.Dense(3 + self.width % 4)(nn.relu(nn.Dense(64 + self.width)(x)))

from flaxlazy._src import cache
from flaxlazy._src.draw import flat

samples, sizes = [], []
for i in range(N):
    out = flaxlazy.materialize(Net(i), jax.random.key(0), flaxlazy.spec((2, 16 + i)))
    jax.block_until_ready(out)
    del out
    samples.append(rss())
    sizes.append((len(cache.EXECUTABLES), cache.EXECUTABLES.nbytes, len(flat._TRANSFORMS)))
print(json.dumps({"rss": samples, "sizes": sizes, "max_bytes": cache.EXECUTABLES.max_bytes,
                  "max_count": cache.EXECUTABLES.size, "max_transforms": flat._TRANSFORMS.size}))
"""


@pytest.mark.slow  # a fresh process: run with -m slow
def test_rss_growth_is_bounded_over_many_models():
    # Each model has new parameter shapes, so each compiles new code (a flat-draw
    # transform for the new fan-in, the head's initializer): the one cache of compiled
    # functions fills (about 50 models; the zero biases need no compiled code), then
    # stays at its bound.
    n, steady = 80, 60
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("N)", f"{n})")],
        check=True, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for count, nbytes, transforms in report["sizes"]:
        assert count <= report["max_count"] and nbytes <= report["max_bytes"]
        assert transforms <= report["max_transforms"]
    rss = report["rss"]
    growth = (rss[-1] - rss[steady - 1]) / (n - steady)
    assert growth < 2.0, f"RSS grows {growth:.2f} MiB per model once the cache is full: {rss}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_constant_fills_of_new_shapes_compile_nothing(dtype):
    # An NNX constructor's zeros/ones (a bias, a norm's scale) are evaluated at trace
    # time; JAX would compile each broadcast for each new shape, eagerly, and keep the
    # executable (about 2 MiB) for the life of the process: one more per model of a sweep.
    def fills(n):
        return jax.make_jaxpr(lambda: [jnp.zeros((n,), dtype), jnp.ones((2, n), dtype).reshape(-1),
                                       jnp.full((1, n), 3, dtype).squeeze(0)])()

    closed = fills(5)
    with jax.ensure_compile_time_eval():
        want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts)
    chex.assert_trees_all_equal([np.asarray(x) for x in programs.eval_constants(closed)],
                                [np.asarray(x) for x in want])
    with count_compiles() as c:
        for n in (41, 42, 43):
            programs.eval_constants(fills(n))
    assert c.count == 0


class _Net(nnx.Module):
    def __init__(self, width, *, rngs):
        self.linear = nnx.Linear(3, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)


def test_nnx_models_of_new_widths_compile_only_their_initializers():
    # Each new width compiles its kernel's initializer and nothing for the zero bias or
    # the norm's zeros and ones (placed from the host), the same count every time.
    flaxlazy.materialize(_Net, 7, rngs=nnx.Rngs(0))
    counts = []
    for width in (11, 13):
        with count_compiles() as c:
            module = flaxlazy.materialize(_Net, width, rngs=nnx.Rngs(0))
        counts.append(c.count)
        want = nnx.jit(lambda w=width: _Net(w, rngs=nnx.Rngs(0)))()
        chex.assert_trees_all_equal(nnx.state(module, nnx.Param), nnx.state(want, nnx.Param))
    assert counts[0] == counts[1] <= 1, counts


def _calls_a_jitted_function():
    @jax.jit
    def inner(x):
        return jnp.sin(x) * 2

    return jax.make_jaxpr(lambda x: inner(x) + 1)(jnp.zeros(3))


def test_program_keys_keep_no_jaxpr_alive():
    # A jitted function's inner jaxpr (one per shape) is keyed once while JAX keeps it;
    # flaxlazy's key cache must not keep it (and what JAX caches by it) alive.
    closed = _calls_a_jitted_function()
    (sub,) = [e.params["jaxpr"].jaxpr for e in closed.jaxpr.eqns if "jaxpr" in e.params]
    ref = weakref.ref(sub)
    assert programs.from_closed(closed, jax.tree_util.tree_structure(0)).key is not None
    del closed, sub
    jax.clear_caches()
    gc.collect()
    assert ref() is None
