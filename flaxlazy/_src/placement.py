"""Where each leaf goes: one device, a tree of shardings, or a mesh with partition rules."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from flaxlazy._src import sharding as sharding_lib


def resolve(
    abstract_tree: Any,
    *,
    device: Any = None,
    shardings: Any = None,
    mesh: Any = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
) -> dict[str, Any] | None:
    """``{collection-qualified path: Sharding or None}``, or None for JAX's default device.

    Exactly one way of placing may be given: ``device`` (a ``jax.Device`` or one
    ``Sharding`` for every leaf), ``shardings`` (a ``Sharding`` or a pytree prefix of
    them), or ``mesh`` (with ``partition_rules`` and/or the Flax annotations).

    Raises:
      TypeError: for conflicting or malformed placement arguments.
      ValueError: from the rules and annotations (see ``flaxlazy.shardings``).
    """
    given = [n for n, v in (("device", device), ("shardings", shardings), ("mesh", mesh))
             if v is not None]
    if len(given) > 1:
        raise TypeError(f"Pass only one of `device`, `shardings` and `mesh`; got {given}.")
    if mesh is None and (partition_rules is not None or logical_axis_rules is not None):
        raise TypeError("`partition_rules` and `logical_axis_rules` need a `mesh=`.")
    if device is not None:
        if isinstance(device, jax.Device):
            device = jax.sharding.SingleDeviceSharding(device)
        if not isinstance(device, jax.sharding.Sharding):
            raise TypeError(
                f"`device` must be a jax.Device (e.g. jax.devices('cpu')[0]) or a "
                f"jax.sharding.Sharding, got {device!r}."
            )
        return sharding_lib.broadcast(device, abstract_tree)
    if shardings is not None:
        return sharding_lib.broadcast(shardings, abstract_tree)
    if mesh is not None:
        specs = sharding_lib.partition_specs(
            abstract_tree, mesh, partition_rules=partition_rules,
            logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        )
        return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}
    return None
