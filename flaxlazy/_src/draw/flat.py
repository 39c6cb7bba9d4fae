"""Flat draws: random leaves of every shape from compiled code shared across shapes.

On a model with many parameter shapes (ResNet-50 has 46), compiling an initializer per
shape is most of a cold start: each compile generates the threefry hash and the
initializer's arithmetic again, for one shape. But with the partitionable threefry,
element ``i`` of a random leaf depends on its key and ``i`` alone (see ``chunked``), so a
leaf is drawn here as flat blocks of ``BLOCK`` elements by two compiled kernels:

1. ``bits(data, fold, start)``: the threefry halves of flat indices
   ``[start, start + BLOCK)`` under ``fold_in(root, fold)``, the leaf's key, ``root`` given
   by its ``uint32[2]`` key data (typed and raw keys alike). One compiled function serves
   every random leaf.
2. the leaf's *transform*: its initializer's jaxpr after ``random_bits``, re-expressed on
   one block of those bits (uniform -> normal -> truncation -> scaling), literals and all
   (``chunked.from_bits``). It is traced to a ``Program`` and compiled once per program
   key, so it is shared by every leaf whose initializer computes exactly the same thing,
   whatever the leaf's shape: every ``normal(0.02)`` leaf of a GPT, every ``he_normal``
   kernel with one fan-in. Initializers that differ in any literal (a fan-in's scale)
   get their own, since XLA folds literals differently from run-time scalars.

A leaf stacked by ``nn.scan``/``nn.vmap`` with a key per layer is drawn layer by layer,
each from its layer's key (``layer_roots``), by the same kernels: one layer's transform
serves every layer.

The blocks are copied into an aligned host buffer of the leaf's shape, which becomes the
device array without another copy. So this serves leaves placed on one CPU device, drawn
outside any trace; the others run one compiled function per program
(``sources.compiled``).
A call's blocks, of all its leaves, are shared out among the CPU cores (``draw_all``;
the buffers and threads are in ``host``).
Values are bit-identical to the leaf's whole draw.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib
from flaxlazy._src import compile_context
from flaxlazy._src import programs
from flaxlazy._src.draw import chunked
from flaxlazy._src.draw import host

# Elements per block: large enough that dispatch is a small share of a block's work,
# small enough that a small leaf's rounding up to one block costs well under 1 ms.
BLOCK = 1 << 16
# Smaller leaves run their own compiled function (``compiled``): a whole block for a few
# elements would cost more than the dispatch it saves, and tiny programs compile fast.
MIN_ELEMENTS = BLOCK // 64
# Blocks in flight per thread while earlier ones are copied out (overlaps XLA work and
# copies).
_WINDOW = 2
# Elements a drawing thread takes at a time: small enough to share a leaf among threads,
# large enough that taking one costs nothing next to drawing it.
_UNIT = 16 * BLOCK

# (program key, shape, dtype) -> the ``Transform``, or None (not drawn flat). An
# entry with its key holds about 36 KiB of Python objects (measured with tracemalloc);
# every model in a sweep of distinct shapes adds entries, so the bound is what a few
# models' distinct random leaves need (ResNet-50 has 46 shapes), not more.
_TRANSFORMS = cache_lib.LRU(256)


class Transform(NamedTuple):
    """A leaf's transform, and how the keys of its blocks derive from its key.

    Attributes:
      program: bits block -> values block (``chunked.from_bits``), traced and keyed.
      split: ``(n, count)`` when the leaf's program splits its key ``n`` ways and draws
        layer ``i`` from ``fold_in(split(key, n)[i], count)`` (``chunked.layer_split``:
        a parameter stacked by ``nnx.vmap`` over ``nnx.split_rngs``); else None, and the
        leaf is drawn from its key itself.
    """

    program: programs.Program
    split: tuple[int, int] | None = None


def transform(leaf: Any) -> Transform | None:
    """The leaf's transform, or None when its initializer is not random bits followed by
    elementwise arithmetic on its own key (or on per-layer keys split from it), or
    captures large constants (passed at run time, so not keyed by value)."""
    program = leaf.program
    if leaf.key is None or not all(program.baked) or programs.leaked_tracers(program):
        return None

    def make():
        split = chunked.layer_split(program.jaxpr)
        try:
            g = chunked.from_bits(program.jaxpr, leaf.shape, leaf.dtype,
                                  split[0] if split else 0)
            spec = jax.ShapeDtypeStruct((BLOCK,), np.uint32)
            consts = list(program.jaxpr.consts)  # small: baked into the transform's key
            return Transform(programs.trace(lambda b1, b2: g(b1, b2, consts), spec, spec),
                             split)
        except chunked.NotChunkable:
            return None

    key = None if program.key is None else (program.key, tuple(leaf.shape), str(leaf.dtype),
                                            compile_context.key())
    return _TRANSFORMS.get(key, make)


def derivation(leaf: Any, t: Transform) -> tuple[tuple[int, ...], int | None, int]:
    """``(layers, pre_fold, fold)``: how a flat-drawn leaf's blocks are keyed from its
    stream's root: each layer's root is ``layer_roots(root, layers, pre_fold)``, and its
    blocks' bits are drawn under ``fold_in(that root, fold)``."""
    if t.split is not None:
        return (t.split[0],), leaf.key, t.split[1]
    return tuple(leaf.layers), None, leaf.key


def one_layer(leaf: Any) -> Any:
    """One layer of a leaf stacked per layer (``plan.Leaf.layers``): its shape and its
    program; the leaf itself when it is not stacked so."""
    if not leaf.layers:
        return leaf
    return leaf._replace(shape=tuple(leaf.shape[len(leaf.layers):]), program=leaf.layer,
                         layers=(), layer=None)


def layer_roots(root: Any, layers: tuple[int, ...], pre_fold: int | None = None
                ) -> list[np.ndarray]:
    """The threefry key data (``uint32[2]``) of every layer's key, row-major: of ``root``
    itself without layers. ``pre_fold``: split ``fold_in(root, pre_fold)`` instead.

    With the partitionable threefry, ``jax.random.split(k, n)`` is the threefry halves of
    counters ``0..n-1`` under ``k``: the bits kernel, unfolded, computes them (folded by
    ``pre_fold`` first, when given), so a new number of layers compiles nothing (the
    kernel's known-answer checks cover both).
    """
    rows = [_key_data(root)]
    bits = _bits_fn()
    for level, n in enumerate(layers):
        fold = pre_fold if level == 0 else None
        split = []
        for data in rows:
            for start in range(0, n, BLOCK):
                halves = bits(data, np.uint32(fold or 0), np.uint32(start), fold is not None)
                stop = min(BLOCK, n - start)
                split.extend(np.stack([np.asarray(h)[:stop] for h in halves], axis=1))
        rows = split
    return rows


def _key_data(root: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(root) if _compat.is_key_array(root) else root)


def on_one_cpu(sharding: Any) -> bool:
    """Whether a leaf with this placement lives on one CPU device (None: the default)."""
    if sharding is None:
        return (jax.config.jax_default_device is None
                and jax.local_devices()[0].platform == "cpu")
    mesh = getattr(sharding, "mesh", None)
    if isinstance(mesh, jax.sharding.AbstractMesh):  # inspect: no devices, one platform
        device = getattr(mesh, "abstract_device", None)
        platform = getattr(device, "platform", None) or jax.default_backend()
        return mesh.size == 1 and platform == "cpu"
    devices = sharding.device_set
    device = next(iter(devices))
    return (len(devices) == 1 and device.platform == "cpu"
            and device.process_index == jax.process_index())


def usable(root: Any) -> bool:
    """Whether leaves keyed from ``root`` can be drawn flat now: a concrete threefry key
    (typed, or raw ``uint32[2]``) outside any trace, with the partitionable threefry, and
    a bits kernel that gives JAX's own bits here."""
    if isinstance(root, jax.core.Tracer) or not _compat.trace_state_clean():
        return False
    if _compat.is_key_array(root):
        if root.shape or jax.random.key_impl(root) != "threefry2x32":
            return False
    elif (getattr(root, "shape", None) != (2,) or getattr(root, "dtype", None) != np.uint32
          or jax.config.jax_default_prng_impl != "threefry2x32"):
        return False
    return jax.config.jax_threefry_partitionable and _bits_fn() is not None


# JAX's own ``jax.random.bits(jax.random.fold_in(root, 7), (3, 65536))`` at some flat
# indices, for ``root`` = ``key(0)`` or ``PRNGKey(0)`` (tests/test_flat.py keeps them equal
# to JAX's). The bits kernel must reproduce them before it draws any leaf; if JAX ever
# draws bits another way, leaves go back to one compiled function per program.
_KNOWN_BITS = {0: 2040308410, 1: 309011329, 65535: 1239075684, 65536: 627736269,
               196607: 3546213224}


# JAX's own ``jax.random.split(key(0), 3)`` (key data): the bits kernel, unfolded, must
# reproduce them too.
_KNOWN_SPLIT = ((1797259609, 2579123966), (928981903, 3453687069), (4146024105, 2718843009))


def _bits_fn():
    """The compiled ``bits(data, fold, start, folded)`` or None if it fails the
    known-answer checks: the threefry halves of flat indices ``[start, start + BLOCK)``
    under the key with data ``data`` (``uint32[2]``), ``fold`` folded in first if
    ``folded``."""

    def make():
        def bits(data, fold, start, folded):
            key = jax.random.wrap_key_data(data, impl="threefry2x32")
            # fold_in as the leaf's own compiled function does
            key = jax.random.wrap_key_data(
                jnp.where(folded, jax.random.key_data(jax.random.fold_in(key, fold)), data),
                impl="threefry2x32")
            return chunked.threefry(key, lax.iota(np.uint32, BLOCK) + start)

        scalar = jax.ShapeDtypeStruct((), np.uint32)
        fn = jax.jit(bits).lower(jax.ShapeDtypeStruct((2,), np.uint32), scalar, scalar,
                                 jax.ShapeDtypeStruct((), np.bool_)).compile()
        known = _key_data(jax.random.key(0, impl="threefry2x32"))
        for index, want in _KNOWN_BITS.items():
            start = index - index % BLOCK
            halves = fn(known, np.uint32(7), np.uint32(start), True)
            got = np.asarray(halves[0])[index - start] ^ np.asarray(halves[1])[index - start]
            if int(got) != want:
                return None
        halves = fn(known, np.uint32(0), np.uint32(0), False)
        split = np.stack([np.asarray(h)[:len(_KNOWN_SPLIT)] for h in halves], axis=1)
        if split.tolist() != [list(row) for row in _KNOWN_SPLIT]:
            return None
        return fn

    return cache_lib.EXECUTABLES.get(_bits_key(), make, nbytes=cache_lib.EXECUTABLE_BYTES)


def _bits_key() -> tuple:
    return ("bits", BLOCK, compile_context.key())


def _transform_key(program: programs.Program) -> Any:
    return None if program.key is None else ("transform", program.key, compile_context.key())


def _transform_fn(program: programs.Program):
    run = programs.runner(program)

    def make():  # compiled now, on this thread (see ``draw_all``)
        block = jax.ShapeDtypeStruct((BLOCK,), np.uint32)
        return jax.jit(lambda b1, b2: run([], b1, b2)).lower(block, block).compile()

    return cache_lib.EXECUTABLES.get(_transform_key(program), make,
                                     nbytes=cache_lib.EXECUTABLE_BYTES)


class Job(NamedTuple):
    """One leaf to draw flat.

    Attributes:
      leaf: the plan's leaf (its shape and dtype).
      roots: the data of the key each layer's key is folded from (``layer_roots``; one
        for a leaf that is not stacked).
      fold: the leaf's fold value.
      program: one layer's ``transform``.
      sharding: one device, or None: the default device, uncommitted.
    """

    leaf: Any
    roots: list
    fold: np.uint32
    program: programs.Program
    sharding: Any = None


def draw_all(jobs: list[Job]) -> list[jax.Array]:
    """Each job's leaf, drawn block by block into its host buffer and placed.

    The blocks are shared out among the CPU cores (``host.share_out``): XLA runs a kernel
    on the calling thread, without the GIL, so threads dispatching blocks side by side
    draw about 1.5x faster on two cores. Every kernel is compiled here, on the calling
    thread, before any worker starts (compiling on other threads grows memory: malloc
    arenas per compiling thread), and each block is a pure function of its key and flat
    index, so the values do not depend on which thread drew them.
    """
    if not jobs:
        return []
    bits = _bits_fn()
    outs, units = [], []
    for job in jobs:
        values = _transform_fn(job.program)
        n = math.prod(job.leaf.shape)
        per_layer = n // len(job.roots)
        out, populate = host.aligned_empty(n, job.leaf.dtype)
        outs.append(out)
        for layer, root in enumerate(job.roots):
            for lo in range(0, per_layer, _UNIT):
                units.append((out, populate, layer * per_layer, root, job.fold, values,
                              lo, min(lo + _UNIT, per_layer)))
    host.share_out(units, functools.partial(_draw_units, bits))
    return [jax.device_put(out.reshape(job.leaf.shape), job.sharding)
            for out, job in zip(outs, jobs, strict=True)]


def _draw_units(bits: Any, take: Any) -> None:
    """Draws the units ``take()`` hands out (until None), a window of blocks in flight
    while earlier ones are copied into their buffers."""
    pending: collections.deque = collections.deque()

    def copy_out():
        out, offset, stop, block = pending.popleft()
        out[offset:offset + stop] = np.asarray(block)[:stop]

    while (unit := take()) is not None:
        out, populate, base, root, fold, values, lo, hi = unit
        if populate is not None:
            populate(base + lo, base + hi)
        for start in range(lo, hi, BLOCK):
            block = values(*bits(root, fold, np.uint32(start), True))
            pending.append((out, base + start, min(BLOCK, hi - start), block))
            if len(pending) > _WINDOW:
                copy_out()
    while pending:
        copy_out()


def cold_compiles(leaves: list[Any]) -> int:
    """How many kernels drawing these leaves flat compiles with empty caches."""
    keys = [transform(one_layer(leaf)).program.key for leaf in leaves]
    return int(bool(leaves)) + len({k for k in keys if k is not None}) + keys.count(None)

