"""``flaxlazy.Report``, what ``flaxlazy.inspect`` returns: leaves, problems and totals.

Plain data, apart from the function that builds it (``inspect_report.inspect``) and from
its text and JSON forms (``inspect_render``): a frozen dataclass holding one ``LeafReport``
per leaf and the ``Problem``s ``materialize`` would stop on, with the totals (per device,
per collection, per module) computed from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

from jax.sharding import PartitionSpec

from flaxlazy._src import inspect_render
from flaxlazy._src import paths
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import summary as summary_lib

STEP = "step"
# Sources beyond the plan's (``plan.FLAX``...): optimizer state and the train step.
OPTIMIZER = "optimizer"

# Problems: what makes ``--strict`` fail.
UNUSED_RULE = "unused_rule"
UNCOVERED = sharding_lib.PROBLEM_UNCOVERED
BAD_SPEC = sharding_lib.PROBLEM_BAD_SPEC
DOES_NOT_FIT = "does_not_fit"

LINEN, NNX = "linen", "nnx"
FAIL_MARK = "!"  # materialize would stop on this leaf; counted as replicated


class Problem(NamedTuple):
    """Something ``materialize`` would stop on, or a layout that does not fit.

    Attributes:
      kind: ``"unused_rule"``, ``"uncovered"``, ``"bad_spec"`` or ``"does_not_fit"``.
      message: the message, exactly as ``materialize`` / ``init_train_state`` raise it.
    """

    kind: str
    message: str


class LeafReport(NamedTuple):
    """One leaf of the report.

    Attributes:
      path: the collection-qualified path (``"params/Dense_0/kernel"``,
        ``"opt_state/0/mu/Dense_0/kernel"``, ``"step"``).
      shape: its shape.
      dtype: its dtype name (after ``dtype=``'s cast).
      source: where its value comes from: ``"flax"`` (the module's own initializer),
        ``"initializer"`` (an override), ``"array"``, ``"checkpoint"``, ``"traced"``
        (one compiled run of ``module.init``, or of the NNX constructor), ``"optimizer"``
        (``tx.init``) or ``"step"``.
      init: the initializer by name where known (``"lecun_normal"``; for NNX, read off
        the traced constructor: ``"zeros"``, ``"truncated_normal (params stream)"``), or
        what gives the value (``"tx.init"``, the checkpoint entry...).
      spec: its ``PartitionSpec``, or None without a mesh.
      count: its number of elements.
      nbytes: its global bytes.
      per_device: the bytes each device holds.
      mark: ``""``, ``"*"`` (replicated: no rule or annotation covers it) or ``"!"``
        (``materialize`` would stop on it, see the problems; counted as replicated).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    init: str
    spec: PartitionSpec | None
    count: int
    nbytes: int
    per_device: int
    mark: str = ""


def _module_key(path: str, depth: int, params: dict[str, str], optimizer: bool = False) -> str:
    """The module subtree a leaf counts toward: ``depth`` module segments of its path; an
    optimizer-state leaf (``opt_state/...``) that of the parameter it mirrors."""
    parts = path.split(paths.SEP)
    if optimizer:  # attributed to the parameter it mirrors, by path suffix
        for i in range(1, len(parts)):
            if paths.SEP.join(parts[i:]) in params:
                parts = params[paths.SEP.join(parts[i:])].split(paths.SEP)
                break
        else:
            return "(optimizer state, shared)"
    if len(parts) == 1:
        return f"({parts[0]})"
    modules = parts[1:-1][:depth]
    return paths.SEP.join(modules) if modules else f"({parts[0]}, top level)"


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``materialize`` (or ``init_train_state``) would create, where, and at what cost.

    ``str(report)`` is the aligned text table; ``report.to_json()`` the same as JSON. All
    byte counts are exact for the given mesh: every device holds ``per_device`` bytes
    (shards of a ``NamedSharding`` over evenly divided dimensions are all the same size).

    Attributes:
      model: the module's class name (NNX: the constructor's class or function name).
      inputs: the abstract inputs, e.g. ``("int32[8,2048]",)``.
      mesh: ``((axis, size), ...)``, or None (one device).
      optimizer: the optimizer's name, or None.
      dtype: the what-if dtype of floating parameters, or None.
      leaves: one ``LeafReport`` per leaf, in tree order.
      compiles: the functions a cold ``materialize`` compiles, by kind (see ``compiles_total``).
      problems: what ``materialize`` would stop on (``Problem``), in the order it checks.
      device_memory: the memory of one device in bytes, or None.
      seconds: the wall time of the inspection.
      target: what the command was pointed at (``"examples/factories.py:llama7b"``), or None.
      top: how many of the largest leaves the text lists (None: all when there are at
        most 40, else 10).
      depth: per-module subtotals to this depth in the text and JSON (None: none).
      framework: ``"linen"`` or ``"nnx"``.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> key = jax.eval_shape(jax.random.key, 0)
      >>> report = flaxlazy.inspect(nn.Dense(4), key, flaxlazy.spec("f32[2,3]"),
      ...                           optimizer="adam", depth=1)
      >>> isinstance(report, Report), report.framework, report.devices
      (True, 'linen', 1)
      >>> [(leaf.path, leaf.source, leaf.nbytes) for leaf in report.leaves[:2]]
      [('params/bias', 'flax', 16), ('params/kernel', 'flax', 48)]
      >>> report.total_bytes, report.optimizer_bytes, report.collections()["total"]
      (200, 132, (8, 50, 200, 200))
      >>> report.modules(1)  # elements, variable bytes, optimizer bytes, per device
      {'(optimizer state, shared)': (0, 0, 4, 4), '(params, top level)': (16, 64, 128, 192),
       '(step)': (1, 4, 0, 4)}
    """

    model: str
    inputs: tuple[str, ...]
    mesh: tuple[tuple[str, int], ...] | None
    optimizer: str | None
    dtype: str | None
    leaves: tuple[LeafReport, ...]
    compiles: Mapping[str, int]
    problems: tuple[Problem, ...]
    device_memory: int | None
    seconds: float
    target: str | None = None
    top: int | None = None
    depth: int | None = None
    framework: str = LINEN

    @property
    def devices(self) -> int:
        """The number of devices the variables are laid out on."""
        return math.prod(size for _, size in self.mesh) if self.mesh else 1

    @property
    def total_bytes(self) -> int:
        """The global bytes of every leaf (each array counted once)."""
        return sum(leaf.nbytes for leaf in self.leaves)

    @property
    def per_device(self) -> int:
        """The bytes each device holds (the largest per-device load)."""
        return sum(leaf.per_device for leaf in self.leaves)

    @property
    def optimizer_bytes(self) -> int:
        """The global bytes of the optimizer state."""
        return sum(leaf.nbytes for leaf in self.leaves if leaf.source == OPTIMIZER)

    @property
    def compiles_total(self) -> int:
        """How many functions a cold ``materialize`` (and ``tx.init``) compiles."""
        return sum(self.compiles.values())

    @property
    def fits(self) -> bool | None:
        """Whether ``per_device`` fits in ``device_memory`` (None when not given)."""
        return None if self.device_memory is None else self.per_device <= self.device_memory

    def largest(self, n: int) -> list[LeafReport]:
        """The ``n`` leaves taking most bytes on each device."""
        return sorted(self.leaves, key=lambda leaf: (-leaf.per_device, leaf.path))[:n]

    def failures(self) -> list[Problem]:
        """Every problem, plus "does not fit": what makes ``--strict`` fail."""
        out = list(self.problems)
        if self.fits is False:
            big = ", ".join(f"{leaf.path!r} ({summary_lib.format_bytes(leaf.per_device)})"
                            for leaf in self.largest(3))
            out.append(Problem(DOES_NOT_FIT, (
                f"does not fit: {'each device' if self.devices > 1 else 'the device'} needs "
                f"{summary_lib.format_bytes(self.per_device)} but has "
                f"{summary_lib.format_bytes(self.device_memory)} (short by "
                f"{summary_lib.format_bytes(self.per_device - self.device_memory)}); its "
                f"largest leaves: {big}."
            )))
        return out

    def collections(self) -> dict[str, tuple[int, int, int, int]]:
        """``{collection: (leaves, elements, bytes, per-device bytes)}``, then ``"total"``."""
        out: dict[str, tuple[int, int, int, int]] = {}
        for leaf in self.leaves:
            group = leaf.path.split(paths.SEP, 1)[0]
            n, c, b, d = out.get(group, (0, 0, 0, 0))
            out[group] = (n + 1, c + leaf.count, b + leaf.nbytes, d + leaf.per_device)
        out["total"] = tuple(sum(v[i] for v in out.values()) for i in range(4))
        return out

    def modules(self, depth: int) -> dict[str, tuple[int, int, int, int]]:
        """``{module: (elements, variable bytes, optimizer bytes, per-device bytes)}``.

        A module is the first ``depth`` segments of a leaf's path inside its collection;
        an optimizer-state leaf counts toward the parameter whose path it ends with.
        """
        params = {}
        for leaf in self.leaves:
            col, _, inner = leaf.path.partition(paths.SEP)
            if col == paths.PARAMS:
                params[inner] = leaf.path
        out: dict[str, tuple[int, int, int, int]] = {}
        for leaf in self.leaves:
            opt = leaf.source == OPTIMIZER
            key = _module_key(leaf.path, depth, params, optimizer=opt)
            c, b, o, d = out.get(key, (0, 0, 0, 0))
            out[key] = (c + (0 if opt else leaf.count), b + (0 if opt else leaf.nbytes),
                        o + (leaf.nbytes if opt else 0), d + leaf.per_device)
        return dict(sorted(out.items(), key=lambda kv: (kv[0].startswith("("),
                                                        summary_lib._natural(kv[0]))))

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (see ``to_json``)."""
        return inspect_render.report_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, *, color: bool = False) -> str:
        """The report as aligned text; ``color`` adds ANSI colors (for a terminal)."""
        return inspect_render.report_text(self, color=color)

    def __str__(self) -> str:
        return self.render()
