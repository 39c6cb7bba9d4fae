"""Abstract init: every variable's shape and dtype from ``jax.eval_shape``, nothing computed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from flaxlazy._src import placement
from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src.linen import call as linen_call
from flaxlazy._src.linen.call import DEFAULT_MUTABLE
from flaxlazy._src.nnx import api as nnx_api
from flaxlazy._src.nnx import call as nnx_call
from flaxlazy._src.nnx import trace as nnx_trace


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
    if mesh is None:
        mesh = placement.ambient_mesh()  # inside jax.set_mesh, as materialize places there
    if mesh is None and (
        partition_rules is not None or logical_axis_rules is not None
        or require_rules is not None
    ):
        raise TypeError(
            "abstract_init: `partition_rules`, `logical_axis_rules` and `require_rules` "
            "need a `mesh=`."
        )
    traced = None
    if nnx_call.is_nnx_target(module):
        linen_call.reject_linen_options(
            "abstract_init", method=method, mutable=mutable,
            capture_intermediates=capture_intermediates,
        )
        traced = placement.trace_for(mesh, lambda: nnx_api.traced(
            module, args, kwargs, fn="abstract_init", logical_axis_rules=logical_axis_rules,
            record=False))
        variables = traced.variables
    else:
        rngs, inputs = linen_call.split_rngs_argument(args, kwargs, fn="abstract_init")
        call = linen_call.make_call(
            module, rngs, inputs, kwargs, method=method, mutable=mutable, fn="abstract_init",
            init_kwargs=linen_call.init_options(capture_intermediates),
        )
        variables = placement.trace_for(  # shapes only
            mesh, lambda: linen_call.trace(call, record=False)).variables
    if mesh is not None:
        variables = sharding_lib.with_shardings(
            variables, mesh, partition_rules=partition_rules,
            logical_axis_rules=logical_axis_rules, allow_unused_rules=allow_unused_rules,
            require_rules=require_rules,
        )
    return variables if traced is None else nnx_trace.build_module(traced, variables)
