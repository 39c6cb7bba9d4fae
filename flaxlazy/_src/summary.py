"""Tables and totals of variables trees, abstract or concrete."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import numpy as np
from flax.training import train_state
from jax.sharding import NamedSharding

from flaxlazy._src import nnx_variables as nnx_state
from flaxlazy._src import paths
from flaxlazy._src import sharding as sharding_lib

NOT_A_TREE = (
    "{fn}: `tree` is {what}, not a variables tree. Pass the variables' shapes, "
    "flaxlazy.abstract_init(module, key, *inputs) (free: nothing is computed), or the "
    "variables themselves (flaxlazy.materialize or module.init output, or a train state)."
)
BAD_LEAF = (
    "{fn}: `tree` has {what} at {path!r}; expected arrays, jax.ShapeDtypeStructs and "
    "numbers (a variables tree from abstract_init, materialize or module.init)."
)
DEFAULT_MARK = "*"
DEFAULT_NOTE = (
    "{mark} replicated by default: no partition rule or Flax annotation covers {these} "
    "({size} on each device; largest {largest!r}, {largest_size}). Pass "
    "require_rules=True to make uncovered leaves an error."
)


def _leaf_array(x: Any) -> Any:
    return paths.unbox(x)


def _size(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def itemsize(x: Any) -> int:
    """Bytes per element of an array or ``ShapeDtypeStruct`` (0 for an extended dtype
    that states none)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype.itemsize
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys
        return getattr(dtype, "itemsize", 0)


def _describe(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_tree(tree: Any, fn: str) -> None:
    """Rejects what is clearly not a variables tree (a module, a string...)."""
    if isinstance(tree, nn.Module):
        what = f"a flax.linen.Module ({type(tree).__name__})"
    elif isinstance(tree, type):
        what = f"the class {tree.__name__}"
    elif isinstance(tree, (str, bytes)):
        what = f"a {type(tree).__name__} ({tree!r})"
    else:
        return
    raise TypeError(NOT_A_TREE.format(fn=fn, what=what))


def as_tree(tree: Any) -> Any:
    """A variables tree: NNX modules and states as ``{collection: ...}`` (``nnx.state``)."""
    return nnx_state.as_variables(tree) if nnx_state.is_nnx(tree) else tree


def _leaves(tree: Any, fn: str) -> list[tuple[str, Any, Any]]:
    """``[(path, leaf, array-like)]``, the leaf as in the tree (boxed), the array unboxed.

    Array-likes are arrays, ``ShapeDtypeStruct``s and numbers (as NumPy scalars).
    """
    tree = as_tree(tree)
    _check_tree(tree, fn)
    flat, _ = paths.flatten(tree)
    out = []
    for path, leaf in flat:
        array = _leaf_array(leaf)
        if isinstance(array, (numbers.Number, np.bool_)):
            array = np.asarray(array)
        elif not (hasattr(array, "shape") and hasattr(array, "dtype")):
            raise TypeError(BAD_LEAF.format(fn=fn, what=_describe(array), path=path))
        out.append((path, leaf, array))
    return out


def _arrays(tree: Any, fn: str) -> list[tuple[str, Any]]:
    return [(path, array) for path, _, array in _leaves(tree, fn)]


def num_params(tree: Any) -> int:
    """The number of elements in all array leaves of ``tree`` (abstract or concrete).

    Of an NNX module or state, only its ``nnx.Param``s are counted, as Flax's own
    summaries count them (not batch statistics or RNG state; ``summary`` totals each
    collection). Of a Linen variables tree every leaf is counted: pass
    ``variables["params"]`` to count parameters only.

    Args:
      tree: a variables tree, an NNX module or ``nnx.State`` (or any pytree of arrays,
        ``ShapeDtypeStruct``s, numbers).

    Returns:
      The total number of elements.

    Raises:
      TypeError: for a module, a string, or a leaf that is not an array or number.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,5]"))
      >>> flaxlazy.num_params(shapes)
      18
    """
    if nnx_state.is_nnx(tree):
        tree = as_tree(tree).get(paths.PARAMS, {})
    return sum(_size(x) for _, x in _arrays(tree, "num_params"))


def nbytes(tree: Any) -> int:
    """The bytes of all array leaves of ``tree`` (abstract or concrete).

    Args:
      tree: as in ``num_params``.

    Returns:
      The total bytes (each leaf's elements times its itemsize).

    Raises:
      TypeError: as ``num_params``.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[1,5]"))
      >>> flaxlazy.nbytes(shapes)
      72
    """
    return sum(_size(x) * itemsize(x) for _, x in _arrays(tree, "nbytes"))


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


class Row(NamedTuple):
    """One leaf of a table (``summary`` and ``flaxlazy.inspect`` print the same rows).

    Attributes:
      path: the leaf's path, e.g. ``"params/Dense_0/kernel"``.
      shape: its shape.
      dtype: its dtype, as printed.
      count: its number of elements.
      nbytes: its global bytes.
      per_device: the bytes one device holds.
      spec: its ``PartitionSpec`` as printed (with a mark), or "".
      names: its Flax partition names, or "".
      init: where its value comes from (``inspect``), or "".
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    nbytes: int
    per_device: int
    spec: str = ""
    names: str = ""
    init: str = ""


def spec_text(spec: Any) -> str:
    """A ``PartitionSpec`` as tables print it: ``P(None, 'model') -> "(None, 'model')"``."""
    return str(tuple(spec))


def table(
    rows: Sequence[Row],
    totals: Sequence[tuple[str, int, int, int]],
    *,
    names: bool = False,
    sharded: bool = False,
    init: bool = False,
) -> list[str]:
    """The lines of a leaf table: a header, ``rows``, a rule, then ``totals`` rows.

    Args:
      rows: the leaves to list.
      totals: ``(label, count, bytes, per-device bytes)`` rows (per collection, overall).
      names: show the Flax partition names column.
      sharded: show the spec and per-device columns.
      init: show where each leaf's value comes from.

    Examples:
      >>> rows = [Row("params/w", (4, 2), "float32", 8, 32, 32)]
      >>> print("\\n".join(table(rows, [("total", 8, 32, 32)])))
      path      shape   dtype    params  bytes
      ----------------------------------------
      params/w  (4, 2)  float32       8   32 B
      ----------------------------------------
      total                           8   32 B
    """
    header = ["path", "shape", "dtype"] + (["init"] if init else []) + ["params", "bytes"]
    right = [False, False, False] + ([False] if init else []) + [True, True]
    if names:
        header, right = header + ["partition"], right + [False]
    if sharded:
        header, right = header + ["spec", "per device"], right + [False, True]
    body = []
    for r in rows:
        row = [r.path, str(r.shape), r.dtype] + ([r.init] if init else [])
        row += [f"{r.count:,}", format_bytes(r.nbytes)] + ([r.names] if names else [])
        body.append(row + ([r.spec, format_bytes(r.per_device)] if sharded else []))
    for label, count, size, per_device in totals:
        row = [label, "", ""] + ([""] if init else []) + [f"{count:,}", format_bytes(size)]
        row += [""] if names else []
        body.append(row + (["", format_bytes(per_device)] if sharded else []))
    lines = render(header, body, right).split("\n")
    return lines[: 2 + len(rows)] + [lines[1]] + lines[2 + len(rows) :]


def _grouped(tree: Any) -> bool:
    """Whether the top level of ``tree`` is collections (or train-state fields).

    A variables dict has a ``params`` collection; a params subtree
    (``variables["params"]``, ``state.params``) has layers at its top level instead.
    """
    return isinstance(tree, train_state.TrainState) or (
        isinstance(tree, Mapping) and paths.PARAMS in tree
        and all(isinstance(v, Mapping) for v in tree.values())
    )


def _leaf_shardings(tree: Any, flat: list, mesh: Any, rules: dict) -> tuple[list, list]:
    """Each leaf's NamedSharding (or None) and whether it was replicated by default."""
    if mesh is not None:
        chosen = sharding_lib.choose(tree, mesh, allow_unused_rules=True, **rules)
        specs, defaulted = [], []
        for path, leaf in flat:
            spec, default = chosen[path].spec, chosen[path].kind == sharding_lib.DEFAULT
            if default and (carried := sharding_lib.carried_spec(leaf)) is not None:
                spec, default = carried, False  # placed already: read its own sharding
            specs.append(NamedSharding(mesh, spec))
            defaulted.append(default)
        return specs, defaulted
    out = []
    for _, leaf in flat:
        sh = getattr(_leaf_array(leaf), "sharding", None)
        out.append(sh if isinstance(sh, NamedSharding) else None)
    return out, [False] * len(flat)


def _num_devices(shardings: list) -> int:
    named = [sh for sh in shardings if sh is not None]
    try:
        return len({d for sh in named for d in sh.device_set})
    except ValueError:  # an AbstractMesh has no devices, only a size
        return max(sh.mesh.size for sh in named)


def summary(
    tree: Any,
    *,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    require_rules: bool | None = None,
) -> str:
    """A readable table of a variables tree: path, shape, dtype, count and bytes.

    Works for abstract trees (``abstract_init``) and concrete ones (``materialize``,
    ``module.init``); Flax partitioning boxes show their axis names. Totals are given per
    collection (``params``, ``batch_stats``...) for a variables dict, per field for a
    train state, and overall. Sharded trees (leaves that carry a ``NamedSharding``, or
    any tree with ``mesh=``) also show each leaf's ``PartitionSpec`` and bytes per
    device, and the largest per-device load. With ``mesh=``, leaves that no partition
    rule or annotation covers, and that were therefore replicated, are marked ``*``.

    Args:
      tree: a variables tree, a params subtree, a train state, an NNX module, optimizer
        or ``nnx.State`` (paths as in ``materialize``: ``params/blocks/0/up/kernel``), or
        any pytree of arrays / ``ShapeDtypeStruct``s.
      mesh: a mesh to lay the tree out on (specs from ``partition_rules`` and the Flax
        annotations, as in ``materialize``).
      partition_rules: with ``mesh``, as in ``materialize``.
      logical_axis_rules: with ``mesh``, as in ``materialize``.
      require_rules: with ``mesh``, as in ``flaxlazy.shardings``.

    Returns:
      The table as a string (``print`` it).

    Raises:
      TypeError: for a module, a string, or a leaf that is not an array or number.

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
    tree = as_tree(tree)
    leaves = sorted(_leaves(tree, "summary"), key=lambda item: _natural(item[0]))
    flat = [(path, leaf) for path, leaf, _ in leaves]  # block_2 before block_10
    if mesh is None:
        given = [n for n, v in (("partition_rules", partition_rules),
                                ("logical_axis_rules", logical_axis_rules),
                                ("require_rules", require_rules)) if v is not None]
        if given:
            raise TypeError(f"summary: {' and '.join(f'`{n}`' for n in given)} need a `mesh=`.")
    rules = dict(partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
                 require_rules=require_rules)
    shardings, defaulted = _leaf_shardings(tree, flat, mesh, rules)
    sharded = any(sh is not None for sh in shardings)
    has_names = any(paths.is_box(leaf) for _, leaf in flat)
    grouped = _grouped(tree)
    rows, totals, by_default = [], {}, []
    for (path, leaf, array), sh, default in zip(leaves, shardings, defaulted, strict=True):
        count, size = _size(array), _size(array) * itemsize(array)
        per_device = size
        spec = ""
        if sharded:
            per_device = per_device_bytes(array.shape, array.dtype, sh)
            spec = spec_text(sh.spec) if sh is not None else ""
            spec += " " + DEFAULT_MARK if default else ""
        if default:
            by_default.append((per_device, path))
        names = str(getattr(leaf, "names", "")) if paths.is_box(leaf) else ""
        rows.append(Row(path, tuple(array.shape), _dtype_name(array), count, size, per_device,
                        spec=spec, names=names))
        group = path.split(paths.SEP, 1)[0] if grouped else "total"
        c, b, d = totals.get(group, (0, 0, 0))
        totals[group] = (c + count, b + size, d + per_device)
    if list(totals) != ["total"]:
        totals["total"] = tuple(sum(v[i] for v in totals.values()) for i in range(3))
    lines = table(rows, [(group, *t) for group, t in totals.items()], names=has_names,
                  sharded=sharded)
    if sharded:
        lines.append(
            f"largest per-device load: {format_bytes(totals['total'][2])} on each of "
            f"{_num_devices(shardings)} devices (unsharded: {format_bytes(totals['total'][1])})"
        )
    if by_default:
        largest_size, largest = max(by_default)
        these = "this leaf" if len(by_default) == 1 else f"these {len(by_default)} leaves"
        lines.append(DEFAULT_NOTE.format(
            mark=DEFAULT_MARK, these=these, size=format_bytes(sum(b for b, _ in by_default)),
            largest=largest, largest_size=format_bytes(largest_size),
        ))
    return "\n".join(lines)


def per_device_bytes(shape: Sequence[int], dtype: Any, sharding: Any) -> int:
    """The bytes of one shard of an array of ``shape`` and ``dtype`` under ``sharding``.

    Args:
      shape: the global shape.
      dtype: the dtype.
      sharding: a ``jax.sharding.Sharding``, or None for an unsharded array.

    Returns:
      The bytes one device holds (the whole array when replicated or unsharded).

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> per_device_bytes((1024, 512), "float32", NamedSharding(mesh, P(None, "model")))
      2097152
      >>> per_device_bytes((1024, 512), "bfloat16", None)
      1048576
    """
    shape = tuple(shape)
    shard = shape if sharding is None else sharding.shard_shape(shape)
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys
        itemsize = getattr(dtype, "itemsize", 0)
    return math.prod(shard) * itemsize
