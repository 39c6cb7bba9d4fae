"""How long each script in ``examples/`` takes, as a user runs it and with ``--quick``.

Each run is a fresh ``python examples/NAME.py [--quick]`` process, timed from its start
to its exit (imports and JAX's start-up included: what a user waits for). The results
go to ``docs/examples.json``, which the README's examples table quotes (its
``tests/test_readme.py`` check keeps the two equal), with the machine, the versions and
the load average.

    python benchmarks/examples.py                       # every example, both modes
    python benchmarks/examples.py --only shard_gpt,train_lm --modes quick
    python benchmarks/examples.py --out /tmp/examples.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODES = {"default": [], "quick": ["--quick"]}


def scripts() -> list[str]:
    """The runnable examples, by name (every ``examples/*.py`` with a ``__main__``)."""
    return sorted(p.stem for p in EXAMPLES.glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text())


def time_run(name: str, mode: str, workdir: pathlib.Path, timeout: float) -> dict:
    """One fresh process of ``examples/{name}.py`` in ``mode``: its wall time and exit code.

    The example runs in ``workdir`` (it may write checkpoints there)."""
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *MODES[mode]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        code, tail = None, ["timeout"]
    return {"example": name, "mode": mode, "seconds": round(time.perf_counter() - start, 1),
            "returncode": code, "last_line": tail[0].split("\r")[-1] if tail else ""}


def duration(seconds: float) -> str:
    """A duration as the README writes it: ``8 s``, ``45 s``, ``4.5 min``."""
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def readme_cells(results: list[dict]) -> dict[str, str]:
    """The README examples table's time column, by example: ``45 s (--quick: 12 s)``."""
    by = {(r["example"], r["mode"]): r["seconds"] for r in results}
    cells = {}
    for name in dict.fromkeys(r["example"] for r in results):
        parts = [duration(by[name, "default"])] if (name, "default") in by else []
        if (name, "quick") in by:
            parts.append(f"`--quick`: {duration(by[name, 'quick'])}")
        cells[name] = parts[0] + (f" ({parts[1]})" if len(parts) == 2 else "")
    return cells


def meta() -> dict:
    import flax
    import jax

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{pathlib.Path(__file__).name}",
                                         *sys.argv[1:]]),
        "cpus": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": "seconds: one fresh process each, from its start to its exit",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated example names")
    parser.add_argument("--modes", default="default,quick", help="default, quick or both")
    parser.add_argument("--out", default=str(ROOT / "docs" / "examples.json"))
    parser.add_argument("--timeout", type=float, default=1200, help="per run, seconds")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else scripts()
    unknown = sorted(set(names) - set(scripts()))
    modes = args.modes.split(",")
    if unknown or not set(modes) <= set(MODES):
        parser.error(f"unknown example or mode: {unknown or modes}; examples: {scripts()}")
    import tempfile

    report = {"meta": meta(), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for mode in modes:
                row = time_run(name, mode, pathlib.Path(tmp), args.timeout)
                report["results"].append(row)
                print(f"{name:18s} {mode:8s} {row['seconds']:7.1f} s  exit {row['returncode']}"
                      f"  {row['last_line'][:60]}", flush=True)
    report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}; the README's column:")
    for name, cell in readme_cells(report["results"]).items():
        print(f"  examples/{name}.py: {cell}")
    return 0 if all(r["returncode"] == 0 for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
