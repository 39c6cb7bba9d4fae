"""A Llama-2-7B-sized model, bfloat16, on this machine: peak memory per parameter byte.

Issue 12's headline: a Llama-2-7B-sized Linen model (32 layers, d 4096, MLP 11008, vocab
32000; 6.74B parameters, 13.5 GB in bfloat16) materializes on a 24 GB, 2-core machine
with a peak RSS of at most 1.1x its parameter bytes. ``jax.jit(init)`` and eager
``init`` are measured side by side on smaller configs of the same family (0.55B, 1.1B,
2.1B), each in a fresh process; from their peak RSS per parameter byte, the 7B figure is
projected, and a run whose projection does not fit the machine is never started (the
OOM killer takes whatever it picks). Every child process also carries a watchdog that
exits it before its RSS reaches 85% of the machine's memory.

    python benchmarks/big_model.py                   # all configs (about 10 minutes)
    python benchmarks/big_model.py --configs 0.55b   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# name: (d_model, layers, heads, mlp_dim); vocab 32000, bfloat16 parameters.
CONFIGS = {
    "0.55b": (1536, 16, 12, 4096),
    "1.1b": (2048, 20, 16, 5504),
    "2.1b": (2560, 24, 20, 6912),
    "7b": (4096, 32, 32, 11008),
}
METHODS = ("materialize", "jit", "eager")
LIMIT = 0.85  # of the machine's memory: a child's watchdog exits it above this
FIT = 0.80  # a run starts only if its projected peak stays below this share of memory
WATCHDOG_EXIT = 3


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _watchdog(limit: int) -> None:
    import measure

    def watch():
        while True:
            if measure.Memory.rss() > limit:
                os.write(2, b"watchdog: RSS above the limit, exiting\n")
                os._exit(WATCHDOG_EXIT)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def child(config: str, method: str) -> dict:
    """One measurement in this (fresh) process."""
    _watchdog(int(LIMIT * _mem_total()))
    import jax
    import jax.numpy as jnp
    import measure
    import zoo

    import flaxlazy

    d, layers, heads, mlp = CONFIGS[config]
    module = zoo.Llama(32000, d, layers, heads, heads, mlp, jnp.bfloat16)
    key = jax.random.key(0)
    spec = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    abstract = flaxlazy.abstract_init(module, key, spec)
    param_bytes = flaxlazy.nbytes(abstract)
    mem = measure.Memory()
    mem.reset()
    start = time.perf_counter()
    if method == "materialize":
        out = flaxlazy.materialize(module, key, spec)
    elif method == "jit":
        out = jax.jit(module.init)(key, jnp.zeros(spec.shape, spec.dtype))
    else:
        out = module.init(key, jnp.zeros(spec.shape, spec.dtype))
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    peak = mem.peak()
    return {"config": config, "method": method, "seconds": seconds, "peak_rss": peak,
            "param_bytes": param_bytes, "params": flaxlazy.num_params(abstract),
            "ratio": peak / param_bytes, "rss_exact": mem.exact}


def _run_child(config: str, method: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", config, method],
        capture_output=True, text=True, timeout=3600,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    why = "watchdog: RSS limit" if proc.returncode == WATCHDOG_EXIT else proc.stderr[-400:]
    return {"config": config, "method": method, "status": f"failed: {why}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "big_model.json"))
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0
    total = _mem_total()
    results, worst = [], {}
    for config in args.configs.split(","):
        for method in METHODS:
            estimate = worst.get(method)  # peak per parameter byte, largest so far
            if estimate is not None:
                param_bytes = _param_bytes(config)
                projected = estimate * param_bytes
                if projected > FIT * total:
                    results.append({
                        "config": config, "method": method, "param_bytes": param_bytes,
                        "status": f"skipped: projected peak {projected / 1e9:.1f} GB "
                                  f"({estimate:.2f}x of {param_bytes / 1e9:.1f} GB) does not "
                                  f"fit {FIT:.0%} of {total / 1e9:.1f} GB",
                        "projected_peak": projected,
                    })
                    print(f"{config:>6} {method:12} {results[-1]['status']}", flush=True)
                    continue
            elif config == "7b":  # never the first measurement of a method
                results.append({"config": config, "method": method,
                                "status": "skipped: no smaller config measured first"})
                continue
            r = _run_child(config, method)
            results.append(r)
            if "ratio" in r:
                worst[method] = max(worst.get(method, 0.0), r["ratio"])
                print(f"{config:>6} {method:12} {r['params'] / 1e9:5.2f}B params "
                      f"{r['param_bytes'] / 1e9:5.1f} GB  {r['seconds']:7.1f} s  peak "
                      f"{r['peak_rss'] / 1e9:5.1f} GB = {r['ratio']:.2f}x", flush=True)
            else:
                print(f"{config:>6} {method:12} {r['status']}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine_memory": total, "cpus": os.cpu_count(), "results": results}, f,
                  indent=1)
    print(f"results: {args.out}")
    return 0


def _param_bytes(config: str) -> int:
    import jax
    import jax.numpy as jnp
    import zoo

    import flaxlazy

    d, layers, heads, mlp = CONFIGS[config]
    module = zoo.Llama(32000, d, layers, heads, heads, mlp, jnp.bfloat16)
    return flaxlazy.nbytes(flaxlazy.abstract_init(
        module, jax.random.key(0), jax.ShapeDtypeStruct((1, 128), jnp.int32)))


if __name__ == "__main__":
    sys.exit(main())
