"""Where each leaf goes: one device, a tree of shardings, or a mesh with partition rules."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import TypeVar

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlazy._src import _compat
from flaxlazy._src import paths
from flaxlazy._src import sharding as sharding_lib

T = TypeVar("T")


def resolve(
    abstract_tree: Any,
    *,
    device: Any = None,
    shardings: Any = None,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
) -> dict[str, Any] | None:
    """``{collection-qualified path: Sharding or None}``, or None for JAX's default device.

    Exactly one way of placing may be given: ``device`` (a ``jax.Device`` or one
    ``Sharding`` for every leaf), ``shardings`` (a ``Sharding`` or a pytree prefix of
    them), or ``mesh`` (a ``jax.sharding.Mesh`` of real devices, with
    ``partition_rules`` and/or the Flax annotations; see ``flaxlazy.shardings`` for
    ``require_rules``). With none of them, inside ``jax.set_mesh`` the ambient mesh is
    the ``mesh`` (as ``nnx.jit(ctor)`` and ``jax.jit(module.init)`` place there).

    Raises:
      TypeError: for conflicting or malformed placement arguments, naming them.
      ValueError: from the rules and annotations (see ``flaxlazy.shardings``).

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> tree = {"params": {"w": jax.ShapeDtypeStruct((4, 2), "float32")}}
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> resolve(tree, mesh=mesh)["params/w"].spec
      P()
      >>> resolve(tree, mesh=mesh.abstract_mesh)
      Traceback (most recent call last):
      ...
      TypeError: `mesh` must be a jax.sharding.Mesh, got AbstractMesh ...
    """
    given = [n for n, v in (("device", device), ("shardings", shardings), ("mesh", mesh))
             if v is not None]
    if len(given) > 1:
        raise TypeError(f"Pass only one of `device`, `shardings` and `mesh`; got {given}.")
    if not given:
        mesh = ambient_mesh()  # inside jax.set_mesh: placed there, as nnx.jit / jax.jit would
    if mesh is None:
        needs = [n for n, v in (("partition_rules", partition_rules),
                                ("logical_axis_rules", logical_axis_rules),
                                ("require_rules", require_rules)) if v is not None]
        if needs:
            raise TypeError(
                f"{' and '.join(f'`{n}`' for n in needs)} need a `mesh=`; got no mesh, so "
                "they would be ignored."
            )
    if device is not None:
        if isinstance(device, jax.Device):
            device = jax.sharding.SingleDeviceSharding(device)
        if not isinstance(device, jax.sharding.Sharding):
            raise TypeError(
                f"`device` must be a jax.Device (e.g. jax.devices('cpu')[0]) or a "
                f"jax.sharding.Sharding, got {device!r}."
            )
        return broadcast(device, abstract_tree)
    if shardings is not None:
        return broadcast(shardings, abstract_tree)
    if mesh is not None:
        sharding_lib.check_mesh(mesh, concrete=True)
        specs = sharding_lib.partition_specs(
            abstract_tree, mesh, partition_rules=partition_rules,
            logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
            require_rules=require_rules,
        )
        return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}
    return None


def ambient_mesh() -> Any:
    """The concrete mesh of a ``jax.set_mesh`` around this call, or None."""
    mesh = _compat.concrete_mesh()
    return None if mesh is None or mesh.empty else mesh


def trace_for(mesh: Any, trace: Callable[[], T]) -> T:
    """``trace()``, run where a model placed on ``mesh`` is traced.

    Values never depend on the mesh: a model is traced as it is, without ``mesh``, so its
    values equal the framework's own init without one, on any mesh. (Under a mesh of
    Explicit axes JAX constrains every intermediate value's sharding, which changes how
    XLA folds constants: ``normal(0.02)`` moves by an ULP in a quarter of its elements on
    2 devices and not on 1.) Only a model that cannot be traced without the mesh, one
    that names its axes (``out_sharding=P(...)``, ``reshard``), is traced again inside
    ``jax.set_mesh(mesh)``, as ``nnx.jit`` would trace it there. Inside a ``jax.set_mesh``
    already, the model is traced there, as the user's own ``nnx.jit`` would be.
    """
    if mesh is None or ambient_mesh() is not None:
        return trace()
    try:
        return trace()
    except Exception as e:  # noqa: BLE001 - retried only if the error names a mesh
        if "mesh" not in str(e).lower():
            raise
    with jax.set_mesh(mesh):
        return trace()


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
        shape, dtype = sharding_lib._shape_dtype(leaf)
        if isinstance(sharding, NamedSharding):
            if not shape:
                sharding = NamedSharding(sharding.mesh, PartitionSpec())
            sharding_lib.check_spec(path, shape, dtype, sharding.spec, sharding.mesh, "`shardings`")
        elif sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(
                f"`shardings` gives {path!r} {sharding!r}; expected a jax.sharding.Sharding "
                "or None."
            )
        out[path] = sharding
    return out
