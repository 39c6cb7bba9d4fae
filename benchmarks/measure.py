"""One measurement of one init method on one zoo model, in this (fresh) process.

Usage: ``python benchmarks/measure.py --model gpt12 --method jit``. Prints one line
``RESULT {json}`` on stdout (``benchmarks/run.py`` starts this script once per
measurement, so every "cold" number includes everything a fresh process pays).

Methods:

* ``eager``: ``module.init(key, *zeros)``, op by op.
* ``jit``: ``jax.jit(module.init)`` staged by hand: ``.trace`` / ``.lower`` / ``.compile``
  / run, each timed.
* ``lazy_init``: Flax ``module.lazy_init(key, *specs)``.
* ``abstract``: ``flaxlazy.abstract_init(module, key, *specs)``.
* ``materialize_cold``: the first ``flaxlazy.materialize(module, key, *specs)`` here.
* ``materialize_warm``: a cold materialize (not timed), then a second one with another
  key (timed), then the reference "draw": one already-compiled call drawing the same
  number of values with the same distributions (timed).
* ``materialize_cache1`` / ``materialize_cache2``: a cold materialize with JAX's
  persistent compilation cache in ``--cache-dir``; run twice in two processes, the
  second reads what the first wrote.

NNX models (``zoo_nnx.py``, names ``nnx_*``) have no ``init``; their constructor draws the
parameters, so there: ``eager`` is the constructor called eagerly, ``jit`` is
``nnx.jit(lambda: Model(..., rngs=nnx.Rngs(0)))()`` (trace, compile and run in one timed
call), the flaxlazy methods take the constructor and its arguments, and ``lazy_init``
does not exist (``NNX_METHODS``).

Memory: the peak resident set size ("high water mark", ``VmHWM``) is reset through
``/proc/self/clear_refs`` right before the timed call, after imports, model and input
creation and JAX backend start-up; ``peak_rss`` is that peak minus the RSS at the reset.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import sys
import time
import traceback

METHODS = (
    "eager", "jit", "lazy_init", "abstract", "materialize_cold", "materialize_warm",
    "materialize_cache1", "materialize_cache2",
)
NNX_METHODS = tuple(m for m in METHODS if m != "lazy_init")


# --------------------------------------------------------------------------
# Resident memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak RSS above the RSS at ``reset()``, in bytes."""

    def __init__(self) -> None:
        self.exact = False
        self.base = 0

    def reset(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.exact = True
        except OSError:
            self.exact = False
        self.base = self.rss()

    @staticmethod
    def rss() -> int:
        kb = _status_kb("VmRSS")
        if kb is None:
            import psutil

            return psutil.Process().memory_info().rss
        return kb * 1024

    def peak(self) -> int:
        kb = _status_kb("VmHWM") if self.exact else None
        if kb is None:  # fall back to the whole process's peak
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * 1024 - self.base


# --------------------------------------------------------------------------
# Helpers


def _block(tree):
    import jax

    return jax.block_until_ready(tree)


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = _block(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def _is_nnx(model) -> bool:
    import zoo_nnx

    return isinstance(model, zoo_nnx.NnxModel)


def _plan(model, key):
    """The materialization plan of ``model`` (internal API; traces it again, untimed),
    through its entrance as ``materialize`` builds it."""
    from flaxlazy._src import entrances
    from flaxlazy._src import placement
    from flaxlazy._src import plan as plan_lib

    if _is_nnx(model):
        module, (args, kwargs) = model.ctor, model.call()
    else:
        module, args, kwargs = model.module, (key, *model.inputs), model.kwargs
    entrance = entrances.find(module, fn="materialize")
    with entrance.session(False):
        traced = entrance.trace(module, args, dict(kwargs), fn="materialize",
                                placement=placement.Placement.from_args(fn="materialize"),
                                options={}, abstract=False)
        return plan_lib.build(traced.records, initializers=None)


def _plan_counts(model, key) -> dict | None:
    """How many leaves materialize builds from each source ("flax", "traced", ...)."""
    try:
        return _plan(model, key).counts()
    except Exception:  # noqa: BLE001 - informational only
        return None


def _draw_function(plan):
    """One jitted ``key -> arrays`` drawing every leaf of ``plan`` with its own initializer.

    Leaves of one signature (the same traced initializer program, so the same shape and
    dtype) are drawn by one ``lax.map`` of it over as many keys as there are leaves, so the call
    produces the same number of values with the same distributions as the plan, while
    compiling only one initializer per signature (a Python loop inside one jit compiles
    for minutes at 48 layers; ``vmap`` runs about 2x slower than either on CPU). Leaves
    without a static recipe (traced ones) are drawn as standard normals of their shape.
    """
    import jax
    import jax.numpy as jnp

    from flaxlazy._src import programs

    groups: dict = {}
    extra = []
    for leaf in plan.leaves:
        program = leaf.program
        if program is not None and program.key is not None:
            run = programs.runner(program)
            group = groups.setdefault(
                program.key,
                [run, program.runtime_consts, leaf.key is not None, 0, tuple(leaf.layers)],
            )
            group[3] += 1
        else:
            extra.append((leaf.shape, leaf.dtype))

    def draw(key):
        keys = jax.random.split(key, len(groups) + len(extra))
        out = []
        for k, (run, consts, takes_key, n, layers) in zip(keys, groups.values(),
                                                           strict=False):
            if takes_key:  # stacked leaves (``leaf.layers``) take one key per layer
                fn = functools.partial(run, consts)
                out.append(jax.lax.map(fn, jax.random.split(k, (n, *layers))))
            else:
                value = run(consts)
                out.append(jnp.broadcast_to(value, (n, *value.shape)))
        for k, (shape, dtype) in zip(keys[len(groups):], extra, strict=True):
            if jnp.issubdtype(dtype, jnp.floating):
                out.append(jax.random.normal(k, shape, dtype))
            else:
                out.append(jnp.zeros(shape, dtype))
        return out

    return jax.jit(draw), len(groups), len(extra)


# --------------------------------------------------------------------------
# Methods. Each returns (variables or None, dict of numbers); timed parts only.


def run_eager(model, key, concrete, mem):
    del mem
    out, seconds = _timed(model.module.init, key, *concrete, **model.kwargs)
    return out, {"total_s": seconds}


def run_jit(model, key, concrete, mem):
    import jax

    del mem
    fn = jax.jit(lambda k, *xs: model.module.init(k, *xs, **model.kwargs))
    t0 = time.perf_counter()
    traced = fn.trace(key, *model.inputs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    out = _block(compiled(key, *concrete))
    t4 = time.perf_counter()
    return out, {
        "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "run_s": t4 - t3,
        "total_s": t4 - t0,
    }


def run_lazy_init(model, key, concrete, mem):
    del concrete, mem
    out, seconds = _timed(model.module.lazy_init, key, *model.inputs, **model.kwargs)
    return out, {"total_s": seconds}


def run_abstract(model, key, concrete, mem):
    import flaxlazy

    del concrete, mem
    out, seconds = _timed(flaxlazy.abstract_init, model.module, key, *model.inputs, **model.kwargs)
    return out, {"total_s": seconds}


def run_materialize(model, key, concrete, mem):
    import flaxlazy

    del concrete, mem
    out, seconds = _timed(flaxlazy.materialize, model.module, key, *model.inputs, **model.kwargs)
    return out, {"total_s": seconds}


def run_materialize_warm(model, key, concrete, mem):
    import jax

    import flaxlazy
    from flaxlazy._src.compiles import count_compiles

    del concrete
    if _is_nnx(model):
        args, kwargs = model.call(0)
        _block(_nnx_state(flaxlazy.materialize(model.ctor, *args, **kwargs)))
        args, kwargs = model.call(1)
        mem.reset()
        with count_compiles() as warm_compiles:
            out, seconds = _timed(
                lambda: _nnx_state(flaxlazy.materialize(model.ctor, *args, **kwargs))
            )
    else:
        out = _block(flaxlazy.materialize(model.module, key, *model.inputs, **model.kwargs))
        del out
        mem.reset()
        with count_compiles() as warm_compiles:
            out, seconds = _timed(
                flaxlazy.materialize, model.module, jax.random.key(1), *model.inputs,
                **model.kwargs,
            )
    peak = mem.peak()
    extra = {
        "total_s": seconds, "compiles": warm_compiles.count,
        "compile_seconds": warm_compiles.seconds, "peak_rss": peak,
    }
    # The reference: the same values' worth of draws in one already-compiled call.
    draw, n_groups, n_other = _draw_function(_plan(model, key))
    t = time.perf_counter()
    compiled = draw.lower(jax.random.key(2)).compile()
    extra["draw_compile_s"] = time.perf_counter() - t
    extra["draw_signatures"] = n_groups
    extra["draw_other_leaves"] = n_other
    del out
    _block(compiled(jax.random.key(3)))  # first call: one-time executable set-up
    gc.collect()
    drawn, extra["draw_s"] = _timed(compiled, jax.random.key(4))
    del drawn
    return None, extra


# NNX: the constructor draws the parameters. Each runner returns the module's state.


def _nnx_state(module):
    from flax import nnx

    return nnx.state(module)


def run_nnx_eager(model, key, concrete, mem):
    del key, concrete, mem
    out, seconds = _timed(lambda: _nnx_state(model.build()))
    return out, {"total_s": seconds}


def run_nnx_jit(model, key, concrete, mem):
    from flax import nnx

    del key, concrete, mem
    fn = nnx.jit(lambda: model.build())  # the Rngs is created inside, as users write it
    out, seconds = _timed(lambda: _nnx_state(fn()))
    return out, {"total_s": seconds}


def _run_nnx(fn_name):
    def run(model, key, concrete, mem):
        import flaxlazy

        del key, concrete, mem
        fn = getattr(flaxlazy, fn_name)
        args, kwargs = model.call()
        out, seconds = _timed(lambda: _nnx_state(fn(model.ctor, *args, **kwargs)))
        return out, {"total_s": seconds}

    return run


NNX_RUNNERS = {
    "eager": run_nnx_eager,
    "jit": run_nnx_jit,
    "abstract": _run_nnx("abstract_init"),
    "materialize_cold": _run_nnx("materialize"),
    "materialize_warm": run_materialize_warm,
    "materialize_cache1": _run_nnx("materialize"),
    "materialize_cache2": _run_nnx("materialize"),
}


RUNNERS = {
    "eager": run_eager,
    "jit": run_jit,
    "lazy_init": run_lazy_init,
    "abstract": run_abstract,
    "materialize_cold": run_materialize,
    "materialize_warm": run_materialize_warm,
    "materialize_cache1": run_materialize,
    "materialize_cache2": run_materialize,
}


def sizes(model, key, out) -> dict:
    """Parameter count and bytes, variable bytes and collections of ``out`` (the
    variables, or an NNX module's state; None: from an abstract init)."""
    import flaxlazy

    if _is_nnx(model):
        from flax import nnx

        if out is None:
            args, kwargs = model.call()
            out = nnx.state(flaxlazy.abstract_init(model.ctor, *args, **kwargs))
        params = nnx.filter_state(out, nnx.Param)
        kinds = {type(v).__name__ for _, v in nnx.to_flat_state(out)}
    else:
        if out is None:
            out = flaxlazy.abstract_init(model.module, key, *model.inputs, **model.kwargs)
        params, kinds = out.get("params", {}), set(out)
    return {
        "param_count": flaxlazy.num_params(params), "param_bytes": flaxlazy.nbytes(params),
        "variable_bytes": flaxlazy.nbytes(out), "collections": sorted(kinds),
    }


def measure(model_name: str, method: str, cache_dir: str | None) -> dict:
    t_start = time.perf_counter()
    import jax

    if method.startswith("materialize_cache"):
        if not cache_dir:
            raise ValueError(f"--method {method} needs --cache-dir.")
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import jax.numpy as jnp

    import flaxlazy  # noqa: F401 - imported before the clock starts
    from flaxlazy._src.compiles import count_compiles

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import zoo

    model = zoo.MODELS[model_name]()
    nnx_model = _is_nnx(model)
    runners = NNX_RUNNERS if nnx_model else RUNNERS
    if method not in runners:
        raise ValueError(f"--method {method} does not apply to the NNX model {model_name}; "
                         f"NNX methods: {', '.join(NNX_METHODS)}.")
    key = jax.random.key(0)
    concrete = ()
    if method in ("eager", "jit") and not nnx_model:
        concrete = tuple(jnp.zeros(s.shape, s.dtype) for s in model.inputs)
    _block(jnp.zeros(()) + 1)  # start the backend outside the measurement
    import_s = time.perf_counter() - t_start

    hits = []
    if method.startswith("materialize_cache"):
        from jax import monitoring

        def on_event(event: str, **kwargs) -> None:
            del kwargs
            if event == "/jax/compilation_cache/cache_hits":
                hits.append(event)

        monitoring.register_event_listener(on_event)

    mem = Memory()
    mem.reset()
    with count_compiles() as compiles:
        out, numbers = runners[method](model, key, concrete, mem)
    if method.startswith("materialize_cache"):
        numbers["cache_hits"] = len(hits)
    peak = numbers.pop("peak_rss", None)
    peak = mem.peak() if peak is None else peak
    result = {
        "model": model_name, "method": method, "status": "ok",
        "peak_rss": peak, "rss_exact": mem.exact,
        "compiles": compiles.count, "compile_seconds": compiles.seconds,
        "startup_s": import_s,
    }
    result.update(numbers)
    result.update(sizes(model, key, out))
    if method.startswith("materialize"):
        result["plan"] = _plan_counts(model, key)
    result["jax"] = jax.__version__
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        result = measure(args.model, args.method, args.cache_dir)
    except Exception as e:  # noqa: BLE001 - reported as a failed measurement
        traceback.print_exc()
        result = {
            "model": args.model, "method": args.method, "status": "error",
            "note": f"{type(e).__name__}: {str(e)[:500]}",
        }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
