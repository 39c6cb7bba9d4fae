"""The inspect report as text (aligned tables, human units, color on a TTY) and as JSON.

The leaf tables are ``summary``'s own (``summary.table``): one implementation for both.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

from flaxlazy._src import summary

_COLORS = {"ok": "32", "bad": "31", "warn": "33", "head": "1"}
_DEFAULT_TOP, _LIST_ALL_UP_TO = 10, 40
MAX_PROBLEMS = 5  # distinct problems listed in the text; JSON has all
_MAX_LEAVES_NAMED = 3  # of the other leaves a grouped problem also stops
# A leaf named in a problem's message: its path's repr, then maybe its type, as
# sharding_checks.BAD_SPEC writes them: 'params/Dense_0/kernel' (float32[4,3]).
_LEAF_IN_MESSAGE = re.compile(r"""('[^'\\]*'|"[^"\\]*")( \(\w+\[[0-9,]*\]\))?""")
MARKS = {
    summary.DEFAULT_MARK: "replicated by default: no partition rule or Flax annotation covers it",
    "!": "materialize would stop on it (see the problems); counted as replicated",
}


def _paint(text: str, kind: str, color: bool) -> str:
    return f"\033[{_COLORS[kind]}m{text}\033[0m" if color else text


def _spec_json(spec: Any) -> Any:
    if spec is None:
        return None
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _shown(report: Any) -> tuple[list, str]:
    """The leaves the text lists, and the table's title."""
    n = len(report.leaves)
    top = report.top if report.top is not None else (
        n if n <= _LIST_ALL_UP_TO else _DEFAULT_TOP)
    if top >= n:
        return sorted(report.leaves, key=lambda leaf: summary._natural(leaf.path)), f"leaves ({n})"
    where = " on each device" if report.mesh else ""
    return report.largest(top), f"largest leaves{where} ({top} of {n}; --top N for more)"


def report_text(report: Any, *, color: bool = False) -> str:
    """The aligned text of a ``flaxlazy.inspect`` report (``str(report)``)."""
    sharded = report.mesh is not None
    head = report.model + (f" ({report.target})" if report.target else "")
    facts = [("inputs", ", ".join(report.inputs) or "none")]
    if sharded:
        axes = ", ".join(f"{a}={s}" for a, s in report.mesh)
        facts.append(("mesh", f"{axes} ({report.devices} devices)"))
    if report.optimizer:
        facts.append(("optimizer", report.optimizer))
    if report.dtype:
        facts.append(("dtype", f"floating parameters cast to {report.dtype} (what-if)"))
    lines = [_paint(head, "head", color)] + _aligned(facts, indent="  ") + [""]

    shown, title = _shown(report)
    rows = [summary.Row(leaf.path, leaf.shape, leaf.dtype, leaf.count, leaf.nbytes, leaf.per_device,
                spec=(summary.spec_text(leaf.spec) + (" " + leaf.mark if leaf.mark else ""))
                if leaf.spec is not None else "", init=leaf.init) for leaf in shown]
    totals = [(k, c, b, d) for k, (_, c, b, d) in report.collections().items()]
    lines += [title] + summary.table(rows, totals, sharded=sharded, init=True)
    marks = {leaf.mark for leaf in report.leaves} - {""}
    lines += [f"{mark} {MARKS[mark]}" for mark in sorted(marks)]

    if report.depth:
        modules = report.modules(report.depth)
        fmt = summary.format_bytes
        body = [[m, f"{c:,}", fmt(b), fmt(o), fmt(d)] for m, (c, b, o, d) in modules.items()]
        header = ["module", "params", "bytes", "opt state", "per device"]
        lines += ["", f"per module (depth {report.depth})",
                  summary.render(header, body, [False, True, True, True, True])]

    load = summary.format_bytes(report.per_device) + (
        f" on each of {report.devices} devices" if report.devices > 1 else " on one device")
    load += f" (all leaves: {summary.format_bytes(report.total_bytes)}"
    load += (f"; optimizer state: {summary.format_bytes(report.optimizer_bytes)})"
             if report.optimizer else ")")
    facts = [("per-device load", load)]
    if report.fits is not None:
        memory = summary.format_bytes(report.device_memory)
        if report.fits:
            verdict = _paint("fits", "ok", color)
            free = summary.format_bytes(report.device_memory - report.per_device)
            facts.append(("device memory", f"{memory}: {verdict}, {free} free"))
        else:
            short = summary.format_bytes(report.per_device - report.device_memory)
            verdict = _paint(f"does not fit, short by {short}", "bad", color)
            facts.append(("device memory", f"{memory}: {verdict}"))
            big = ", ".join(f"{leaf.path} {summary.format_bytes(leaf.per_device)}"
                            for leaf in report.largest(3))
            facts.append(("largest there", big))
    kinds = {"initializers": "initializers",
             "traced_run": "traced constructor run" if report.framework == "nnx"
             else "traced module.init run",
             "rngs_update": "nnx.Rngs update", "optimizer_init": "tx.init"}
    parts = [f"{n} {kinds.get(k, k)}" for k, n in report.compiles.items() if n]
    facts.append(("compiles", f"materialize will compile {report.compiles_total}"
                  + (f" ({', '.join(parts)})" if parts else "")))
    problems = report.problems
    facts.append(("problems", _paint(f"{len(problems)} (materialize would stop; see below)",
                                     "bad", color) if problems else "none"))
    facts.append(("inspected in", f"{report.seconds:.2f} s, nothing allocated on any device"))
    lines += [""] + _aligned(facts)
    groups = group_problems(problems, [leaf.path for leaf in report.leaves])
    for group in groups[:MAX_PROBLEMS]:
        lines.append(_paint("problem: ", "bad", color) + problem_text(group))
    if len(groups) > MAX_PROBLEMS:
        lines.append(f"... and {len(groups) - MAX_PROBLEMS} more problems (--json lists all)")
    return "\n".join(lines)


class ProblemGroup(NamedTuple):
    """Problems that differ only in the leaf they name (a rule's spec that fails on every
    leaf it matches): the first, and the paths of the others (None where a problem names
    no leaf, repeated word for word)."""

    problem: Any
    others: tuple[str | None, ...]


def group_problems(problems: Iterable[Any], paths: Iterable[str]) -> list[ProblemGroup]:
    """``problems`` (``report_types.Problem``), one group per distinct problem, in order.

    Two problems are the same where their kind and message are, once the first leaf path
    of ``paths`` each names (with the type after it) is left out.

    Examples:
      >>> from flaxlazy._src.report_types import Problem
      >>> found = [Problem("bad_spec", f"rule gives {p!r} (f32[4]) the spec P('x'), but ...")
      ...          for p in ("a/w", "b/w", "c/w")] + [Problem("unused_rule", "no match")]
      >>> [(g.problem.message[:16], g.others) for g in group_problems(found, ["a/w", "b/w"])]
      [("rule gives 'a/w'", ('b/w',)), ("rule gives 'c/w'", ()), ('no match', ())]
    """
    known = set(paths)
    groups: dict[tuple[str, str], list[tuple[Any, str | None]]] = {}
    for problem in problems:
        key, path = (problem.kind, problem.message), None
        for match in _LEAF_IN_MESSAGE.finditer(problem.message):
            named = ast.literal_eval(match.group(1))
            if named in known:
                start, end = match.span()
                key = (problem.kind, problem.message[:start] + "\0" + problem.message[end:])
                path = named
                break
        groups.setdefault(key, []).append((problem, path))
    return [ProblemGroup(found[0][0], tuple(path for _, path in found[1:]))
            for found in groups.values()]


def problem_text(group: ProblemGroup) -> str:
    """The first problem's message, and the other leaves the same problem stops.

    Examples:
      >>> from flaxlazy._src.report_types import Problem
      >>> problem_text(ProblemGroup(Problem("bad_spec", "'a' ... fails."), ("b", "c")))
      "'a' ... fails. The same for 2 more leaves: 'b', 'c'."
    """
    message, others = group.problem.message, group.others
    if not others:
        return message
    if others[0] is None:  # the same words, naming no leaf
        return f"{message} ({len(others) + 1} times)"
    listed = ", ".join(map(repr, others[:_MAX_LEAVES_NAMED]))
    if len(others) > _MAX_LEAVES_NAMED:
        listed += f" and {len(others) - _MAX_LEAVES_NAMED} more"
    leaves = "leaf" if len(others) == 1 else "leaves"
    return f"{message} The same for {len(others)} more {leaves}: {listed}."


def _aligned(facts: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max(len(k) for k, _ in facts)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in facts]


def report_dict(report: Any) -> dict[str, Any]:
    """A ``flaxlazy.inspect`` report as JSON-ready data (``report.to_dict()``)."""
    leaves = [
        {"path": leaf.path, "shape": list(leaf.shape), "dtype": leaf.dtype,
         "source": leaf.source, "init": leaf.init, "spec": _spec_json(leaf.spec),
         "params": leaf.count, "bytes": leaf.nbytes, "per_device": leaf.per_device,
         "mark": leaf.mark}
        for leaf in report.leaves
    ]
    keys = ("leaves", "params", "bytes", "per_device")
    out = {
        "model": report.model, "framework": report.framework, "target": report.target,
        "inputs": list(report.inputs),
        "mesh": dict(report.mesh) if report.mesh else None, "devices": report.devices,
        "optimizer": report.optimizer, "dtype": report.dtype, "leaves": leaves,
        "collections": {k: dict(zip(keys, v, strict=True))
                        for k, v in report.collections().items()},
        "total_bytes": report.total_bytes, "optimizer_bytes": report.optimizer_bytes,
        "per_device": report.per_device, "device_memory": report.device_memory,
        "fits": report.fits,
        "short_by": (report.per_device - report.device_memory) if report.fits is False else None,
        "largest": [leaf.path for leaf in report.largest(report.top or _DEFAULT_TOP)],
        "compiles": {**report.compiles, "total": report.compiles_total},
        "problems": [p._asdict() for p in report.failures()],
        "seconds": report.seconds,
    }
    if report.depth:
        names = ("params", "bytes", "opt_state_bytes", "per_device")
        out["modules"] = {m: dict(zip(names, v, strict=True))
                          for m, v in report.modules(report.depth).items()}
    return out
