"""The flaxlazy benchmark: every way to initialize a Flax model, side by side.

Linen models (``zoo.py``) and NNX constructors (``zoo_nnx.py``) run in the same way.

Usage::

    python benchmarks/run.py                 # the whole zoo (its duration: docs/benchmark.json)
    python benchmarks/run.py --quick         # a smoke subset (its duration: benchmarks/README.md)
    python benchmarks/run.py --models gpt12,gpt48 --methods jit,materialize_cold
    python benchmarks/run.py --only nnx      # the NNX models only

Each (model, method) runs in a fresh ``python benchmarks/measure.py`` process, so cold
numbers include everything a new process pays. Writes ``results.json`` and
``chart.png`` (with matplotlib: ``pip install -e ".[benchmarks]"``) to ``--out`` (default
``benchmarks/results``), prints a table and checks the targets of the fast-materializer
issue on the models they name (n/a where this run did not measure them). See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import METHODS  # noqa: E402
from measure import NNX_METHODS  # noqa: E402

LINEN_MODELS = (
    "mlp", "resnet50", "gpt2_small", "gpt2_medium", "gpt12", "gpt24", "gpt48",
    "gpt2_2l", "gpt_jit", "gpt_remat12", "gpt_remat48", "gpt_scan48", "many_leaves",
    "llama7b", "llama70b",
)
NNX_MODELS = ("nnx_gpt12", "nnx_gpt48", "nnx_gpt_scan48", "nnx_gpt2_medium", "nnx_llama7b")
MODELS = LINEN_MODELS + NNX_MODELS
FRAMEWORKS = {"linen": LINEN_MODELS, "nnx": NNX_MODELS}
DEPTHS = {"gpt12": 12, "gpt24": 24, "gpt48": 48}
NNX_DEPTHS = {"nnx_gpt12": 12, "nnx_gpt48": 48}
ALLOCATING = tuple(m for m in METHODS if m != "abstract")

# model -> methods to run in --quick mode: enough to check the targets on gpt48 (depth
# scaling, warm calls) and llama7b for real; the targets on jit(gpt48) (half a minute)
# and on gpt2_medium / llama70b need a full run and are reported as n/a.
QUICK = {
    "mlp": METHODS,
    "gpt12": ("jit", "materialize_cold"),
    "gpt48": ("materialize_cold", "materialize_warm"),
    "llama7b": ("abstract",),
    "nnx_gpt12": ("jit", "materialize_cold"),
    "nnx_gpt48": ("materialize_cold", "materialize_warm"),
    "nnx_llama7b": ("abstract",),
}
# Measurements left out of the full run because they cost minutes and show nothing new.
SLOW: dict[tuple[str, str], str] = {}

# Methods whose peak memory is a multiple of the parameter bytes: skip them when that
# multiple does not fit in this machine's memory.
MEMORY_FACTOR = 3.0


def _total_memory() -> int:
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _flaxlazy_source() -> dict:
    """Which flaxlazy the measurements import, and its git commit where it has one."""
    import flaxlazy

    where = os.path.dirname(os.path.dirname(os.path.abspath(flaxlazy.__file__)))
    info = {"path": where, "version": flaxlazy.__version__}
    try:
        git = ["git", "-C", where]
        info["commit"] = subprocess.run(
            git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        info["dirty"] = bool(subprocess.run(
            git + ["status", "--porcelain", "--", "flaxlazy"], capture_output=True, text=True,
            check=True,
        ).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _variable_bytes(model: str) -> int:
    """The bytes of ``model``'s variables, from an abstract init in this process."""
    import jax
    import measure
    import zoo

    return measure.sizes(zoo.MODELS[model](), jax.random.key(0), None)["variable_bytes"]


def methods_of(model: str) -> tuple[str, ...]:
    """The methods that apply to ``model``: NNX models have no ``lazy_init``."""
    return NNX_METHODS if model in NNX_MODELS else METHODS


def run_one(model: str, method: str, timeout: float, cache_dir: str | None = None) -> dict:
    """Runs one measurement in a fresh process and returns its result dict."""
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), "--model", model, "--method", method]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "model": model, "method": method, "status": "timeout",
            "note": f"no result within {timeout:.0f} s (--timeout)", "wall_s": timeout,
            "load_before": load,
        }
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            break
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result = {
            "model": model, "method": method, "status": "error",
            "note": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:],
        }
    result["wall_s"] = wall
    result["load_before"] = load
    return result


def skipped(model: str, method: str, note: str) -> dict:
    return {"model": model, "method": method, "status": "skipped", "note": note}


def plan_runs(args) -> list[tuple[str, tuple[str, ...]]]:
    models = args.models.split(",") if args.models else list(QUICK if args.quick else MODELS)
    methods = args.methods.split(",") if args.methods else None
    only = getattr(args, "only", "")
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}.")
    for name in methods or ():
        if name not in METHODS:
            raise SystemExit(f"--methods: unknown method {name!r}; known: {', '.join(METHODS)}.")
    if only:
        if only not in FRAMEWORKS:
            raise SystemExit(f"--only: unknown framework {only!r}; known: linen, nnx.")
        models = [name for name in models if name in FRAMEWORKS[only]]
    runs = []
    for name in models:
        chosen = QUICK.get(name, ()) if args.quick and not args.models else methods_of(name)
        if methods:
            chosen = tuple(m for m in methods_of(name) if m in methods)
        runs.append((name, tuple(chosen)))
    return runs


def run_all(args, save) -> list[dict]:
    results: list[dict] = []
    memory = _total_memory()

    def record(result: dict) -> None:
        results.append(result)
        print(_progress(result), flush=True)
        save(results)

    for model, methods in plan_runs(args):
        # The abstract init first: it is cheap and tells the variable bytes.
        if "abstract" in methods:
            record(run_one(model, "abstract", args.timeout))
            need = results[-1].get("variable_bytes")
        else:
            need = _variable_bytes(model)
        cache_dir = None
        for method in methods:
            if method == "abstract":
                continue
            if need is not None and need * MEMORY_FACTOR > memory:
                record(skipped(
                    model, method,
                    f"would not fit: {need / 1e9:.1f} GB of variables, about "
                    f"{MEMORY_FACTOR:g}x that at peak, {memory / 1e9:.1f} GB of RAM",
                ))
                continue
            if not args.models and (model, method) in SLOW:
                record(skipped(model, method, SLOW[(model, method)]))
                continue
            if method == "materialize_cache1":
                cache_dir = tempfile.mkdtemp(prefix="flaxlazy-jax-cache-")
            if method.startswith("materialize_cache") and cache_dir is None:
                record(skipped(model, method, "needs materialize_cache1 first"))
                continue
            record(run_one(model, method, args.timeout, cache_dir))
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return results


# --------------------------------------------------------------------------
# Reporting


def _mb(x) -> str:
    return "" if x is None else f"{x / 1e6:,.0f}"


def _s(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _progress(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['model']:<15} {r['method']:<19} {r['status']}: {r.get('note', '')}"
    return (
        f"  {r['model']:<15} {r['method']:<19} {r['total_s']:8.2f} s  "
        f"peak {_mb(r.get('peak_rss')):>7} MB  ({r.get('wall_s', 0):.0f} s wall, "
        f"load {r.get('load_before', 0):.1f})"
    )


def _find(results, model, method) -> dict | None:
    for r in results:
        if r["model"] == model and r["method"] == method and r["status"] == "ok":
            return r
    return None


def _note(r: dict, results: list[dict]) -> str:
    if r["status"] != "ok":
        return r.get("note", r["status"])
    notes = []
    plan = r.get("plan")
    if plan and set(plan) != {"flax"}:
        notes.append("plan " + ",".join(f"{k}={v}" for k, v in sorted(plan.items())))
    if r["method"] == "materialize_warm":
        notes.append(
            f"draw {r['draw_s']:.2f} s (x{r['total_s'] / r['draw_s']:.2f}), "
            f"{r['compiles']} recompiles"
        )
    if r["method"] == "materialize_cache2":
        first = _find(results, r["model"], "materialize_cache1")
        cold = _find(results, r["model"], "materialize_cold")
        parts = []
        if first:
            parts.append(f"x{first['total_s'] / r['total_s']:.1f} vs cache1")
        if cold:
            parts.append(f"x{cold['total_s'] / r['total_s']:.1f} vs cold")
        notes.append("speedup " + ", ".join(parts) + f"; {r.get('cache_hits', 0)} cache hits")
    if r["method"] == "eager":
        notes.append(f"{r['compiles']} op compiles")
    return "; ".join(notes)


def table(results: list[dict]) -> str:
    head = (
        f"{'model':<15} {'method':<19} {'status':<7} {'total s':>8} {'trace s':>8} "
        f"{'compile s':>9} {'#comp':>5} {'run s':>6} {'peak MB':>8} {'vars MB':>8} "
        f"{'peak/vars':>9}  note"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ok = r["status"] == "ok"
        trace = None
        compile_s = r.get("compile_s", r.get("compile_seconds")) if ok else None
        if ok and "trace_s" in r:
            trace = r["trace_s"] + r["lower_s"]
        ratio = ""
        if ok and r.get("variable_bytes") and r["method"] != "abstract":
            ratio = f"{r['peak_rss'] / r['variable_bytes']:.2f}"
        lines.append(
            f"{r['model']:<15} {r['method']:<19} {r['status']:<7} "
            f"{_s(r.get('total_s')) if ok else '':>8} {_s(trace):>8} {_s(compile_s):>9} "
            f"{r.get('compiles', '') if ok else '':>5} {_s(r.get('run_s')):>6} "
            f"{_mb(r.get('peak_rss')) if ok else '':>8} "
            f"{_mb(r.get('variable_bytes')) if ok else '':>8} {ratio:>9}  {_note(r, results)}"
        )
    return "\n".join(lines)


def _ratio_detail(a: dict, b: dict) -> str:
    return f"{a['total_s']:.2f} s vs {b['total_s']:.2f} s"


def _peak_vs_variables(mat: dict, results: list[dict]) -> tuple[float, str]:
    besides = []
    for method in ("eager", "jit", "lazy_init"):
        r = _find(results, mat["model"], method)
        if r:
            besides.append(f"{method} {r['peak_rss'] / r['variable_bytes']:.2f}x")
    detail = f"{mat['peak_rss'] / 1e6:,.0f} MB for {mat['variable_bytes'] / 1e6:,.0f} MB"
    if besides:
        detail += f"; beside it: {', '.join(besides)}"
    return mat["peak_rss"] / mat["variable_bytes"], detail


NEVER_SLOWER = 1.0  # issue 12: cold materialize at most this times cold jit, every model


def _never_slower(results: list[dict]) -> tuple[float | None, str]:
    """The worst materialize-cold / jit-cold ratio over every model measured by both.

    No verdict (None) when no model has both, or when every ratio is within the limit but
    a model's jit or materialize_cold measurement broke (error, timeout): "every model"
    cannot pass on the models that happened to finish.
    """
    ratios, broken = [], []
    for model in dict.fromkeys(r["model"] for r in results):
        cold, jit = _find(results, model, "materialize_cold"), _find(results, model, "jit")
        if cold and jit:
            ratios.append((cold["total_s"] / jit["total_s"], model))
        elif any(r["model"] == model and r["method"] in ("jit", "materialize_cold")
                 and r["status"] not in ("ok", "skipped") for r in results):
            broken.append(model)
    if not ratios:
        return None, "no model has both jit and materialize_cold in this run"
    worst, model = max(ratios)
    slower = [f"{m} {x:.2f}x" for x, m in ratios if x > NEVER_SLOWER]
    cold, jit = _find(results, model, "materialize_cold"), _find(results, model, "jit")
    detail = f"worst {model}: {_ratio_detail(cold, jit)}; slower on {len(slower)} of {len(ratios)}"
    if slower:
        detail += f": {', '.join(slower)}"
    if broken:
        detail += f"; jit or materialize_cold broke on {', '.join(broken)}"
        if worst <= NEVER_SLOWER:
            return None, detail
    return worst, detail


def _cold_vs_jit(cold: dict, jit: dict, _) -> tuple[float, str]:
    return cold["total_s"] / jit["total_s"], _ratio_detail(cold, jit)


def _peak_vs_jit(cold: dict, jit: dict, _) -> tuple[float, str]:
    return cold["peak_rss"] / jit["peak_rss"], (
        f"{cold['peak_rss'] / 1e6:,.0f} MB vs {jit['peak_rss'] / 1e6:,.0f} MB"
    )


def _warm_vs_draw(warm: dict, _) -> tuple[float, str]:
    return warm["total_s"] / warm["draw_s"], f"{warm['total_s']:.2f} s vs {warm['draw_s']:.2f} s"


class Target(NamedTuple):
    """One benchmark target.

    Attributes:
      name: what it says, as printed.
      limit: the bound on the value.
      strict: ``value < limit`` (True) or ``value <= limit``.
      needs: the (model, method) measurements it is defined on; the target is checked
        only when this run measured all of them. Empty: ``measure`` judges the whole run.
      measure: ``(*those results, all results) -> (value, detail)``; a value of None
        means no verdict.
      goal: "" for the fast-materializer issue's targets (met or to keep); for the next
        goals, the issue that set them (they may fail until that issue is done).
    """

    name: str
    limit: float
    strict: bool
    needs: tuple[tuple[str, str], ...]
    measure: Callable[..., tuple[float | None, str]]
    goal: str = ""


ISSUE_12 = "issue 12"

# The targets. A target is checked only on the models it names: a run that did not
# measure them all (--quick, --models) reports it as n/a rather than judging a stand-in
# against a limit set for another model (a 0.25 ratio set for 48 layers says nothing
# about 12).
TARGETS = (
    Target("materialize cold(gpt48) <= 0.25 x jit cold(gpt48)", 0.25, False,
           (("gpt48", "materialize_cold"), ("gpt48", "jit")), _cold_vs_jit),
    Target("materialize cold(gpt48) <= 1.5 x materialize cold(gpt12)", 1.5, False,
           (("gpt48", "materialize_cold"), ("gpt12", "materialize_cold")),
           lambda deep, small, _: (deep["total_s"] / small["total_s"],
                                   _ratio_detail(deep, small))),
    Target("materialize warm(gpt48) recompiles nothing", 0, False,
           (("gpt48", "materialize_warm"),),
           lambda warm, _: (warm["compiles"], f"{warm['compiles']} compilations")),
    Target("materialize warm(gpt48) <= 1.3 x one-call draw", 1.3, False,
           (("gpt48", "materialize_warm"),), _warm_vs_draw),
    Target("peak RSS materialize(gpt2_medium, 355M) <= 1.15 x variable bytes", 1.15, False,
           (("gpt2_medium", "materialize_cold"),), _peak_vs_variables),
    Target("abstract_init(llama7b) < 2 s", 2.0, True, (("llama7b", "abstract"),),
           lambda r, _: (r["total_s"], f"{r['total_s']:.2f} s")),
    Target("abstract_init(llama7b) < 100 MB RSS", 100.0, True, (("llama7b", "abstract"),),
           lambda r, _: (r["peak_rss"] / 1e6, f"{r['peak_rss'] / 1e6:.1f} MB")),
    Target("abstract_init(llama70b) < 5 s", 5.0, True, (("llama70b", "abstract"),),
           lambda r, _: (r["total_s"], f"{r['total_s']:.2f} s")),
    # The same targets for NNX constructors: jit is nnx.jit(lambda: Model(..., rngs=...)).
    Target("materialize cold(nnx_gpt48) <= 0.25 x nnx.jit cold(nnx_gpt48)", 0.25, False,
           (("nnx_gpt48", "materialize_cold"), ("nnx_gpt48", "jit")), _cold_vs_jit),
    Target("materialize cold(nnx_gpt48) <= 1.5 x materialize cold(nnx_gpt12)", 1.5, False,
           (("nnx_gpt48", "materialize_cold"), ("nnx_gpt12", "materialize_cold")),
           lambda deep, small, _: (deep["total_s"] / small["total_s"],
                                   _ratio_detail(deep, small))),
    Target("materialize warm(nnx_gpt48) recompiles nothing", 0, False,
           (("nnx_gpt48", "materialize_warm"),),
           lambda warm, _: (warm["compiles"], f"{warm['compiles']} compilations")),
    Target("materialize warm(nnx_gpt48) <= 1.3 x one-call draw", 1.3, False,
           (("nnx_gpt48", "materialize_warm"),), _warm_vs_draw),
    Target("peak RSS materialize(nnx_gpt2_medium, 355M) <= 1.15 x variable bytes", 1.15,
           False, (("nnx_gpt2_medium", "materialize_cold"),), _peak_vs_variables),
    Target("abstract_init(nnx_llama7b) < 2 s", 2.0, True, (("nnx_llama7b", "abstract"),),
           lambda r, _: (r["total_s"], f"{r['total_s']:.2f} s")),
    # Issue 12: lifted transforms on the fast path, never slower than jit(init).
    Target("materialize cold <= 1.0 x jit cold, every model measured", NEVER_SLOWER, False,
           (), _never_slower, ISSUE_12),
    Target("materialize cold(gpt_remat48) <= 0.35 x jit cold(gpt_remat48)", 0.35, False,
           (("gpt_remat48", "materialize_cold"), ("gpt_remat48", "jit")), _cold_vs_jit,
           ISSUE_12),
    Target("materialize cold(gpt_scan48) <= 1.0 x jit cold(gpt_scan48)", 1.0, False,
           (("gpt_scan48", "materialize_cold"), ("gpt_scan48", "jit")), _cold_vs_jit,
           ISSUE_12),
    Target("peak RSS materialize(gpt_scan48) <= 1.0 x jit's", 1.0, False,
           (("gpt_scan48", "materialize_cold"), ("gpt_scan48", "jit")), _peak_vs_jit,
           ISSUE_12),
    Target("materialize cold(resnet50) <= 0.5 x jit cold(resnet50)", 0.5, False,
           (("resnet50", "materialize_cold"), ("resnet50", "jit")), _cold_vs_jit, ISSUE_12),
    Target("materialize warm(gpt2_medium) <= 1.2 x one-call draw", 1.2, False,
           (("gpt2_medium", "materialize_warm"),), _warm_vs_draw, ISSUE_12),
)


def targets(results: list[dict]) -> list[dict]:
    """Each target with its value and verdict: ``pass`` is None where it does not apply.

    A target applies only when this run measured every (model, method) it is defined on.
    """
    out = []
    for target in TARGETS:
        name, limit, strict, needs, measure, goal = target
        row = {"target": name, "value": None, "limit": limit, "pass": None, "goal": goal}
        found = [_find(results, model, method) for model, method in needs]
        missing = [(model, method) for (model, method), r in zip(needs, found, strict=True)
                   if r is None]
        if missing:
            tried = {(r["model"], r["method"]): r["status"] for r in results}
            why = "; ".join(
                f"{method}({model}) " + (f"ended in {tried[model, method]}"
                                         if (model, method) in tried else "was not measured")
                for model, method in missing
            )
            out.append({**row, "detail": f"{why} in this run"})
            continue
        value, detail = measure(*found, results)
        if value is not None:
            row["value"] = value
            row["pass"] = bool(value < limit if strict else value <= limit)
        out.append({**row, "detail": detail})
    return out


def targets_text(rows: list[dict]) -> str:
    lines = []
    goal = ""
    for t in rows:
        if t.get("goal", "") != goal:  # the next goals come last, under their own heading
            goal = t["goal"]
            lines.append(f"Next goals ({goal}, in progress; where one fails, its value is the "
                         "baseline to beat):")
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        value = "" if t["value"] is None else f"{t['value']:.3g} (limit {t['limit']:g})"
        lines.append(f"{verdict}  {t['target']:<70} {value:<22} {t['detail']}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> tuple[str, int]:
    """One line saying which targets this run judged and how they fared, and the exit
    status: 1 when a target it judged failed, else 0 (n/a targets are not judged)."""
    judged = [t for t in rows if t["pass"] is not None]
    failed = [t["target"] for t in judged if not t["pass"]]
    line = (f"judged {len(judged)} of {len(rows)} targets: {len(judged) - len(failed)} "
            f"passed, {len(failed)} failed, {len(rows) - len(judged)} not judged (n/a)")
    if failed:
        line += "; failed: " + "; ".join(failed)
    return line, int(bool(failed))


def cache_text(results: list[dict]) -> str:
    lines = []
    for model in MODELS:
        first = _find(results, model, "materialize_cache1")
        second = _find(results, model, "materialize_cache2")
        if first and second:
            lines.append(
                f"persistent compilation cache, {model}: first process {first['total_s']:.2f} s "
                f"({first['compiles']} compiles), second process {second['total_s']:.2f} s "
                f"({second.get('cache_hits', 0)} of {second['compiles']} loaded from the cache): "
                f"x{first['total_s'] / second['total_s']:.1f}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Chart

NO_CHART = '; no chart: it needs matplotlib, `pip install -e ".[benchmarks]"`'


def chart(results: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {
        "jit": ("tab:red", "o", "jax.jit(module.init), cold"),
        "eager": ("tab:orange", "s", "module.init (eager)"),
        "lazy_init": ("tab:purple", "^", "Module.lazy_init"),
        "materialize_cold": ("tab:blue", "D", "flaxlazy.materialize, cold"),
        "materialize_warm": ("tab:cyan", "v", "flaxlazy.materialize, warm"),
        "materialize_cache2": ("tab:green", "P", "materialize, persistent cache"),
    }
    nnx_labels = {"jit": "nnx.jit(constructor), cold", "eager": "NNX constructor (eager)"}
    for depths, line, framework in ((DEPTHS, "-", "Linen"), (NNX_DEPTHS, "--", "NNX")):
        for method, (color, marker, label) in styles.items():
            pts = [(d, _find(results, m, method)) for m, d in depths.items()]
            pts = [(d, r["total_s"]) for d, r in pts if r]
            if framework == "NNX":
                label = nnx_labels.get(method, label) + " (NNX)"
            if pts:
                left.plot(*zip(*pts, strict=True), line, marker=marker, color=color,
                          label=label)
    left.set(xlabel="layers (narrow GPT, d_model 256; dashed: NNX)",
             ylabel="init time, s (fresh process)",
             title="Init time vs depth", xticks=list(DEPTHS.values()))
    left.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=8)

    # Warm peaks are left out: memory the cold call freed is still resident, so a warm
    # call's peak above that baseline understates what it allocates.
    del styles["materialize_warm"]
    if any(r["model"] in NNX_MODELS for r in results):  # one marker per method, both APIs
        styles["jit"] = (*styles["jit"][:2], "jax.jit(module.init) / nnx.jit(constructor)")
        styles["eager"] = (*styles["eager"][:2], "module.init / NNX constructor (eager)")
    styles["abstract"] = ("tab:gray", "x", "flaxlazy.abstract_init")
    styles["materialize_cache1"] = ("tab:olive", "*", "materialize, cache writer")
    xs = []
    for method, (color, marker, label) in styles.items():
        pts = [r for r in results if r["method"] == method and r["status"] == "ok"]
        pts = [(r["variable_bytes"] / 1e6, max(r["peak_rss"], 1e5) / 1e6) for r in pts]
        if pts:
            right.scatter(*zip(*pts, strict=True), color=color, marker=marker, label=label,
                          alpha=0.8)
            xs += [p[0] for p in pts]
    if xs:
        lo, hi = min(xs), max(xs)
        right.plot([lo, hi], [lo, hi], "k--", lw=1, label="peak = variables")
        right.plot([lo, hi], [1.15 * lo, 1.15 * hi], "k:", lw=1, label="1.15 x variables")
    # One label per variable size: models of one size (gpt12, gpt_jit, gpt_remat12) share it.
    labels: dict[int, tuple[list[str], int]] = {}
    for model in MODELS:
        pts = [r for r in results if r["model"] == model and r["status"] == "ok"
               and r["method"] in styles]
        if pts:
            top = max(pts, key=lambda r: r["peak_rss"])
            names, peak = labels.get(top["variable_bytes"], ([], 0))
            labels[top["variable_bytes"]] = (names + [model], max(peak, top["peak_rss"]))
    for size, (names, peak) in labels.items():
        right.annotate(", ".join(names), (size / 1e6, max(peak, 1e5) / 1e6),
                       fontsize=7, rotation=30, xytext=(2, 4), textcoords="offset points")
    right.set(xscale="log", yscale="log", xlabel="variable bytes, MB",
              ylabel="peak RSS above baseline, MB", title="Peak memory vs model size")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="flaxlazy init benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke subset of the models and methods")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    parser.add_argument("--models", default="", help="comma-separated subset of models")
    parser.add_argument("--methods", default="", help="comma-separated subset of methods")
    parser.add_argument("--only", default="", choices=("", *FRAMEWORKS),
                        help="only the models of one framework: linen or nnx")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per measurement (default 600, 120 with --quick)")
    parser.add_argument("--replot", action="store_true",
                        help="only re-print and re-plot the results.json in --out")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 120.0 if args.quick else 600.0
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    chart_path = os.path.join(args.out, "chart.png")

    import flax
    import jax

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": args.quick, "python": platform.python_version(),
        "jax": jax.__version__, "flax": flax.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "memory_bytes": _total_memory(),
        "load_at_start": os.getloadavg(), "flaxlazy": _flaxlazy_source(),
    }

    def save(results, rows=None):
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": results, "targets": rows}, f, indent=1)

    if args.replot:
        with open(json_path) as f:
            saved = json.load(f)
        meta, results = saved["meta"], saved["results"]
    else:
        only = f", {args.only} only" if args.only else ""
        print(f"flaxlazy benchmark ({'quick' if args.quick else 'full'}{only}), "
              f"jax {jax.__version__}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        t = time.perf_counter()
        results = run_all(args, save)
        meta["total_s"] = time.perf_counter() - t
        meta["load_at_end"] = os.getloadavg()
    rows = targets(results)
    save(results, rows)
    drew = chart(results, chart_path)

    print()
    print(table(results))
    print()
    print("Targets (benchmarks/README.md, 'Targets checked'):")
    print(targets_text(rows))
    if any(t["pass"] is None for t in rows):
        print("n/a: a target is checked only on the models it names; a full run (no --quick, "
              "no --models) measures them all.")
    summary, status = verdict(rows)
    print(summary)
    extra = cache_text(results)
    if extra:
        print()
        print(extra)
    print()
    print(f"total {meta.get('total_s', 0):.0f} s, load average at start/end "
          f"{meta['load_at_start'][0]:.1f}/{meta.get('load_at_end', [0])[0]:.1f} "
          f"on {meta['cpus']} CPUs; results: {json_path}"
          + (f"; chart: {chart_path}" if drew else NO_CHART))
    return status


if __name__ == "__main__":
    sys.exit(main())
