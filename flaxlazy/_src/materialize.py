"""Materialization: the real variables, compiled and placed, equal to ``module.init``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from flaxlazy._src import engine
from flaxlazy._src import entrances
from flaxlazy._src import placement
from flaxlazy._src import plan as plan_lib
from flaxlazy._src.linen import call as linen_call


def materialize(
    module: nn.Module | Callable[..., Any],
    *args: Any,
    initializers: Any = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Any = None,
    logical_axis_rules: Any = None,
    allow_unused_rules: bool = False,
    require_rules: bool | None = None,
    method: Callable[..., Any] | str | None = None,
    mutable: Any = linen_call.DEFAULT_MUTABLE,
    capture_intermediates: bool | Callable[..., bool] = False,
    **kwargs: Any,
) -> Any:
    """Creates the variables ``module.init(rngs, *inputs, **kwargs)`` would, compiled.

    For Flax NNX, ``materialize(GPT, *args, rngs=nnx.Rngs(0), **kwargs)`` returns the
    module ``GPT(*args, rngs=..., **kwargs)`` would construct, its values (RNG state
    included) bit-for-bit those of ``nnx.jit(lambda: GPT(...))()``, and leaves the
    caller's ``nnx.Rngs`` as the constructor would; the options below work the same way,
    on NNX state paths (``blocks/0/mlp/kernel``; other variables by collection,
    ``batch_stats/bn/mean``).

    The init is first traced abstractly (no FLOPs, no memory), then each variable is
    created by jit-compiled code directly on ``device``: parameters with a static recipe
    by a small compiled initializer shared by every parameter of the same signature
    (flat compile time in depth), the rest by one compiled run of ``module.init`` pruned
    to them. Values equal ``module.init``'s for the same key, except where
    ``initializers`` overrides them.

    Inputs may be abstract specs. Values that depend on input *data* (data-dependent
    init) need concrete inputs: with a spec in their place, ``materialize`` raises a
    ``ValueError`` naming the variables, rather than initializing them from zeros.

    Args:
      module: a Flax Linen module, or an NNX Module class (or any function returning
        an NNX module).
      *args: Linen: ``rngs``, a PRNG key or a dict of keys (``{"params": k1, "dropout":
        k2}``; also accepted as ``rngs=``), then the inputs, pytrees mixing arrays,
        ``ShapeDtypeStruct``s and Python values. NNX: the constructor's arguments
        (arrays among them may be specs), ``rngs=nnx.Rngs(...)`` among them.
      initializers: an initializer tree keyed by path inside ``params``: a mapping or
        list of ``(pattern, value)`` (glob with ``*``/``**``, or a compiled regex; first
        match wins) or a nested dict mirroring the params tree. A value is an
        initializer ``(key, shape, dtype) -> Array``, an array of the parameter's shape
        and dtype (used as is), or None (keep the module's own initializer). For
        ``nn.scan``/``nn.vmap``-stacked parameters the initializer draws each layer's
        slice as that layer's own parameter. Each overridden parameter gets its own
        key: the root ``params`` key with a hash of its path folded in.
      device: a ``jax.Device`` or a ``jax.sharding.Sharding`` for every leaf (default:
        JAX's default device).
      shardings: instead of ``device``: a ``jax.sharding.Sharding`` for every leaf, or a
        pytree prefix of shardings matching the variables tree.
      mesh: instead of ``device``: a ``jax.sharding.Mesh``; each leaf's
        ``PartitionSpec`` comes from ``partition_rules`` and the Flax partitioning
        annotations (see ``flaxlazy.shardings``), and the leaf is created directly in
        its shards: no device ever holds a full copy of a sharded parameter.
      partition_rules: with ``mesh``: ``[(pattern, PartitionSpec)]``, same patterns as
        ``initializers`` (first match wins, explicit rules override annotations);
        leaves outside ``params`` are matched with their collection, e.g.
        ``"batch_stats/**"``.
      logical_axis_rules: with ``mesh``: ``[(logical_name, mesh_axis)]`` for
        ``nn.with_logical_partitioning`` annotations, as in Flax.
      allow_unused_rules: accept partition rules that match no leaf (shared rule sets).
      require_rules: with ``mesh``: whether every leaf (of rank >= 1) must be covered
        by a partition rule or a Flax annotation. Default (None): required exactly when
        ``partition_rules`` are given; without rules, unannotated leaves are replicated,
        as in Flax (``nn.get_partition_spec`` + ``nn.logical_to_mesh_sharding``).
      method: as in ``Module.init``.
      mutable: as in ``Module.init``.
      capture_intermediates: as in ``Module.init``.
      **kwargs: keyword inputs, like ``inputs`` (NNX: the constructor's keywords).

    Returns:
      The same variables tree as ``module.init``, with ``jax.Array`` leaves; for NNX,
      the module.

    Raises:
      ValueError: an initializer pattern matching no parameter (with the closest real
        paths), a value of the wrong shape or dtype, or a data-dependent variable whose
        input was given as a spec.
      TypeError: a malformed argument.

    Examples:
      >>> import jax, flax.linen as nn, flaxlazy
      >>> model = nn.Dense(3)
      >>> key = jax.random.key(0)
      >>> variables = flaxlazy.materialize(
      ...     model, key, flaxlazy.spec("f32[8,5]"),
      ...     initializers={"bias": nn.initializers.ones})
      >>> variables["params"]["bias"]
      Array([1., 1., 1.], dtype=float32)
      >>> reference = model.init(key, jax.numpy.zeros((8, 5)))
      >>> bool((variables["params"]["kernel"] == reference["params"]["kernel"]).all())
      True
    """
    place = placement.Placement.from_args(
        fn="materialize", device=device, shardings=shardings, mesh=mesh,
        partition_rules=partition_rules, logical_axis_rules=logical_axis_rules,
        allow_unused_rules=allow_unused_rules, require_rules=require_rules,
    )
    return run("materialize", module, args, kwargs, place=place, initializers=initializers,
               options=dict(method=method, mutable=mutable,
                            capture_intermediates=capture_intermediates))


def run(fn: str, module: Any, args: tuple, kwargs: dict, *, place: placement.Placement,
        initializers: Any = None, options: dict | None = None) -> Any:
    """``materialize``'s pipeline for a public function ``fn`` (named in its errors): the
    target's entrance traces the call, the plan places each leaf as ``place`` says, the
    engine creates them."""
    entrance = entrances.find(module, fn=fn)
    with entrance.session(False):
        traced = entrance.trace(module, args, kwargs, fn=fn, placement=place,
                                abstract=False, options=options or {})
        plan = plan_lib.build(traced.records, initializers=initializers,
                              shardings=place.for_plan(traced.variables))
        return traced.build(engine.execute(plan, traced.keys, traced.inputs))
