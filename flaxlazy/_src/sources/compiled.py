"""Compiled initializers (``flax`` and ``initializer`` leaves): one function per program.

Each leaf with a static recipe runs a small jit-compiled function, cached by its
*program* (what it computes for this leaf: its jaxpr, literal and small constant values;
see ``programs``) and the leaf's sharding, so a 48-layer model compiles about as many
functions as a 2-layer one, and an initializer that computes anything else is never
served another's code. Each folds its leaf's static fold value into its stream's root
key inside that compiled function, exactly as the framework derives the key. Large
random leaves are drawn in chunks (``chunked``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib
from flaxlazy._src import chunked
from flaxlazy._src import programs
from flaxlazy._src.sources import kinds

# A jit-compiled CPU initializer with its wrapper holds about 2-3 MiB (measured: 100
# distinct lecun_normal draws kept alive add 3.0 MiB each); the byte bound counts this
# per entry, plus the constants baked into it.
_EXECUTABLE_BYTES = 5 << 19  # 2.5 MiB

# Compiled functions by program and placement; bounded by count and estimated bytes
# (about 100 initializers: far more signatures than one model has).

# Compiled functions by program and placement; bounded by count and estimated bytes
# (about 100 initializers: far more signatures than one model has).
_COMPILED = cache_lib.LRU(256, max_bytes=256 << 20)

def _single_device(sharding: Any) -> bool:
    return sharding is None or len(sharding.device_set) == 1

def _leaf_fn(leaf: Any):
    """The compiled ``g(root, hash, consts)``: the leaf's program on ``fold_in(root, hash)``.

    The leaf's key is derived inside its own compiled function, so the compiled code
    depends on the program alone, never on how many leaves the model has. Large random
    leaves are drawn in chunks.
    """
    program = leaf.program

    def make():
        run = programs.runner(program, _chunked_draw(leaf))

        def keyed(root, key_hash, runtime):
            if key_hash is None:
                return run(runtime)
            return run(runtime, jax.random.fold_in(root, key_hash))

        return jax.jit(keyed, out_shardings=leaf.sharding)

    return _COMPILED.get(compile_key(leaf), make,
                         nbytes=_cost(program.jaxpr.consts, program.baked))

def _chunked_draw(leaf: Any) -> Any:
    """The block-by-block draw of a large random leaf (each device its own shard), or
    None to draw it whole (small, not chunkable, or chunking unsound here)."""
    if leaf.key is None or not _compat.chunking_ok():
        return None
    program = leaf.program
    try:
        if _single_device(leaf.sharding):
            if math.prod(leaf.shape) > chunked.MIN_ELEMENTS:
                return chunked.chunked_jaxpr(program.jaxpr, leaf.shape, leaf.dtype)
        elif math.prod(leaf.sharding.shard_shape(leaf.shape)) > chunked.SHARD_MIN_ELEMENTS:
            return chunked.sharded_chunked_jaxpr(program.jaxpr, leaf.shape, leaf.dtype,
                                                 leaf.sharding)
    except chunked.NotChunkable:
        pass
    return None


def compile_key(leaf: Any) -> Any:
    """The compiled-function cache key of a ``"flax"``/``"initializer"`` leaf (None: never
    cached): its program, its placement, and the PRNG configuration of the moment (the
    chunked draw is chosen for it)."""
    if leaf.program.key is None:
        return None
    config = (jax.config.jax_threefry_partitionable, jax.config.jax_enable_x64)
    return ("leaf", leaf.program.key, leaf.sharding, config)

def _cost(consts: Sequence[Any], baked: Sequence[bool]) -> int:
    """Estimated bytes a compiled function holds: executable overhead + baked constants."""
    return _EXECUTABLE_BYTES + sum(
        np.asarray(c).nbytes for c, b in zip(consts, baked, strict=True) if b
    )


def _filled(leaf: Any, value: Any) -> jax.Array:
    """A leaf filled with one scalar, built shard by shard on the host: no compilation
    (``jnp.zeros`` would compile a broadcast per shape) and no full copy on any device."""
    sharding = leaf.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dtype = np.dtype(leaf.dtype)

    def shard(index):
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=True))
        return np.full(shape, value, dtype)

    return jax.make_array_from_callback(tuple(leaf.shape), sharding, shard)


def fill(leaf: Any) -> Any:
    """The scalar a ``flax``/``initializer`` leaf is filled with (zeros, ones...), when it
    needs no compiled code at all; None when it runs a compiled function."""
    if _compat.is_key_array(leaf):
        return None
    return programs.fill_value(leaf.program)


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Each leaf from its compiled function, keyed from its stream's root; constant
    fills (zeros, ones) are placed without compiling anything."""
    out = {}
    for i in indices:
        leaf = plan.leaves[i]
        if (value := fill(leaf)) is not None:
            out[i] = _filled(leaf, value)
            continue
        key_hash = None if leaf.key is None else np.uint32(leaf.key)
        out[i] = _leaf_fn(leaf)(
            context.roots[leaf.stream] if key_hash is not None else None, key_hash,
            leaf.program.runtime_consts,
        )
    return out
