"""Compiled initializers (``flax`` and ``initializer`` leaves): one function per program.

Each leaf with a static recipe runs a small jit-compiled function, cached by its
*program* (what it computes for this leaf: its jaxpr, literal and small constant values;
see ``programs``) and the leaf's sharding, so a 48-layer model compiles about as many
functions as a 2-layer one, and an initializer that computes anything else is never
served another's code. Each folds its leaf's static fold value into its stream's root
key inside that compiled function, exactly as the framework derives the key (for a
stacked leaf, after splitting it per layer: ``draw.keys.leaf_key``). Large random leaves
are drawn in chunks (``draw.chunked``), and leaves on one CPU device flat (``draw.flat``).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib
from flaxlazy._src import compile_context
from flaxlazy._src import programs
from flaxlazy._src.draw import chunked
from flaxlazy._src.draw import flat
from flaxlazy._src.draw import keys as keys_lib
from flaxlazy._src.sources import kinds


def _single_device(sharding: Any) -> bool:
    if sharding is None:
        return True
    mesh = getattr(sharding, "mesh", None)  # an AbstractMesh (inspect) has no devices
    return mesh.size == 1 if mesh is not None else len(sharding.device_set) == 1


def _leaf_fn(leaf: Any):
    """The compiled ``g(root, hash, consts)``: the leaf's program on ``fold_in(root, hash)``.

    The leaf's key is derived inside its own compiled function, so the compiled code
    depends on the program alone, never on how many leaves the model has. Large random
    leaves are drawn in chunks.
    """
    program, layers = leaf.program, leaf.layers

    def make():
        run = programs.runner(program, _chunked_draw(leaf))

        def keyed(root, key_hash, runtime):
            if key_hash is None:
                return run(runtime)
            return run(runtime, keys_lib.leaf_key(root, key_hash, layers))

        return jax.jit(keyed, out_shardings=leaf.sharding)

    return cache_lib.EXECUTABLES.get(compile_key(leaf), make,
                                     nbytes=_cost(program.jaxpr.consts, program.baked))


def _large(leaf: Any) -> bool:
    """Whether a leaf (or, sharded, one device's shard) is large enough to draw in chunks."""
    if _single_device(leaf.sharding):
        return math.prod(leaf.shape) > chunked.MIN_ELEMENTS
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) > chunked.SHARD_MIN_ELEMENTS


def _chunked_draw(leaf: Any) -> Any:
    """The block-by-block draw of a large random leaf (each device its own shard), or
    None to draw it whole (small, not chunkable, or chunking unsound here)."""
    if leaf.key is None or leaf.layers or not _large(leaf):
        return None
    if not _compat.chunking_ok():  # checked once, and only once a leaf is large
        return None
    program = leaf.program
    try:
        if _single_device(leaf.sharding):
            return chunked.chunked_jaxpr(program.jaxpr, leaf.shape, leaf.dtype)
        return chunked.sharded_chunked_jaxpr(program.jaxpr, leaf.shape, leaf.dtype,
                                             leaf.sharding)
    except chunked.NotChunkable:
        return None


def compile_key(leaf: Any) -> Any:
    """The compiled-function cache key of a ``"flax"``/``"initializer"`` leaf (None: never
    cached): its program, its placement, and the context it compiles under (the ambient
    mesh and the PRNG configuration of the moment: the chunked draw is chosen for it)."""
    if leaf.program.key is None:
        return None
    return ("leaf", leaf.program.key, leaf.layers, leaf.sharding, compile_context.key())


def _cost(consts: Sequence[Any], baked: Sequence[bool]) -> int:
    """Estimated bytes a compiled function holds: executable overhead + baked constants."""
    return cache_lib.EXECUTABLE_BYTES + sum(
        np.asarray(c).nbytes for c, b in zip(consts, baked, strict=True) if b
    )


def _filled(leaf: Any, value: Any, default: Any) -> jax.Array:
    """A leaf filled with one scalar, built shard by shard on the host: no compilation
    (``jnp.zeros`` would compile a broadcast per shape) and no full copy on any device."""
    dtype = np.dtype(leaf.dtype)
    sharding = leaf.sharding or default
    if sharding is None:
        return jax.device_put(np.full(leaf.shape, value, dtype))

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


def _fusable(leaf: Any, key: Any, counts: collections.Counter, cold: bool) -> bool:
    """Whether a leaf's compiled function would serve it alone this call and is not
    cached yet (a one-off program drawn whole on one device): such leaves are compiled
    together, as one executable, which costs less than compiling them apart."""
    return (
        key is not None and counts[key] == 1 and (cold or key not in cache_lib.EXECUTABLES)
        and _single_device(leaf.sharding) and not _large(leaf)
    )


def _groups(plan: Any, indices: list[int], *, cold: bool = False
            ) -> tuple[list[int], list[int]]:
    """``(fused, alone)``: the leaves compiled together, and those run one by one.

    ``cold``: as with an empty cache (what a fresh process does).
    """
    keys = {i: compile_key(plan.leaves[i]) for i in indices}
    counts = collections.Counter(keys.values())
    fused = [i for i in indices if _fusable(plan.leaves[i], keys[i], counts, cold)]
    if len(fused) < 2:
        fused = []
    chosen = set(fused)
    return fused, [i for i in indices if i not in chosen]


def _flat(leaf: Any) -> flat.Transform | None:
    """The leaf's transform if it is drawn flat (``draw.flat``) when its root key allows it:
    one layer's, for a leaf stacked per layer."""
    layer = flat.one_layer(leaf)
    if math.prod(layer.shape) < flat.MIN_ELEMENTS or not flat.on_one_cpu(leaf.sharding):
        return None
    t = flat.transform(layer)
    return None if t is None or (t.split and leaf.layers) else t  # (one split level)


def cold_compiles(plan: Any, indices: list[int]) -> int:
    """How many functions ``execute`` compiles for these leaves with an empty cache (and
    concrete threefry keys)."""
    coded = [i for i in indices if fill(plan.leaves[i]) is None]
    drawn_flat = {i for i in coded if _flat(plan.leaves[i]) is not None}
    fused, alone = _groups(plan, [i for i in coded if i not in drawn_flat], cold=True)
    keys = [compile_key(plan.leaves[i]) for i in alone]
    return (flat.cold_compiles([plan.leaves[i] for i in drawn_flat]) + int(bool(fused))
            + len({k for k in keys if k is not None}) + keys.count(None))


def _fused_fn(leaves: list[Any], keys: list[Any]):
    """One compiled ``g(roots, hashes, runtimes) -> [leaf values]`` for several leaves."""
    runs = [programs.runner(leaf.program) for leaf in leaves]
    layers = [leaf.layers for leaf in leaves]

    def make():
        def fused(roots, hashes, runtimes):
            return [
                run(runtime) if key_hash is None
                else run(runtime, keys_lib.leaf_key(root, key_hash, stack))
                for run, root, key_hash, runtime, stack in zip(
                    runs, roots, hashes, runtimes, layers, strict=True)
            ]

        return jax.jit(fused, out_shardings=[leaf.sharding for leaf in leaves])

    nbytes = sum(_cost(leaf.program.jaxpr.consts, leaf.program.baked) for leaf in leaves)
    return cache_lib.EXECUTABLES.get(("fused", tuple(keys)), make, nbytes=nbytes)


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Each leaf from its compiled function, keyed from its stream's root; constant
    fills (zeros, ones) are placed without compiling anything, random leaves on one CPU
    device are drawn flat by kernels shared across shapes, and one-off programs not
    compiled yet are compiled together."""
    out = {}
    coded = []

    def args(leaf):
        key_hash = None if leaf.key is None else np.uint32(leaf.key)
        root = context.roots[leaf.stream] if key_hash is not None else None
        return root, key_hash, leaf.program.runtime_consts

    default = context.home()
    roots: dict = {}  # (stream, layers, pre-fold) -> the data each layer's key folds from
    drawn: dict[int, flat.Job] = {}
    for i in indices:
        leaf = plan.leaves[i]
        if (value := fill(leaf)) is not None:
            out[i] = _filled(leaf, value, default)
        elif (transform := _flat(leaf)) is not None and flat.usable(
            root := context.roots[leaf.stream]
        ):
            layers, pre_fold, fold = flat.derivation(leaf, transform)
            where = (leaf.stream, layers, pre_fold)
            if where not in roots:
                roots[where] = flat.layer_roots(root, layers, pre_fold)
            drawn[i] = flat.Job(leaf, roots[where], np.uint32(fold), transform.program,
                                leaf.sharding or default)
        else:
            coded.append(i)
    out.update(zip(drawn, flat.draw_all(list(drawn.values())), strict=True))

    fused, alone = _groups(plan, coded)
    if fused:
        leaves = [plan.leaves[i] for i in fused]
        roots, hashes, runtimes = zip(*(args(leaf) for leaf in leaves), strict=True)
        values = _fused_fn(leaves, [compile_key(leaf) for leaf in leaves])(
            list(roots), list(hashes), list(runtimes))
        out.update(zip(fused, values, strict=True))
    for i in alone:
        out[i] = _leaf_fn(plan.leaves[i])(*args(plan.leaves[i]))
    return out
