"""Validating what shards a tree: meshes, logical-axis rules, partition-rule values, specs.

Every check raises a ``TypeError``/``ValueError`` that names the argument or the leaf's
path, what was expected and received, and the likely fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import rules as rules_lib

WHAT = "partition_rules"

BAD_SPEC = (
    "{source} gives {path!r} ({shape}) the spec {spec}, but {reason}. Mesh axis sizes: "
    "{sizes}. {fix}"
)
SCALAR_FIX = (
    "A scalar (such as NNX RNG state, RngKey/... and RngCount/...) can only be "
    "replicated: map it to PartitionSpec() with a rule before this one (e.g. "
    "('RngKey/**', PartitionSpec())), or narrow the pattern so that it does not match it."
)
BAD_MESH = (
    "`{what}` must be a jax.sharding.Mesh{abstract}, got {type} {value!r}. Build one with "
    "jax.make_mesh((2, 4), ('data', 'model')) or "
    "Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model')).{hint}"
)
BAD_LOGICAL = (
    "`logical_axis_rules` must be a sequence of (logical_name, mesh_axes) pairs such as "
    "[('batch', 'data'), ('embed', None), ('mlp', ('model', 'expert'))], where mesh_axes "
    "is a mesh axis name, a tuple of them, or None; {problem}."
)


def check_mesh(mesh: Any, *, concrete: bool = False, what: str = "mesh") -> None:
    """Checks that ``mesh`` is a ``Mesh`` (or, unless ``concrete``, an ``AbstractMesh``).

    Args:
      mesh: the value to check.
      concrete: require devices (to create arrays), so no ``AbstractMesh``.
      what: the argument name for the message.

    Raises:
      TypeError: naming ``what``, what was given and how to build a mesh.

    Examples:
      >>> check_mesh(("data", "model"))
      Traceback (most recent call last):
      ...
      TypeError: `mesh` must be a jax.sharding.Mesh or jax.sharding.AbstractMesh, got
      tuple ('data', 'model'). ...
    """
    if isinstance(mesh, Mesh) or (isinstance(mesh, AbstractMesh) and not concrete):
        return
    hint = ""
    if isinstance(mesh, AbstractMesh):
        hint = (" An AbstractMesh describes shapes only: use it with abstract_init or "
                "flaxlazy.shardings, and a Mesh of real devices to create arrays.")
    elif isinstance(mesh, NamedSharding):
        hint = f" This is a NamedSharding; pass its mesh: `{what}=sharding.mesh`."
    elif isinstance(mesh, (list, tuple, np.ndarray)) and any(
        isinstance(d, jax.Device) for d in np.ravel(np.asarray(mesh, dtype=object))
    ):
        hint = " This is a list of devices; wrap it in a Mesh with axis names."
    raise TypeError(BAD_MESH.format(
        what=what, abstract="" if concrete else " or jax.sharding.AbstractMesh",
        type=type(mesh).__name__, value=mesh, hint=hint,
    ))


def check_logical_axis_rules(rules: Any) -> tuple[tuple[str, Any], ...] | None:
    """Validates ``logical_axis_rules`` and returns them as a tuple of pairs.

    Args:
      rules: None, a mapping ``{logical_name: mesh_axes}``, or a sequence of
        ``(logical_name, mesh_axes)`` pairs; ``mesh_axes`` is a mesh axis name, a tuple
        of names, or None.

    Returns:
      The rules as a tuple of ``(str, str | tuple[str, ...] | None)``, or None.

    Raises:
      TypeError: for anything else, naming the offending entry.

    Examples:
      >>> check_logical_axis_rules({"embed": "data", "mlp": ["model"]})
      (('embed', 'data'), ('mlp', ('model',)))
      >>> check_logical_axis_rules([("embed", "data"), "mlp"])
      Traceback (most recent call last):
      ...
      TypeError: `logical_axis_rules` must be a sequence of (logical_name, mesh_axes) pairs
      ...; entry 1 is 'mlp', not a pair.
    """
    if rules is None:
        return None
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    elif not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise TypeError(BAD_LOGICAL.format(problem=f"got {type(rules).__name__} {rules!r}"))
    out = []
    for i, entry in enumerate(rules):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(BAD_LOGICAL.format(problem=f"entry {i} is {entry!r}, not a pair"))
        name, axes = entry
        if not isinstance(name, str):
            raise TypeError(BAD_LOGICAL.format(
                problem=f"entry {i} {tuple(entry)!r} has logical name {name!r}, not a str"))
        if isinstance(axes, list):
            axes = tuple(axes)
        if isinstance(axes, PartitionSpec) or not (axes is None or isinstance(axes, str) or (
            isinstance(axes, tuple) and all(isinstance(a, str) for a in axes)
        )):
            fix = ""
            if isinstance(axes, PartitionSpec):
                fix = f" (a PartitionSpec; write the mesh axes themselves: {tuple(axes)!r})"
            raise TypeError(BAD_LOGICAL.format(
                problem=f"entry {i} {tuple(entry)!r} maps {name!r} to {axes!r}{fix}"))
        out.append((name, axes))
    return tuple(out)


def shape_dtype(shape: Sequence[int], dtype: Any) -> str:
    """A leaf's dtype and shape as flaxlazy's messages write them.

    Examples:
      >>> shape_dtype((2, 3), "float32")
      'float32[2,3]'
    """
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
            source=source, path=path, shape=shape_dtype(shape, dtype), spec=spec, reason=reason,
            sizes=sizes, fix=fix,
        ))

    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"{source} gives {path!r} {spec!r}; expected a jax.sharding.PartitionSpec, "
            "e.g. PartitionSpec(None, 'model')."
        )
    seen: set[str] = set()
    for dim, entry in enumerate(spec):  # the spec itself first, then how it fits the leaf
        if entry is PartitionSpec.UNCONSTRAINED:
            raise fail(
                f"dimension {dim} is UNCONSTRAINED",
                "Materialized arrays need a concrete layout: use None to replicate it.",
            )
        for axis in _dim_axes(entry):
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
    if len(spec) > len(shape):
        raise fail(
            f"the spec has {len(spec)} entries for an array of {len(shape)} dimension(s)",
            SCALAR_FIX if not shape else
            "Give at most one entry per dimension (trailing dimensions are replicated).",
        )
    for dim, entry in enumerate(spec):
        axes = _dim_axes(entry)
        n = math.prod(sizes[a] for a in axes)
        if shape[dim] % n:
            split = " x ".join(f"{a!r} ({sizes[a]})" for a in axes)
            raise fail(
                f"dimension {dim} (size {shape[dim]}) is not divisible by {n} = {split}",
                "Split it over mesh axes whose sizes divide it, or replicate it (None).",
            )


def _check_rule_values(rules: Sequence[rules_lib.Rule]) -> None:
    for rule in rules:
        value = rule.value
        if value is not None and not isinstance(value, PartitionSpec):
            hint = ""
            if isinstance(value, (tuple, list)):
                hint = f" Maybe you meant PartitionSpec{tuple(value)!r}?"
            elif isinstance(value, str):
                hint = f" Maybe you meant PartitionSpec({value!r})?"
            raise TypeError(
                f"`{WHAT}`: {rule.label} maps to {type(value).__name__} {value!r}; expected a "
                "jax.sharding.PartitionSpec, e.g. PartitionSpec(None, 'model') "
                f"(PartitionSpec() replicates), or None (keep the Flax annotation).{hint}"
            )
