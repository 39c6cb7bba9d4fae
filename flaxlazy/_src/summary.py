"""Tables and totals of variables trees, abstract or concrete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flaxlazy._src import paths


def _leaf_array(x: Any) -> Any:
    return x.unbox() if paths.is_box(x) else x


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
    is_collections = isinstance(tree, Mapping) and all(
        isinstance(v, Mapping) for v in tree.values()
    )
    return path.split(paths.SEP, 1)[0] if is_collections else "total"


def summary(tree: Any) -> str:
    """A readable table of a variables tree: path, shape, dtype, count and bytes.

    Works for abstract trees (``abstract_init``) and concrete ones (``materialize``,
    ``module.init``); Flax partitioning boxes show their axis names. Totals are given per
    collection (``params``, ``batch_stats``...) and overall.

    Args:
      tree: a variables tree, or any pytree of arrays / ``ShapeDtypeStruct``s.

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
    has_names = any(paths.is_box(leaf) for _, leaf in flat)
    rows, totals = [], {}
    for path, leaf in flat:
        array = _leaf_array(leaf)
        if not hasattr(array, "shape"):
            continue
        count, size = _size(array), _size(array) * _itemsize(array)
        row = [path, str(tuple(array.shape)), _dtype_name(array), f"{count:,}", format_bytes(size)]
        if has_names:
            row.append(str(getattr(leaf, "names", "")) if paths.is_box(leaf) else "")
        rows.append(row)
        group = _group(path, tree)
        c, b = totals.get(group, (0, 0))
        totals[group] = (c + count, b + size)
    header = ["path", "shape", "dtype", "params", "bytes"] + (["partition"] if has_names else [])
    right = [False, False, False, True, True] + ([False] if has_names else [])
    total_rows = [[g, "", "", f"{c:,}", format_bytes(b)] for g, (c, b) in totals.items()]
    if list(totals) != ["total"]:
        c = sum(v[0] for v in totals.values())
        b = sum(v[1] for v in totals.values())
        total_rows.append(["total", "", "", f"{c:,}", format_bytes(b)])
    if has_names:
        total_rows = [r + [""] for r in total_rows]
    table = render(header, rows + total_rows, right).split("\n")
    rule = table[1]
    return "\n".join(table[: 2 + len(rows)] + [rule] + table[2 + len(rows) :])
