"""Abstract init: every variable's shape and dtype from ``jax.eval_shape``, nothing computed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from flaxlazy._src import entrances
from flaxlazy._src import placement
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src.linen.call import DEFAULT_MUTABLE


def abstract_init(
    module: nn.Module | Callable[..., Any],
    *args: Any,
    method: Callable[..., Any] | str | None = None,
    mutable: Any = DEFAULT_MUTABLE,
    capture_intermediates: bool | Callable[..., bool] = False,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Returns the variables ``module.init`` would create, as shapes and dtypes only.

    Same signature and same returned tree as ``flax.linen.Module.init``, but each leaf is
    a ``jax.ShapeDtypeStruct`` and nothing is computed or allocated: the init is traced
    with ``jax.eval_shape``. Flax partitioning boxes (``nn.Partitioned``,
    ``nn.LogicallyPartitioned``) are kept around their abstract values.

    For Flax NNX, ``abstract_init(GPT, *args, rngs=nnx.Rngs(0), **kwargs)`` returns the
    abstract module, as ``nnx.eval_shape(lambda: GPT(...))`` does (with each leaf's
    ``NamedSharding`` under a mesh), and leaves the caller's ``nnx.Rngs`` untouched.

    Args:
      module: a Flax Linen module, or an NNX Module class (or any function returning
        an NNX module).
      *args: Linen: ``rngs``, a PRNG key or a dict of keys such as ``{"params": k1,
        "dropout": k2}`` (a ``jax.ShapeDtypeStruct`` of a key works too; also accepted
        as ``rngs=``), then the positional inputs, any pytrees mixing arrays,
        ``ShapeDtypeStruct``s (e.g. ``flaxlazy.spec("f32[8,784]")``) and Python values.
        Arrays count only by shape and dtype; other values are passed through
        unchanged. NNX: the constructor's arguments, ``rngs=nnx.Rngs(...)`` among them.
      method: as in ``Module.init``: the method to call (default ``__call__``).
      mutable: as in ``Module.init``: the collections to create.
      capture_intermediates: as in ``Module.init``.
      mesh: if given, each ``ShapeDtypeStruct`` carries the ``NamedSharding``
        ``materialize(..., mesh=mesh, partition_rules=...)`` would give it. Inside
        ``jax.set_mesh`` the ambient mesh is the default, as for ``materialize``.
      partition_rules: with ``mesh``, as in ``materialize``.
      logical_axis_rules: with ``mesh``, as in ``materialize``.
      allow_unused_rules: with ``mesh``, as in ``materialize``.
      require_rules: with ``mesh``, as in ``materialize``.
      **kwargs: keyword inputs, treated like ``inputs`` (NNX: the constructor's keywords).

    Returns:
      The variables tree (a dict of collections) with ``ShapeDtypeStruct`` leaves.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> shapes = flaxlazy.abstract_init(nn.Dense(3), jax.random.key(0), flaxlazy.spec("f32[8,5]"))
      >>> shapes["params"]["kernel"]
      ShapeDtypeStruct(shape=(5, 3), dtype=float32)
    """
    place = placement.Placement.from_args(
        fn="abstract_init", mesh=mesh, partition_rules=partition_rules,
        logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
        require_rules=require_rules,
    )
    return run("abstract_init", module, args, kwargs, place=place,
               options=dict(method=method, mutable=mutable,
                            capture_intermediates=capture_intermediates))


def run(fn: str, module: Any, args: tuple, kwargs: dict, *, place: placement.Placement,
        options: dict | None = None) -> Any:
    """``abstract_init``'s pipeline for a public function ``fn`` (named in its errors):
    the target's entrance traces the call abstractly; leaves carry their shardings where
    ``place`` has a mesh."""
    entrance = entrances.find(module, fn=fn)
    traced = entrance.trace(module, args, kwargs, fn=fn, placement=place, abstract=True,
                            options=options or {})
    variables = traced.variables
    if place.mesh is not None:
        variables = sharding_lib.with_shardings(variables, place.mesh, **place.rules())
    return traced.build(variables)
