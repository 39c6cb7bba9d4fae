"""Resident memory growth over many distinct models materialized in one process.

A long-lived process (a notebook, a sweep) that materializes model after model must not
grow without bound: flaxlazy's caches are bounded by count and bytes. This script
materializes N small models of distinct shapes (every one compiles new code), one after
another, and prints the resident set size (RSS) growth per model after a warm-up, for
``flaxlazy.materialize`` and for ``jax.jit(model.init)`` side by side, each in a fresh
process.

    python benchmarks/memory_growth.py            # 400 models each
    python benchmarks/memory_growth.py --models 120 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def model(i: int):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16 + i)(x))
            x = nn.LayerNorm()(nn.Dense(8 + i % 7)(x))
            return nn.Dense(3 + i % 5)(x)

    return Net()


def run(method: str, n: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    import flaxlazy

    key = jax.random.key(0)
    samples = []
    for i in range(n):
        width = 4 + i % 11
        m = model(i)
        if method == "materialize":
            out = flaxlazy.materialize(m, key, flaxlazy.spec((2, width)))
        else:
            out = jax.jit(m.init)(key, jnp.zeros((2, width)))
        jax.block_until_ready(out)
        del out
        samples.append(rss_mib())
    base = samples[warmup - 1]
    growth = (samples[-1] - base) / (n - warmup)
    return {"method": method, "models": n, "warmup": warmup, "rss_start_mib": samples[0],
            "rss_after_warmup_mib": base, "rss_end_mib": samples[-1],
            "growth_mib_per_model": growth}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=400, help="models per process")
    parser.add_argument("--warmup", type=int, default=40, help="models before the baseline")
    parser.add_argument("--method", choices=["materialize", "jit_init"], default=None,
                        help="run one method in this process (internal)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run(args.method, args.models, args.warmup)))
        return
    rows = []
    for method in ("jit_init", "materialize"):
        out = subprocess.run(
            [sys.executable, __file__, "--method", method, "--models", str(args.models),
             "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{os.cpu_count()} CPUs; {args.models} distinct models per fresh process")
    print(f"{'method':<12} {'RSS start':>10} {'after warm-up':>14} {'end':>8} {'MiB/model':>10}")
    for r in rows:
        print(f"{r['method']:<12} {r['rss_start_mib']:>10.0f} {r['rss_after_warmup_mib']:>14.0f} "
              f"{r['rss_end_mib']:>8.0f} {r['growth_mib_per_model']:>10.2f}")


if __name__ == "__main__":
    main()
