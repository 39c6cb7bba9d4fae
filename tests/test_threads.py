"""Many threads at once: every value equals the framework's own init, and nothing
process-wide (Flax's Scope, JAX's transforms, the garbage collector) stays changed.

flaxlazy watches how Flax creates variables by hooking a few Flax/JAX functions while it
traces (``_compat.thread_patches``). The hooks dispatch per thread: a thread that is not
tracing, plain Flax code included, must see the originals, even while another traces.
"""

import concurrent.futures
import contextlib
import gc
import json
import random
import subprocess
import sys
import threading

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import nnx_models
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import flaxlazy
from flaxlazy._src import _compat
from flaxlazy._src import gc_pause


class Wide(nn.Module):
    """One kernel large enough (1.5M elements) to be drawn flat, on the drawing threads."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.Dense(1536)(x))


def _linen_cases():
    wide = models.Case("wide", Wide(), (jnp.zeros((2, 1024), jnp.float32),), {})
    return [models.mlp_compact(), models.scan_remat(), models.vmap_ensemble(),
            models.remat_layers(), wide]


_NNX = {
    "stacked": lambda rngs: nnx_models.Stacked(3, 8, rngs=rngs),
    "gpt": lambda rngs: nnx_models.GPT(1, 16, 50, rngs=rngs),
    "wide": lambda rngs: nnx.Linear(1024, 1536, rngs=rngs),
}


def _linen_init(case, seed):
    return case.module.init(models.make_rngs(case.rngs, seed), *case.args, **case.kwargs)


def _linen_materialize(case, seed):
    specs = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x,
        case.args,
    )
    return flaxlazy.materialize(case.module, models.make_rngs(case.rngs, seed), *specs,
                                **case.kwargs)


def _patched_functions():
    """The functions flaxlazy may hook, as they are now."""
    return {point: getattr(owner, name, None)
            for point, (owner, name) in _compat._patch_points().items()}


@pytest.mark.slow
def test_threads_materialize_linen_and_nnx_beside_plain_flax():
    """4 threads x 10 calls mixing materialize (Linen and NNX, small leaves and a flat-
    drawn 1.5M-element kernel), plain ``module.init`` and plain NNX construction: each
    equals ``jax.jit(module.init)`` / ``nnx.jit(ctor)`` on the same seed."""
    before = _patched_functions()
    gc_before = gc.isenabled()
    linen = {case.name: case for case in _linen_cases()}
    seeds = (0, 1)
    want_linen = {
        (name, s): jax.jit(lambda r, c=case: c.module.init(r, *c.args, **c.kwargs))(
            models.make_rngs(case.rngs, s))
        for name, case in linen.items() for s in seeds
    }
    want_nnx = {(name, s): nnx_models.values(nnx.jit(lambda c=ctor, s=s: c(nnx.Rngs(s)))())
                for name, ctor in _NNX.items() for s in seeds}
    # Plain calls run op by op, whose rounding may differ from a compiled run's by an
    # ulp (x * 0.02 fused or not): they are compared with the same plain calls, made
    # here before any thread starts.
    eager_linen = {(name, s): _linen_init(linen[name], s)
                   for name in ("scan_remat", "mlp_compact") for s in seeds}
    eager_nnx = {("gpt", s): nnx_models.values(_NNX["gpt"](nnx.Rngs(s))) for s in seeds}

    jobs = ([("linen", name) for name in linen] + [("nnx", name) for name in _NNX]
            + [("plain_linen", "scan_remat"), ("plain_linen", "mlp_compact"),
               ("plain_nnx", "gpt")])
    start = threading.Barrier(4)

    def work(index):
        rng = random.Random(index)
        start.wait()
        done = []
        for _ in range(10):
            kind, name = rng.choice(jobs)
            seed = rng.choice(seeds)
            if kind == "linen":
                chex.assert_trees_all_equal(_linen_materialize(linen[name], seed),
                                            want_linen[(name, seed)])
            elif kind == "plain_linen":
                chex.assert_trees_all_equal(_linen_init(linen[name], seed),
                                            eager_linen[(name, seed)])
            elif kind == "nnx":
                got = flaxlazy.materialize(_NNX[name], nnx.Rngs(seed))
                chex.assert_trees_all_equal(nnx_models.values(got), want_nnx[(name, seed)])
            else:
                got = _NNX[name](nnx.Rngs(seed))
                chex.assert_trees_all_equal(nnx_models.values(got), eager_nnx[(name, seed)])
            done.append((kind, name, seed))
        return done

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = [f.result() for f in [pool.submit(work, i) for i in range(4)]]
    assert sum(map(len, done)) == 40
    assert {kind for calls in done for kind, _, _ in calls} >= {"linen", "nnx", "plain_linen"}

    after = _patched_functions()
    for point, fn in before.items():
        assert after[point] is fn, f"{point} left changed"
    assert not _compat._INSTALLED
    assert gc.isenabled() == gc_before


_FRESH = """
import json, jax, numpy as np, flax.linen as nn
v = nn.Dense(3).init(jax.random.key(7), np.ones((1, 4), np.float32))
print(json.dumps(np.asarray(v["params"]["kernel"]).ravel().tolist()))
"""


class _FailsHalfway(nn.Module):
    """Creates a parameter, then raises: the trace stops inside flaxlazy's hooks."""

    @nn.compact
    def __call__(self, x):
        nn.Dense(4)(x)
        raise ValueError("halfway")


@pytest.mark.slow
def test_plain_init_after_threads_equals_a_fresh_process():
    """After threads materialized (half of them failing halfway through the trace), a
    plain ``module.init`` with no flaxlazy call gives what a fresh process gives."""
    case = models.scan_remat()
    x = jax.ShapeDtypeStruct((2, 8), jnp.float32)

    def call(i):
        if i % 2:
            with pytest.raises(ValueError, match="halfway"):
                flaxlazy.materialize(_FailsHalfway(), jax.random.key(i), x)
        else:
            _linen_materialize(case, i)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(8)))
    got = nn.Dense(3).init(jax.random.key(7), np.ones((1, 4), np.float32))
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu"})
    fresh = np.asarray(json.loads(out.stdout), np.float32).reshape(4, 3)
    np.testing.assert_array_equal(np.asarray(got["params"]["kernel"]), fresh)
    assert np.abs(fresh).sum() > 0  # (the zeros a leaked stand-in gives are not equal)


# ------------------------------------------------------------- the patch mechanism
_SPLIT = "jax.random.split"


def _tagging(tag, log):
    def hook(original, key, num=2):
        log.append(tag)
        return original(key, num)

    return hook


@settings(max_examples=25, deadline=None)
@given(plans=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4), min_size=2,
                      max_size=4))
def test_hooks_are_seen_by_their_own_thread_only(plans):
    """Threads enter nested hook blocks (depth per step), calling ``jax.random.split`` at
    each level, interleaved at barriers: each call runs exactly its own thread's hooks,
    innermost first; a thread with none runs the original; afterwards nothing is left
    patched."""
    original = jax.random.split
    barrier = threading.Barrier(len(plans))
    key = jax.random.key(0)
    failures = []

    def run(index, depths):
        for step, depth in enumerate(depths):
            log = []
            with contextlib.ExitStack() as stack:
                for d in range(depth):
                    stack.enter_context(_compat.thread_patches({_SPLIT: _tagging((index, d), log)}))
                barrier.wait()
                jax.random.split(key, 2)
                barrier.wait()
            want = [(index, d) for d in reversed(range(depth))]
            if log != want:
                failures.append((index, step, log, want))
        for _ in range(len(depths), max(map(len, plans))):  # keep the barriers in step
            barrier.wait()
            barrier.wait()

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert jax.random.split is original
    assert not _compat._INSTALLED


def test_hooks_removed_when_the_block_raises():
    original = jax.vmap
    with pytest.raises(RuntimeError, match="boom"):
        with _compat.thread_patches({"jax.vmap": lambda orig, *a, **k: orig(*a, **k)}):
            assert jax.vmap is not original
            raise RuntimeError("boom")
    assert jax.vmap is original


def test_gc_pause_on_overlapping_threads_restores_the_collector():
    """Two overlapping pauses on two threads: the collector is back on after the last
    one ends, whichever ends first."""
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_pause.paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_pause.paused():
        t.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread still traces
    release.set()
    t.join()
    assert gc.isenabled()
