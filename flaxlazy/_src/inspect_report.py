"""``flaxlazy.inspect``: will it fit, how is it sharded, what will init cost; nothing allocated.

The report is read off the pipeline ``materialize`` runs (for a Linen module or an NNX
constructor), stopped before the last stage:
the abstract trace (every leaf's shape and dtype), the plan (where each leaf's value comes
from and the program that will compute it) and the placement (each leaf's
``PartitionSpec`` over a mesh, real or abstract). Bytes per device follow from shapes,
specs and mesh axis sizes alone, so a 256-device layout can be checked on a laptop.
Where ``materialize`` (or ``init_train_state``, with an optimizer) would stop with an
error (a leaf no rule covers, a rule that matches nothing, a dimension the mesh does not
divide), the report keeps that exact message, counts the leaf as replicated and goes on.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import entrances
from flaxlazy._src import initializer_names
from flaxlazy._src import paths
from flaxlazy._src import placement
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import rules as rules_lib
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import sharding_checks
from flaxlazy._src import specs as specs_lib
from flaxlazy._src import summary as summary_lib
from flaxlazy._src import train_state as train_state_lib
from flaxlazy._src.inspect_options import BAD_OPTIMIZER
from flaxlazy._src.inspect_options import OPTIMIZERS
from flaxlazy._src.inspect_options import as_mesh
from flaxlazy._src.inspect_options import cast_dtype
from flaxlazy._src.inspect_options import parse_bytes
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.report_types import BAD_SPEC
from flaxlazy._src.report_types import FAIL_MARK
from flaxlazy._src.report_types import OPTIMIZER
from flaxlazy._src.report_types import STEP
from flaxlazy._src.report_types import UNCOVERED
from flaxlazy._src.report_types import UNUSED_RULE
from flaxlazy._src.report_types import LeafReport
from flaxlazy._src.report_types import Problem
from flaxlazy._src.report_types import Report
from flaxlazy._src.sources import compiled

OPT_STATE = train_state_lib.OPT_STATE
_MARKS = {sharding_lib.FAILED: FAIL_MARK, sharding_lib.DEFAULT: summary_lib.DEFAULT_MARK}


def optimizer_for(optimizer: Any) -> tuple[optax.GradientTransformation, str]:
    """The transformation and its name, from a name in ``OPTIMIZERS`` or a transformation."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(BAD_OPTIMIZER.format(value=optimizer, names=", ".join(OPTIMIZERS)))
        return OPTIMIZERS[optimizer](), optimizer
    train_state_lib.check_tx(optimizer, fn="inspect")
    return optimizer, "optax transformation"


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * summary_lib.itemsize(jax.ShapeDtypeStruct(shape, dtype))


def _unused_rules(rules: list, names: list[str]) -> list[Problem]:
    """One problem per rule matching none of ``names``, as ``rules.assign`` words it."""
    both = [rules_lib.forms(name, qualified=True) for name in names]
    return [
        Problem(UNUSED_RULE, f"`{sharding_lib.WHAT}`: " + rules_lib.no_match(rule, both))
        for rule in rules if not any(rule.matches(s, f) for s, f in both)
    ]


def _opt_shardings(layout, opt, params) -> tuple[list, list[Problem]]:
    """Each optimizer-state leaf's ``(sharding, mark)``, placed as ``init_train_state`` does."""
    flat = paths.flatten(opt)[0]
    try:
        placed = paths.flatten(layout.opt_state(opt, params))[0]
        return [(sh, "") for _, sh in placed], []
    except ValueError as e:
        uncovered = str(e).startswith(train_state_lib.NO_MIRROR.split("{")[0])
        problem = Problem(UNCOVERED if uncovered else BAD_SPEC, str(e))
    by_param = dict(paths.flatten(params)[0])
    out = []
    for inner, leaf in flat:
        try:
            sh = layout.leaf_sharding(inner, leaf, by_param)
        except ValueError:
            sh = None
        out.append((sh, "") if sh is not None else (layout.replicated, FAIL_MARK))
    return out, [problem]


def _compiles(plan: plan_lib.Plan, optimizer: bool, rngs_update: bool = False
              ) -> dict[str, int]:
    """How many functions a cold ``materialize`` (and ``tx.init``) compiles for this plan.

    For module and override initializers, what ``sources.compiled`` compiles with an
    empty cache (one function per distinct program and sharding, the one-off programs
    together as one, constant fills none), one for the traced run if any leaf needs it, one
    for ``tx.init`` with an optimizer, and for NNX one to update the caller's
    ``nnx.Rngs`` when its end state must be computed.
    """
    coded = [i for i, leaf in enumerate(plan.leaves)
             if leaf.source in (plan_lib.FLAX, plan_lib.INITIALIZER)]
    traced = any(leaf.source == plan_lib.TRACED for leaf in plan.leaves)
    out = {"initializers": compiled.cold_compiles(plan, coded), "traced_run": int(traced)}
    if rngs_update:
        out["rngs_update"] = 1
    if optimizer:  # init_train_state: one jit of tx.init, whatever the state holds
        out["optimizer_init"] = 1
    return out


def inspect(
    module: nn.Module | Callable[..., Any],
    *args: Any,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    initializers: Any = None,
    optimizer: Any = None,
    dtype: Any = None,
    device_memory: int | str | None = None,
    method: Any = None,
    mutable: Any = linen_call.DEFAULT_MUTABLE,
    top: int | None = None,
    depth: int | None = None,
    **kwargs: Any,
) -> Report:
    """What ``materialize`` would create, where, and whether it fits; nothing allocated.

    Traces the init abstractly, builds the same plan and layout ``materialize`` (or,
    with ``optimizer``, ``init_train_state``) would, and reports every leaf's shape,
    dtype, initializer, ``PartitionSpec``, global and per-device bytes; totals per
    collection (and per module with ``depth``); the optimizer state; the load on each
    device and, with ``device_memory``, whether it fits; and how many functions a cold
    ``materialize`` will compile. Nothing is computed on or allocated to any device, so
    an ``AbstractMesh`` (or ``mesh={"data": 8, "model": 8}``) checks a 64-device
    layout anywhere. What ``materialize`` would stop on (an uncovered leaf, a rule that
    matches nothing, an indivisible dimension) is listed in ``report.problems`` with the
    same message, the leaf counted as replicated, instead of raised.

    Args:
      module: a Flax Linen module, or an NNX Module class (or a function returning an
        NNX Module), as for ``materialize``.
      *args: Linen: ``rngs`` (a key or a dict of keys, as for ``abstract_init``; a
        ``ShapeDtypeStruct`` of a key, ``jax.eval_shape(jax.random.key, 0)``, allocates
        nothing), then the inputs (specs such as ``flaxlazy.spec("i32[8,2048]")``).
        NNX: the constructor's arguments, ``rngs=nnx.Rngs(0)`` among them (array
        arguments may be specs).
      mesh: a ``Mesh``, an ``AbstractMesh``, or ``{axis: size}`` for an abstract one.
      partition_rules: as in ``materialize``.
      logical_axis_rules: as in ``materialize``.
      allow_unused_rules: as in ``materialize``.
      require_rules: as in ``flaxlazy.shardings``.
      initializers: as in ``materialize`` (their sources show in the report).
      optimizer: an optax ``GradientTransformation``, or one of ``"adamw"``, ``"adam"``,
        ``"sgd"``, ``"adafactor"``, ``"lion"``: adds the train state's optimizer state and
        step, placed as ``init_train_state`` places them (NNX: the ``nnx.Optimizer``'s).
      dtype: a floating dtype (``"bf16"``...) to cast floating parameters to, for a
        what-if (the optimizer state follows the cast parameters).
      device_memory: one device's memory, in bytes or as ``"80GiB"``: the report says
        whether the per-device load fits.
      method: Linen only, as in ``Module.init``.
      mutable: Linen only, as in ``Module.init``.
      top: how many of the largest leaves ``str(report)`` lists (default: all when
        there are at most 40 leaves, else 10).
      depth: per-module subtotals to this depth in the text and JSON.
      **kwargs: keyword inputs for the module (NNX: constructor keyword arguments).

    Returns:
      A ``Report``: ``print(report)`` for the table, ``report.to_json()``,
      ``report.per_device``, ``report.fits``, ``report.problems``...

    Raises:
      TypeError, ValueError: malformed arguments, a module that fails to trace, or
        initializers that ``materialize`` would reject (as ``materialize`` raises them).

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> from jax.sharding import PartitionSpec as P
      >>> key = jax.eval_shape(jax.random.key, 0)  # a key's shape: nothing allocated
      >>> report = flaxlazy.inspect(
      ...     nn.Dense(1024), key, flaxlazy.spec("f32[8,512]"), mesh={"model": 8},
      ...     partition_rules=[("kernel", P(None, "model")), ("bias", P())],
      ...     optimizer="adam", device_memory="1MiB")
      >>> report.per_device, report.fits, report.compiles_total  # params, mu, nu: 1/8 each
      (798728, True, 2)

      An NNX constructor and its arguments:

      >>> from flax import nnx
      >>> report = flaxlazy.inspect(
      ...     nnx.Linear, 512, 1024, rngs=nnx.Rngs(0), mesh={"model": 8},
      ...     partition_rules=[("kernel", P(None, "model")), ("bias", P())])
      >>> report.model, report.per_device, [leaf.init for leaf in report.leaves]
      ('Linear', 266240, ['zeros', 'truncated_normal (default stream)'])
    """
    start = time.perf_counter()
    mesh = as_mesh(mesh)
    # Checked as materialize checks them; inspect reports on the mesh given alone.
    place = placement.Placement.from_args(
        fn="inspect", mesh=mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, require_rules=require_rules, ambient=False,
    )
    tx, tx_name = optimizer_for(optimizer) if optimizer is not None else (None, None)
    cast = cast_dtype(dtype) if dtype is not None else None
    memory = parse_bytes(device_memory) if device_memory is not None else None

    # The trace materialize plans from, shapes only (the caller's objects untouched):
    # without the mesh, and again under it for a model that names its axes
    # (``placement.trace_for``).
    entrance = entrances.find(module, fn="inspect")
    traced = entrance.trace(module, args, kwargs, fn="inspect", placement=place,
                            options=dict(method=method, mutable=mutable),
                            abstract=True, record=True)
    records, inputs = traced.records, [specs_lib.to_spec(x) for x in traced.inputs]
    flat = paths.flatten(traced.variables)[0]

    # Placement of the variables, problems collected in the order materialize meets them.
    specs: dict[str, tuple[PartitionSpec, str]] = {}
    leaf_problems, rules = [], []
    if mesh is not None:
        found: list[tuple[str, str]] = []
        choices = sharding_lib.choose(
            traced.variables, mesh, partition_rules=place.partition_rules,
            logical_axis_rules=logical_axis_rules, allow_unused_rules=True,
            require_rules=require_rules, problems=found,
        )
        leaf_problems = [Problem(kind, message) for kind, message in found]
        rules = place.partition_rules or []
        specs = {path: (c.spec, _MARKS.get(c.kind, "")) for path, c in choices.items()}
    sharding_of = {p: NamedSharding(mesh, specs[p][0] if specs[p][1] != FAIL_MARK
                                    else PartitionSpec()) for p, _ in flat} if mesh else {}
    plan = plan_lib.build(records, initializers=initializers,
                          shardings=(lambda p, _: sharding_of[p]) if mesh else None)

    names = initializer_names.Names(records, initializers)
    leaves, abstract = [], {}
    for leaf, (path, _) in zip(plan.leaves, flat, strict=True):
        leaf_dtype = leaf.dtype
        if cast is not None and path.startswith(paths.PARAMS + paths.SEP) and \
                jax.numpy.issubdtype(leaf_dtype, jax.numpy.floating):
            leaf_dtype = cast
        abstract[path] = jax.ShapeDtypeStruct(leaf.shape, leaf_dtype,
                                              sharding=sharding_of.get(path))
        leaves.append(_leaf_report(path, leaf.shape, leaf_dtype, leaf.source,
                                   names.of(leaf), *(specs.get(path) or (None, "")), mesh))

    opt_problems, unused_names = [], [p for p, _ in flat]
    if tx is not None:
        layout = train_state_lib.Layout(place) if mesh is not None else None
        opt, params, step = traced.abstract_optimizer(tx, abstract)
        opt_leaves, opt_problems = _optimizer_leaves(opt, params, step, mesh, layout)
        leaves += opt_leaves
        unused_names += [leaf.path for leaf in opt_leaves if leaf.source == OPTIMIZER]
    unused = [] if allow_unused_rules or mesh is None else _unused_rules(rules, unused_names)
    # In the order materialize (or, with an optimizer, init_train_state) meets them.
    found = {"variables": leaf_problems, "unused": unused, "optimizer": opt_problems}
    order = sharding_lib.PROBLEM_ORDER if tx is None else train_state_lib.PROBLEM_ORDER
    problems = [p for stage in order for p in found[stage]]
    return Report(
        model=model_name(module),
        inputs=tuple(sharding_checks.shape_dtype(tuple(x.shape), x.dtype) for x in inputs),
        mesh=tuple((str(k), int(v)) for k, v in mesh.shape.items()) if mesh else None,
        optimizer=tx_name, dtype=None if cast is None else cast.name,
        leaves=tuple(leaves),
        compiles=_compiles(plan, tx is not None,
                           rngs_update=records.rngs_update_compiles),
        problems=tuple(problems), device_memory=memory,
        seconds=time.perf_counter() - start, top=top, depth=depth,
        framework=entrance.name,
    )


def model_name(ctor: Any) -> str:
    """The name a model goes by: an NNX constructor's class's or function's (through
    partials), a Linen module's class's.

    Examples:
      >>> import functools
      >>> import flax.linen as nn
      >>> from flax import nnx
      >>> model_name(nnx.Linear), model_name(functools.partial(nnx.Linear, 4))
      ('Linear', 'Linear')
      >>> model_name(nn.Dense(3))
      'Dense'
    """
    while isinstance(ctor, functools.partial):
        ctor = ctor.func
    return getattr(ctor, "__name__", None) or type(ctor).__name__


def _leaf_report(path, shape, dtype, source, init, spec, mark, mesh) -> LeafReport:
    nbytes = _nbytes(shape, dtype)
    per_device = nbytes
    if mesh is not None and spec is not None and mark != FAIL_MARK:
        per_device = summary_lib.per_device_bytes(shape, dtype, NamedSharding(mesh, spec))
    name = np.dtype(dtype).name if not jax.dtypes.issubdtype(dtype, jax.dtypes.extended) \
        else str(dtype)
    return LeafReport(path, tuple(shape), name, source, init, spec, math.prod(shape), nbytes,
                      per_device, mark)


def _optimizer_leaves(opt, params, step, mesh, layout) -> tuple[list[LeafReport], list[Problem]]:
    """The optimizer state's and the step's leaves, placed as ``init_train_state`` does."""
    flat = paths.flatten(opt)[0]
    placed, problems = [(None, "")] * len(flat), []
    if layout is not None:
        placed, problems = _opt_shardings(layout, opt, params)
    leaves = [
        _leaf_report(f"{OPT_STATE}{paths.SEP}{inner}", tuple(leaf.shape), leaf.dtype, OPTIMIZER,
                     "tx.init", None if sh is None else sh.spec, mark, mesh)
        for (inner, leaf), (sh, mark) in zip(flat, placed, strict=True)
    ]
    leaves.append(_leaf_report(STEP, tuple(step.shape), step.dtype, STEP, "zeros",
                               None if mesh is None else PartitionSpec(), "", mesh))
    return leaves, problems

