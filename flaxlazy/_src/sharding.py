"""Shardings for a variables tree: path-keyed partition rules and Flax partitioning metadata.

Each leaf's ``PartitionSpec`` is chosen in this order (the first that applies wins):

1. a 0-d leaf (a scalar) is replicated, ``PartitionSpec()``, whatever the rules say;
2. the first partition rule whose pattern matches the leaf's *rule path* (below) and
   whose value is a ``PartitionSpec``. A rule whose value is ``None`` means "keep the
   Flax annotation": it stops the search for an annotated leaf and is skipped for a
   leaf without one;
3. the leaf's Flax annotation: ``nn.Partitioned`` (``nn.with_partitioning``) names are
   mesh axes; ``nn.LogicallyPartitioned`` (``nn.with_logical_partitioning``) names are
   logical axes, mapped to mesh axes by ``logical_axis_rules`` as
   ``nn.logical_to_mesh_axes`` does (except that a logical name no rule mentions is an
   error, not silently replicated: map it to ``None`` to replicate). ``nn.scan``-stacked
   parameters carry the name given by ``metadata_params={nn.PARTITION_NAME: "layers"}``
   on their extra axis, mapped like any other;
4. otherwise: a ``ValueError`` naming the leaf. Nothing is silently replicated.

So explicit rules override annotations. A catch-all ``("**", PartitionSpec())`` last
replicates everything else, annotated leaves included; to keep annotations and
replicate only the unannotated rest, end with ``("**", None), ("**", PartitionSpec())``.
Whatever chose a spec, it is checked against the leaf's shape and the mesh.

Rule paths. Rules are an ordered list (or mapping) of ``(pattern, PartitionSpec)`` with
the same patterns as ``initializers=`` (globs with ``*`` within a segment and ``**``
across segments, or a compiled regex; the whole path must match; the first match wins).
A parameter in the ``params`` collection is matched by its path *inside* ``params``,
exactly as ``initializers=`` sees it (``"Dense_0/kernel"``). A leaf of any other
collection is matched by its path *including* the collection
(``"batch_stats/BatchNorm_0/mean"``), so ``"**"`` matches everything, ``"**/kernel"``
matches kernels in every collection and ``"batch_stats/**"`` one whole collection. A
tree without a collection level (e.g. ``variables["params"]``) is matched by its paths
as they are. Results are keyed by the full, collection-qualified path
(``"params/Dense_0/kernel"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import paths
from flaxlazy._src import rules as rules_lib

PARAMS = "params"
WHAT = "partition_rules"
_MAX_LISTED = 10

UNPARTITIONED = (
    "{what}: no partition rule matches {listing} and {it} carr{ies} no Flax partitioning "
    "annotation. Add a rule for {them} (patterns match the path inside 'params', e.g. "
    "'Dense_0/kernel', and the collection-qualified path elsewhere, e.g. "
    "'batch_stats/**'), or put a catch-all ('**', PartitionSpec()) last to replicate "
    "everything else."
)
BAD_SPEC = (
    "{source} gives {path!r} ({shape}) the spec {spec}, but {reason}. Mesh axis sizes: "
    "{sizes}. {fix}"
)
KEEP_ANNOTATIONS_HINT = (
    " Rules override Flax annotations, so to keep the annotated leaves' own specs and "
    "replicate only the rest, end with [..., ('**', None), ('**', PartitionSpec())]."
)
PARAMS_PREFIX_HINT = (
    " Note: paths inside the 'params' collection are matched without the 'params/' "
    "prefix (write 'Dense_0/kernel', not 'params/Dense_0/kernel'); other collections keep "
    "theirs ('batch_stats/**')."
)


def rule_path(path: str) -> str:
    """The path partition rules match: inside ``params`` without the collection.

    Examples:
      >>> rule_path("params/Block_0/Dense_1/kernel")
      'Block_0/Dense_1/kernel'
      >>> rule_path("batch_stats/BatchNorm_0/mean")
      'batch_stats/BatchNorm_0/mean'
    """
    prefix = PARAMS + paths.SEP
    return path[len(prefix):] if path.startswith(prefix) else path


def _array(leaf: Any) -> Any:
    """The abstract or concrete array in a leaf, without applying Flax constraints."""
    if isinstance(leaf, meta.Partitioned):
        return leaf.value  # ``unbox()`` would add a sharding constraint under a mesh
    return leaf.unbox() if paths.is_box(leaf) else leaf


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    x = _array(leaf)
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    dtype = getattr(x, "dtype", None)
    return tuple(shape), np.asarray(x).dtype if dtype is None else dtype


def _fmt(shape: Sequence[int], dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:  # extended dtypes (PRNG keys)
        name = str(dtype)
    return f"{name}[{','.join(map(str, shape))}]"


def _axis_sizes(mesh: Any) -> dict[str, int]:
    return dict(mesh.shape)


def _dim_axes(entry: Any) -> tuple[Any, ...]:
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def check_spec(
    path: str, shape: Sequence[int], dtype: Any, spec: PartitionSpec, mesh: Any, source: str
) -> None:
    """Checks that ``spec`` can shard an array of ``shape`` over ``mesh``.

    Args:
      path: the leaf's path (for the message).
      shape: the leaf's shape.
      dtype: the leaf's dtype (for the message).
      spec: the ``PartitionSpec``.
      mesh: a ``jax.sharding.Mesh``.
      source: what chose the spec (for the message), e.g. ``"partition_rules: pattern '**'"``.

    Raises:
      ValueError: a mesh axis the mesh does not have, an axis used twice, more spec
        entries than array dimensions, or a dimension not divisible by the product of
        the sizes of the mesh axes it is split over; naming the path, shape, spec and
        mesh axis sizes.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> check_spec("Dense_0/kernel", (4, 3), "float32", P(None, "model"), mesh, "rule")
      Traceback (most recent call last):
      ...
      ValueError: rule gives 'Dense_0/kernel' (float32[4,3]) the spec P(None, 'model'),
      but the mesh has no axis 'model'. Mesh axis sizes: {'data': 1}. ...
    """
    sizes = _axis_sizes(mesh)

    def fail(reason: str, fix: str) -> ValueError:
        return ValueError(BAD_SPEC.format(
            source=source, path=path, shape=_fmt(shape, dtype), spec=spec, reason=reason,
            sizes=sizes, fix=fix,
        ))

    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"{source} gives {path!r} {spec!r}; expected a jax.sharding.PartitionSpec, "
            "e.g. PartitionSpec(None, 'model')."
        )
    if len(spec) > len(shape):
        raise fail(
            f"the spec has {len(spec)} entries for an array of {len(shape)} dimension(s)",
            "Give at most one entry per dimension (trailing dimensions are replicated).",
        )
    seen: set[str] = set()
    for dim, entry in enumerate(spec):
        if entry is PartitionSpec.UNCONSTRAINED:
            raise fail(
                f"dimension {dim} is UNCONSTRAINED",
                "Materialized arrays need a concrete layout: use None to replicate it.",
            )
        axes = _dim_axes(entry)
        for axis in axes:
            if axis not in sizes:
                raise fail(
                    f"the mesh has no axis {axis!r}",
                    f"Use one of {tuple(sizes)} (or None to replicate that dimension).",
                )
            if axis in seen:
                raise fail(
                    f"mesh axis {axis!r} is used for more than one dimension",
                    "Split each mesh axis over at most one dimension.",
                )
            seen.add(axis)
        n = math.prod(sizes[a] for a in axes)
        if shape[dim] % n:
            split = " x ".join(f"{a!r} ({sizes[a]})" for a in axes)
            raise fail(
                f"dimension {dim} (size {shape[dim]}) is not divisible by {n} = {split}",
                "Split it over mesh axes whose sizes divide it, or replicate it (None).",
            )


def _check_rule_values(rules: Sequence[rules_lib.Rule]) -> None:
    for rule in rules:
        if rule.value is not None and not isinstance(rule.value, PartitionSpec):
            raise TypeError(
                f"{WHAT}: {rule.label} maps to {rule.value!r}; expected a "
                "jax.sharding.PartitionSpec, e.g. PartitionSpec(None, 'model') "
                "(PartitionSpec() replicates), or None (keep the Flax annotation)."
            )


def _resolve(
    path: str, leaf: Any, rules: Sequence[rules_lib.Rule], logical_axis_rules: Any
) -> tuple[PartitionSpec, str] | None:
    """(spec, what chose it) for one leaf, or None when nothing partitions it."""
    name = rule_path(path)
    for rule in rules:
        if rule.regex.fullmatch(name):
            if rule.value is not None:
                return rule.value, f"{WHAT}: {rule.label}"
            if paths.is_box(leaf):  # ``None``: keep the annotation, if there is one
                break
    # Only now: an overridden annotation is never resolved (nor its logical axes checked).
    return _annotation(path, leaf, logical_axis_rules)


def _unpartitioned(missing: Sequence[str], annotated: bool) -> str:
    listing = ", ".join(repr(p) for p in missing[:_MAX_LISTED])
    if len(missing) > _MAX_LISTED:
        listing += f" and {len(missing) - _MAX_LISTED} more"
    one = len(missing) == 1
    message = UNPARTITIONED.format(
        what=WHAT, listing=listing, it="it" if one else "they", ies="ies" if one else "y",
        them="it" if one else "them",
    )
    if annotated:
        message += KEEP_ANNOTATIONS_HINT
    return message


def _assign(rules, names, allow_unused):
    try:
        return rules_lib.assign(rules, names, what=WHAT, allow_unused=allow_unused)
    except ValueError as e:
        qualified = [PARAMS + paths.SEP + n for n in names]
        if any(r.regex.fullmatch(q) for r in rules for q in qualified):
            raise ValueError(str(e) + PARAMS_PREFIX_HINT) from None
        raise


def _logical_spec(path: str, box: Any, logical_axis_rules: Any) -> PartitionSpec:
    rules = logical_axis_rules
    if rules is None:
        rules = box.rules if box.rules is not None else nn.get_logical_axis_rules()
    rules = tuple(tuple(r) for r in (rules.items() if isinstance(rules, Mapping) else rules))
    known = {name for name, _ in rules}
    missing = [n for n in box.names if isinstance(n, str) and n not in known]
    if missing:
        raise ValueError(
            f"{path!r} is annotated with logical axes {tuple(box.names)} "
            f"(nn.LogicallyPartitioned), but `logical_axis_rules` has no rule for "
            f"{', '.join(map(repr, missing))}. Pass logical_axis_rules=[(logical_name, "
            "mesh_axis_or_None), ...], e.g. "
            f"[{', '.join(f'({n!r}, None)' for n in missing)}] to replicate "
            f"{'it' if len(missing) == 1 else 'them'}; unlike Flax, unmapped logical axes "
            "are an error rather than silently replicated."
        )
    return nn.logical_to_mesh_axes(tuple(box.names), list(rules))


def _annotation(path: str, leaf: Any, logical_axis_rules: Any) -> tuple[Any, str] | None:
    """(spec, source) from a leaf's Flax box, or None when it has no annotation."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        spec = _logical_spec(path, leaf, logical_axis_rules)
        return spec, f"nn.LogicallyPartitioned{tuple(leaf.names)} via logical_axis_rules"
    if isinstance(leaf, meta.Partitioned):
        return PartitionSpec(*leaf.names), f"nn.Partitioned{tuple(leaf.names)}"
    if paths.is_box(leaf) and hasattr(leaf, "get_partition_spec"):
        return leaf.get_partition_spec(), f"{type(leaf).__name__} annotation"
    return None


def partition_specs(
    abstract_tree: Any,
    mesh: Mesh,
    *,
    partition_rules: Mapping | Sequence[tuple[Any, PartitionSpec]] | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    allow_unused_rules: bool = False,
) -> dict[str, PartitionSpec]:
    """The ``PartitionSpec`` of every leaf, from rules and Flax annotations, validated.

    See the module docstring for the order of precedence and how rule paths are written.

    Args:
      abstract_tree: a variables tree (``abstract_init``'s result, or concrete arrays),
        with Flax boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) kept.
      mesh: the ``jax.sharding.Mesh`` the specs refer to.
      partition_rules: ``[(pattern, PartitionSpec)]`` or ``{pattern: PartitionSpec}``
        (globs or compiled regexes, first match wins), or a nested dict mirroring the
        tree, or None.
      logical_axis_rules: ``[(logical_name, mesh_axis)]`` as in ``nn.logical_axis_rules``
        (``mesh_axis`` a name, a tuple of names or None; earlier rules have priority;
        a mapping also works), used for
        ``nn.LogicallyPartitioned`` leaves. Default: the box's own rules, else the rules
        set with ``nn.logical_axis_rules(...)``.
      allow_unused_rules: accept rules that match no leaf (shared rule sets).

    Returns:
      ``{collection-qualified path: PartitionSpec}`` in tree order.

    Raises:
      ValueError: a leaf with no rule and no annotation, a rule matching nothing, a
        logical axis with no logical rule, or a spec that does not fit the leaf or the
        mesh (naming path, shape, spec and mesh axis sizes).
      TypeError: a rule value that is not a ``PartitionSpec``.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn, flaxlazy
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
      >>> shapes = flaxlazy.abstract_init(nn.Dense(4), jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> partition_specs(shapes, mesh, partition_rules=[
      ...     ("**/kernel", P(None, "model")), ("**", P())])
      {'params/bias': P(), 'params/kernel': P(None, 'model')}
    """
    flat, _ = paths.flatten(abstract_tree)
    rules = rules_lib.normalize(partition_rules, what=WHAT)
    _check_rule_values(rules)
    _assign(rules, [rule_path(p) for p, _ in flat], allow_unused_rules)

    out: dict[str, PartitionSpec] = {}
    missing = []
    for path, leaf in flat:
        shape, dtype = _shape_dtype(leaf)
        if not shape:
            out[path] = PartitionSpec()
            continue
        found = _resolve(path, leaf, rules, logical_axis_rules)
        if found is None:
            missing.append(rule_path(path))
            continue
        spec, source = found
        check_spec(path, shape, dtype, spec, mesh, source)
        out[path] = spec
    if missing:
        raise ValueError(_unpartitioned(missing, any(map(paths.is_box, dict(flat).values()))))
    return out


def shardings(
    abstract_tree: Any,
    mesh: Mesh,
    partition_rules: Mapping | Sequence[tuple[Any, PartitionSpec]] | None = None,
    logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
    *,
    allow_unused_rules: bool = False,
) -> Any:
    """The tree of ``NamedSharding``s for a variables tree (what ``materialize`` uses).

    The result has the structure of ``abstract_tree`` with each leaf (and each Flax box)
    replaced by its ``jax.sharding.NamedSharding``, ready for
    ``jax.jit(..., in_shardings=..., out_shardings=...)`` on the unboxed variables
    (``nn.meta.unbox``) or for checkpoint restore. Specs are chosen and validated as in
    ``partition_specs``.

    Args:
      abstract_tree: a variables tree, abstract or concrete, Flax boxes kept.
      mesh: the ``jax.sharding.Mesh``.
      partition_rules: as in ``partition_specs``.
      logical_axis_rules: as in ``partition_specs``.
      allow_unused_rules: as in ``partition_specs``.

    Returns:
      The tree of ``NamedSharding``s.

    Raises:
      ValueError, TypeError: as ``partition_specs``.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn, flaxlazy
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> dense = nn.Dense(4, kernel_init=nn.with_partitioning(
      ...     nn.initializers.lecun_normal(), (None, "model")))
      >>> shapes = flaxlazy.abstract_init(dense, jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> tree = shardings(shapes, mesh, [("bias", P())])
      >>> tree["params"]["kernel"].spec
      P(None, 'model')
    """
    flat, treedef = paths.flatten(abstract_tree)
    specs = partition_specs(
        abstract_tree, mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
    )
    return jax.tree_util.tree_unflatten(
        treedef, [NamedSharding(mesh, specs[path]) for path, _ in flat]
    )


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


def broadcast(shardings_tree: Any, abstract_tree: Any) -> dict[str, Any]:
    """Spreads one sharding, or a pytree prefix of shardings, over every leaf.

    For ``materialize(..., shardings=...)``: a single ``Sharding`` applies to every leaf;
    a tree applies each of its leaves to the whole subtree below it (``None`` leaves a
    subtree on JAX's default device). 0-d leaves under a ``NamedSharding`` are
    replicated over its mesh. Each ``NamedSharding`` is validated like a rule.

    Args:
      shardings_tree: a ``jax.sharding.Sharding`` or a pytree prefix of them.
      abstract_tree: the variables tree (Flax boxes count as leaves).

    Returns:
      ``{collection-qualified path: Sharding or None}`` in tree order.

    Raises:
      ValueError: a tree that is not a prefix of the variables tree, or a sharding that
        does not fit its leaf.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> broadcast({"params": NamedSharding(mesh, P("model"))}, tree)["params/w"].spec
      P('model',)
    """
    flat, treedef = paths.flatten(abstract_tree)
    if shardings_tree is None or isinstance(shardings_tree, jax.sharding.Sharding):
        given = [shardings_tree] * len(flat)
    else:
        try:
            given = treedef.flatten_up_to(
                jax.tree.broadcast(
                    shardings_tree, jax.tree_util.tree_unflatten(treedef, [0] * len(flat)),
                    is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding),
                )
            )
        except (ValueError, TypeError) as e:
            top = sorted(abstract_tree) if isinstance(abstract_tree, Mapping) else "?"
            raise ValueError(
                "`shardings` must be one jax.sharding.Sharding or a pytree prefix of the "
                f"variables tree (whose top-level keys are {top}); it does not match: {e}"
            ) from None
    out = {}
    for (path, leaf), sharding in zip(flat, given, strict=True):
        shape, dtype = _shape_dtype(leaf)
        if isinstance(sharding, NamedSharding):
            if not shape:
                sharding = NamedSharding(sharding.mesh, PartitionSpec())
            check_spec(path, shape, dtype, sharding.spec, sharding.mesh, "`shardings`")
        elif sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(
                f"`shardings` gives {path!r} {sharding!r}; expected a jax.sharding.Sharding "
                "or None."
            )
        out[path] = sharding
    return out


def with_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    *,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
) -> Any:
    """``abstract_tree`` with each ``ShapeDtypeStruct`` carrying its ``NamedSharding``.

    Flax boxes are kept around the sharded ``ShapeDtypeStruct``s.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> out = with_shardings(tree, mesh, partition_rules=[("w", P("model"))])
      >>> out["params"]["w"].sharding.spec
      P('model',)
    """
    specs = partition_specs(
        abstract_tree, mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
    )
    flat, treedef = paths.flatten(abstract_tree)
    out = []
    for path, leaf in flat:
        shape, dtype = _shape_dtype(leaf)
        sds = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, specs[path]))
        out.append(leaf.replace_boxed(sds) if paths.is_box(leaf) else sds)
    return jax.tree_util.tree_unflatten(treedef, out)
