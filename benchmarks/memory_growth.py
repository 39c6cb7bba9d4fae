"""Resident memory growth over many distinct models materialized in one process.

A long-lived process (a notebook, a sweep, a server) that materializes model after model
must not grow faster than with the framework's own jit-compiled init: flaxlazy's caches
are bounded by count and bytes. This script builds N small models of distinct shapes
(every one compiles new code), one after another, and prints the resident set size
(RSS) growth per model after a warm-up, for ``flaxlazy.materialize`` against
``jax.jit(model.init)`` (Linen) and against ``nnx.jit`` of the constructor (NNX), each
in a fresh process, and the ratio flaxlazy / framework (target: at most 1.2).

The growth is measured after a warm-up of 200 models: flaxlazy's caches are bounded (256
compiled functions or 256 MiB estimated, 256 flat-draw transforms) and fill during about
the first 200 distinct models of this sweep; after that, what a long-lived process keeps
per model is the growth measured. What the full caches hold is printed too: the RSS after
the warm-up above the framework's own. The script exits 1 when a ratio fails the target.

    python benchmarks/memory_growth.py                  # 400 models each, both frameworks
    python benchmarks/memory_growth.py --models 200 --warmup 100 --only nnx --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TARGET = 1.2  # growth per model of materialize / of the framework's own jit


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def widths(i: int) -> tuple[int, int, int, int]:
    """Model ``i``'s input width and its three layers' widths: every model is new code."""
    return 4 + i % 11, 16 + i, 8 + i % 7, 3 + i % 5


def linen_model(i: int):
    import flax.linen as nn

    _, a, b, c = widths(i)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(a)(x))
            x = nn.LayerNorm()(nn.Dense(b)(x))
            return nn.Dense(c)(x)

    return Net()


def nnx_model():
    """The NNX twin of ``linen_model``: a constructor ``Net(i, rngs=...)``."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, i: int, *, rngs: nnx.Rngs):
            width, a, b, c = widths(i)
            self.first = nnx.Linear(width, a, rngs=rngs)
            self.second = nnx.Linear(a, b, rngs=rngs)
            self.norm = nnx.LayerNorm(b, rngs=rngs)
            self.head = nnx.Linear(b, c, rngs=rngs)

    return Net


def make(framework: str, method: str, i: int, key, net):
    """Model ``i``'s variables (Linen) or module (NNX), made by ``method``."""
    import jax
    import jax.numpy as jnp

    import flaxlazy

    if framework == "linen":
        width = widths(i)[0]
        if method == "materialize":
            return flaxlazy.materialize(linen_model(i), key, flaxlazy.spec((2, width)))
        return jax.jit(linen_model(i).init)(key, jnp.zeros((2, width)))
    from flax import nnx

    if method == "materialize":
        return nnx.state(flaxlazy.materialize(net, i, rngs=nnx.Rngs(0)))
    return nnx.state(nnx.jit(lambda: net(i, rngs=nnx.Rngs(0)))())


def run(framework: str, method: str, n: int, warmup: int) -> dict:
    import jax

    key = jax.random.key(0)
    net = nnx_model() if framework == "nnx" else None
    samples = []
    for i in range(n):
        out = make(framework, method, i, key, net)
        jax.block_until_ready(out)
        del out
        samples.append(rss_mib())
    base = samples[warmup - 1]
    growth = (samples[-1] - base) / (n - warmup)
    return {"framework": framework, "method": method, "models": n, "warmup": warmup,
            "rss_start_mib": samples[0], "rss_after_warmup_mib": base,
            "rss_end_mib": samples[-1], "growth_mib_per_model": growth}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=400, help="models per process")
    parser.add_argument("--warmup", type=int, default=200,
                        help="models before the baseline (the caches fill meanwhile)")
    parser.add_argument("--only", choices=["linen", "nnx"], default=None,
                        help="one framework only")
    parser.add_argument("--method", choices=["materialize", "jit"], default=None,
                        help="run one method in this process (internal)")
    parser.add_argument("--framework", choices=["linen", "nnx"], default="linen",
                        help="with --method: the framework of this process (internal)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run(args.framework, args.method, args.models, args.warmup)))
        return 0
    rows = []
    for framework in [args.only] if args.only else ["linen", "nnx"]:
        for method in ("jit", "materialize"):
            out = subprocess.run(
                [sys.executable, __file__, "--framework", framework, "--method", method,
                 "--models", str(args.models), "--warmup", str(args.warmup)],
                check=True, capture_output=True, text=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios, held = {}, {}
    for framework in dict.fromkeys(r["framework"] for r in rows):
        by = {r["method"]: r for r in rows if r["framework"] == framework}
        ratios[framework] = by["materialize"]["growth_mib_per_model"] / max(
            by["jit"]["growth_mib_per_model"], 1e-9)
        held[framework] = (by["materialize"]["rss_after_warmup_mib"]
                           - by["jit"]["rss_after_warmup_mib"])
    failed = any(ratio > TARGET for ratio in ratios.values())
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "held_by_caches_mib": held,
                          "target": TARGET}, indent=2))
        return int(failed)
    print(f"{os.cpu_count()} CPUs; {args.models} distinct models per fresh process, "
          f"growth after {args.warmup}")
    print(f"{'framework':<10} {'method':<12} {'RSS start':>10} {'after warm-up':>14} "
          f"{'end':>8} {'MiB/model':>10}")
    for r in rows:
        print(f"{r['framework']:<10} {r['method']:<12} {r['rss_start_mib']:>10.0f} "
              f"{r['rss_after_warmup_mib']:>14.0f} {r['rss_end_mib']:>8.0f} "
              f"{r['growth_mib_per_model']:>10.2f}")
    for framework, ratio in ratios.items():
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(f"{framework}: materialize / jit growth = {ratio:.2f}x "
              f"(target <= {TARGET}x) {verdict}; after the warm-up materialize's process "
              f"holds {held[framework]:+.0f} MiB against jit's (its full caches)")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
