"""Tables and totals of variables trees, abstract or concrete."""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax.training import train_state
from jax.sharding import NamedSharding

from flaxlazy._src import paths
from flaxlazy._src import plan as plan_lib
from flaxlazy._src import sharding as sharding_lib


def _leaf_array(x: Any) -> Any:
    return plan_lib.unbox(x)


def _size(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def _itemsize(x: Any) -> int:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype.itemsize
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys
        return getattr(dtype, "itemsize", 0)


def _arrays(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = paths.flatten(tree)
    out = []
    for path, leaf in flat:
        leaf = _leaf_array(leaf)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype") or np.isscalar(leaf):
            out.append((path, leaf))
    return out


def num_params(tree: Any) -> int:
    """The number of elements in all array leaves of ``tree`` (abstract or concrete).

    Pass ``variables["params"]`` to count parameters only.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,5]"))
      >>> flaxlazy.num_params(shapes)
      18
    """
    return sum(_size(x) for _, x in _arrays(tree))


def nbytes(tree: Any) -> int:
    """The bytes of all array leaves of ``tree`` (abstract or concrete).

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,5]"))
      >>> flaxlazy.nbytes(shapes)
      72
    """
    return sum(_size(x) * _itemsize(x) for _, x in _arrays(tree))


def _natural(path: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return str(dtype) if dtype is not None else type(x).__name__


def render(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A plain-text table with aligned columns (``right[i]``: right-align column i)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _group(path: str, tree: Any) -> str:
    """The total a leaf counts towards: its collection, or its train-state field."""
    grouped = isinstance(tree, train_state.TrainState) or (
        isinstance(tree, Mapping) and all(isinstance(v, Mapping) for v in tree.values())
    )
    return path.split(paths.SEP, 1)[0] if grouped else "total"


def _leaf_shardings(tree: Any, flat: list, mesh: Any, partition_rules: Any,
                    logical_axis_rules: Any) -> list:
    if mesh is not None:
        specs = sharding_lib.partition_specs(
            tree, mesh, partition_rules=partition_rules,
            logical_axis_rules=logical_axis_rules, allow_unused_rules=True,
        )
        return [NamedSharding(mesh, specs[path]) for path, _ in flat]
    out = []
    for _, leaf in flat:
        sh = getattr(_leaf_array(leaf), "sharding", None)
        out.append(sh if isinstance(sh, NamedSharding) else None)
    return out


def summary(
    tree: Any,
    *,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
) -> str:
    """A readable table of a variables tree: path, shape, dtype, count and bytes.

    Works for abstract trees (``abstract_init``) and concrete ones (``materialize``,
    ``module.init``); Flax partitioning boxes show their axis names. Totals are given per
    collection (``params``, ``batch_stats``...) and overall. Sharded trees (leaves that
    carry a ``NamedSharding``, or any tree with ``mesh=``) also show each leaf's
    ``PartitionSpec`` and bytes per device, and the largest per-device load.

    Args:
      tree: a variables tree, or any pytree of arrays / ``ShapeDtypeStruct``s.
      mesh: a mesh to lay the tree out on (specs from ``partition_rules`` and the Flax
        annotations, as in ``materialize``).
      partition_rules: with ``mesh``, as in ``materialize``.
      logical_axis_rules: with ``mesh``, as in ``materialize``.

    Returns:
      The table as a string (``print`` it).

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,5]"))
      >>> print(flaxlazy.summary(shapes))
      path           shape   dtype    params  bytes
      ---------------------------------------------
      params/bias    (3,)    float32       3   12 B
      params/kernel  (5, 3)  float32      15   60 B
      ---------------------------------------------
      params                              18   72 B
      total                               18   72 B
    """
    flat, _ = paths.flatten(tree)
    flat = [(p, leaf) for p, leaf in flat if hasattr(_leaf_array(leaf), "shape")]
    flat.sort(key=lambda item: _natural(item[0]))  # block_2 before block_10
    shardings = _leaf_shardings(tree, flat, mesh, partition_rules, logical_axis_rules)
    sharded = any(sh is not None for sh in shardings)
    has_names = any(paths.is_box(leaf) for _, leaf in flat)
    rows, totals = [], {}
    for (path, leaf), sh in zip(flat, shardings, strict=True):
        array = _leaf_array(leaf)
        count, size = _size(array), _size(array) * _itemsize(array)
        row = [path, str(tuple(array.shape)), _dtype_name(array), f"{count:,}", format_bytes(size)]
        if has_names:
            row.append(str(getattr(leaf, "names", "")) if paths.is_box(leaf) else "")
        per_device = size
        if sharded:
            per_device = sharding_lib.per_device_bytes(array.shape, array.dtype, sh)
            row += [str(tuple(sh.spec)) if sh is not None else "", format_bytes(per_device)]
        rows.append(row)
        group = _group(path, tree)
        c, b, d = totals.get(group, (0, 0, 0))
        totals[group] = (c + count, b + size, d + per_device)
    header = ["path", "shape", "dtype", "params", "bytes"]
    right = [False, False, False, True, True]
    if has_names:
        header, right = header + ["partition"], right + [False]
    if sharded:
        header, right = header + ["spec", "per device"], right + [False, True]
    if list(totals) != ["total"]:
        totals["total"] = tuple(sum(v[i] for v in totals.values()) for i in range(3))
    total_rows = []
    for group, (c, b, d) in totals.items():
        r = [group, "", "", f"{c:,}", format_bytes(b)] + ([""] if has_names else [])
        total_rows.append(r + (["", format_bytes(d)] if sharded else []))
    table = render(header, rows + total_rows, right).split("\n")
    rule = table[1]
    lines = table[: 2 + len(rows)] + [rule] + table[2 + len(rows) :]
    if sharded:
        devices = {d for sh in shardings if sh is not None for d in sh.device_set}
        lines.append(
            f"largest per-device load: {format_bytes(totals['total'][2])} "
            f"on each of {len(devices)} devices (unsharded: {format_bytes(totals['total'][1])})"
        )
    return "\n".join(lines)
