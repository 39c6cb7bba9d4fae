"""Drawing a large random leaf chunk by chunk, bit-identical to drawing it whole.

``jax.random`` with the partitionable threefry (JAX's default) makes element ``i`` of a
random array a pure function of the key and ``i``: its bits are
``threefry2x32(key, hi(i), lo(i))``, and everything after (uniform -> normal ->
truncation -> scaling) is elementwise. Compiled whole, a 50257x1024 f32 initializer
still needs ~3x its output in temporaries (counters, bit halves). Here the initializer's
jaxpr is re-evaluated one flat block of elements at a time inside a ``fori_loop`` that
writes each block into the output buffer, so the temporaries are one block's.

Any initializer whose jaxpr is ``random_bits`` followed by elementwise arithmetic (with
scalar constants) qualifies: ``normal``, ``uniform``, ``truncated_normal``,
``variance_scaling`` and its ``lecun``/``glorot``/``he`` forms, and user initializers
written the same way. Anything else raises ``NotChunkable`` and is drawn whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxlazy._src import _compat
from flaxlazy._src import programs

# Leaves with more elements than this are drawn in chunks of CHUNK_ELEMENTS.
MIN_ELEMENTS = 1 << 20
CHUNK_ELEMENTS = 1 << 18
# A sharded leaf is drawn in chunks when one device's shard has more elements than this.
SHARD_MIN_ELEMENTS = 1 << 20

_ELEMENTWISE = frozenset(
    """abs add and atan2 bitcast_convert_type cbrt ceil clamp convert_element_type copy
    copy_p cos div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite
    le log log1p logistic lt max min mul ne neg nextafter not or pow rem round rsqrt
    select_n shift_left shift_right_arithmetic shift_right_logical sign sin sqrt square
    stop_gradient sub tan tanh xor""".split()
)
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"})
_KEY_USES = frozenset({"random_bits", "random_wrap"}) | _CALLS


class NotChunkable(Exception):
    """The initializer is not ``random_bits`` + elementwise ops; draw it whole."""


class _Block:
    """A full-shape value, held as the current flat block of its elements."""

    __slots__ = ("value",)

    def __init__(self, value: jax.Array):
        self.value = value


class KeyToken:
    """Stands for the initializer's key where only its threefry bits are given
    (``from_bits``): any use of the key other than drawing bits is ``NotChunkable``."""


KEY = KeyToken()
SPLIT_KEYS = KeyToken()  # ``split(KEY, n)``, in a layered ``from_bits``
LAYER_KEY = KeyToken()  # each layer's key: ``SPLIT_KEYS`` folded by the known count
_THREEFRY = "threefry2x32"


def threefry(key: jax.Array, counters: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two threefry2x32 halves ``jax.random`` draws at flat indices ``counters``."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape:
        raise NotChunkable("random_bits on a batch of keys")
    if jax.random.key_impl(key) != jax.random.key_impl(jax.random.key(0, impl=_THREEFRY)):
        raise NotChunkable("not a threefry2x32 key")
    data = jax.random.key_data(key)
    lo = counters
    hi = jnp.zeros_like(lo)
    bits1, bits2 = _compat.threefry2x32_p.bind(data[0], data[1], hi, lo)
    return bits1, bits2


def combine(bits1: jax.Array, bits2: jax.Array, bit_width: int) -> jax.Array:
    """``random_bits`` of ``bit_width`` from the two threefry halves, as JAX combines them."""
    if bit_width == 64:
        return (bits1.astype(np.uint64) << np.uint64(32)) | bits2.astype(np.uint64)
    bits = bits1 ^ bits2
    return bits if bit_width == 32 else bits.astype(_compat.uint_dtype(bit_width))


class _Context:
    """The block being drawn: ``counters`` are its elements' flat indices in the leaf."""

    def __init__(self, full_shape: tuple[int, ...], counters: jax.Array):
        self.full_shape = full_shape
        self.counters = counters

    layers = 0

    @property
    def bits_size(self) -> int:
        """The size of the initializer's ``random_bits`` draws."""
        return math.prod(self.full_shape)

    def bits(self, key: Any, bit_width: int) -> jax.Array:
        if isinstance(key, KeyToken):
            raise NotChunkable("no key")
        return combine(*threefry(key, self.counters), bit_width)


class _GivenBits(_Context):
    """A block whose threefry halves are given: of the initializer's own key (``KEY``),
    or, for a leaf drawn per layer from split keys (``layer_split``), of the block's
    layer key (``LAYER_KEY``)."""

    def __init__(self, full_shape: tuple[int, ...], bits1: jax.Array, bits2: jax.Array,
                 layers: int = 0):
        self.full_shape = full_shape
        self.halves = (bits1, bits2)
        self.layers = layers

    @property
    def bits_size(self) -> int:
        return math.prod(self.full_shape) // (self.layers or 1)

    def bits(self, key: Any, bit_width: int) -> jax.Array:
        if key is not (LAYER_KEY if self.layers else KEY):
            raise NotChunkable("random bits of a key derived from the initializer's key")
        return combine(*self.halves, bit_width)


def _full_size(aval: Any, ctx: _Context) -> bool:
    return math.prod(getattr(aval, "shape", ())) == math.prod(ctx.full_shape)


def _size(v: Any) -> int:
    return math.prod(getattr(v.aval, "shape", ()))


def _as_operand(x: Any) -> Any:
    if isinstance(x, _Block):
        return x.value
    if np.size(x) != 1:
        raise NotChunkable("an elementwise operand that is not a scalar")
    return jnp.reshape(x, ())


def _eval(jaxpr: Any, consts: list, args: list, ctx: _Context,
          skip: frozenset = frozenset()) -> list:
    """Evaluates the jaxpr on blocks; ``skip``: indices of equations to leave out."""
    env: dict = {}

    def read(v):
        return v.val if _compat.is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for n, eqn in enumerate(jaxpr.eqns):
        if n in skip:
            continue
        if ctx.layers and eqn.primitive.name == "random_fold_in" and read(
                eqn.invars[0]) is SPLIT_KEYS:
            env[eqn.outvars[0]] = LAYER_KEY  # its counts: checked by ``layer_split``
            continue
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        blocks = any(isinstance(x, _Block) for x in ins)
        if ctx.layers and name == "random_split" and ins[0] is KEY:
            outs = [SPLIT_KEYS]  # (the one split and fold that ``layer_split`` checked)
        elif any(isinstance(x, KeyToken) for x in ins) and name not in _KEY_USES:
            raise NotChunkable(f"primitive {name!r} on the key")
        elif name == "random_wrap" and isinstance(ins[0], KeyToken):
            if getattr(eqn.params["impl"], "name", None) != _THREEFRY:
                raise NotChunkable("not a threefry2x32 key")
            outs = [ins[0]]  # the raw key data, wrapped: still the initializer's key
        elif name == "random_bits":
            if math.prod(eqn.params["shape"]) != ctx.bits_size:
                raise NotChunkable("random bits of another size")  # (a reshape keeps
                # flat indices: element i's bits are the same for any shape of this size)
            outs = [_Block(ctx.bits(ins[0], eqn.params["bit_width"]))]
        elif name in _CALLS:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            closed = sub if _compat.is_closed_jaxpr(sub) else None
            inner = closed.jaxpr if closed else sub
            outs = _eval(inner, closed.consts if closed else [], ins, ctx)
        elif blocks and name in _ELEMENTWISE:
            out = eqn.primitive.bind(*map(_as_operand, ins), **eqn.params)
            outs = [_Block(out)]
        elif blocks and name in programs.SAME_LAYOUT and _full_size(eqn.outvars[0].aval, ctx) and (
            eqn.params.get("dimensions") is None  # a reshape that transposes moves elements
        ):
            if not isinstance(ins[0], _Block):
                raise NotChunkable(f"{name} of a non-random operand")
            outs = [ins[0]]  # row-major flat blocks are unchanged by these
        elif blocks:
            raise NotChunkable(f"primitive {name!r} on a random array")
        elif name in programs.SAME_LAYOUT and np.size(ins[0]) == 1 and _size(eqn.outvars[0]) == 1:
            outs = [ins[0]]  # a scalar as [1, 1] (broadcast to rank): kept a scalar, so
            # blocks of leaves of any rank evaluate the same operations
        elif any(_full_size(v.aval, ctx) for v in eqn.outvars) and math.prod(ctx.full_shape) > 1:
            raise NotChunkable(f"full-size non-random value from {name!r}")
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _draw_block(jaxpr, key, consts, shape, dtype, counters, block_shape) -> jax.Array:
    """The elements at flat indices ``counters`` of the leaf, shaped ``block_shape``."""
    (out,) = _eval(jaxpr, list(consts), [key], _Context(shape, counters))
    if not isinstance(out, _Block):
        raise NotChunkable("the output is not drawn from random bits")
    return out.value.astype(dtype).reshape(block_shape)


def from_bits(closed: Any, shape, dtype, layers: int = 0) -> Callable:
    """An initializer re-expressed on given bits: ``g(bits1, bits2, consts)``.

    ``bits1``, ``bits2`` are the threefry halves (``threefry``) of any flat indices of
    the leaf, as one flat block; ``g`` returns the leaf's elements at those indices, in
    ``dtype``. It needs no key: it is the initializer's arithmetic after ``random_bits``
    alone, the same for every block and every leaf it computes the same thing for.

    With ``layers`` (``layer_split``), the program splits its key that many ways, folds
    a known count into each, and draws each layer from its own key: the halves are then
    those of one layer's key, at flat indices within that layer.

    Args:
      closed: the initializer's closed jaxpr (``fn(key)``).
      shape: the leaf's shape.
      dtype: its dtype.
      layers: the number of layers, or 0.

    Raises:
      NotChunkable: as ``chunked``; also when the key is used for anything but drawing
        bits of the whole leaf (or layer by layer, as above).
    """
    shape = tuple(shape)
    if math.prod(shape) >= 2**32 or not jax.config.jax_threefry_partitionable:
        raise NotChunkable("size or PRNG configuration")
    if len(closed.jaxpr.invars) != 1:
        raise NotChunkable("no key")
    if layers and (math.prod(shape) % layers or layer_split(closed) is None):
        raise NotChunkable("not split per layer")
    jaxpr = closed.jaxpr
    skip = _only_counts(jaxpr) if layers else frozenset()

    def g(bits1, bits2, consts):
        ctx = _GivenBits(shape, bits1, bits2, layers)
        (out,) = _eval(jaxpr, list(consts), [KEY], ctx, skip)
        if not isinstance(out, _Block):
            raise NotChunkable("the output is not drawn from random bits")
        return out.value.astype(dtype)

    return g


def layer_split(closed: Any) -> tuple[int, int] | None:
    """``(n, count)`` when a program's only use of its key is ``split(key, n)`` and its
    only use of those keys is folding the same known ``count`` into each, as
    ``nnx.split_rngs`` and ``nnx.vmap`` give a stacked parameter: layer ``i`` is then
    drawn from ``fold_in(split(key, n)[i], count)``. None for anything else.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def stacked(key):
      ...     keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(jax.random.split(key, 4))
      ...     return jax.vmap(lambda k: jax.random.normal(k, (2, 5)))(keys)
      >>> layer_split(jax.make_jaxpr(stacked)(jax.random.key(0)))
      (4, 3)
    """
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != 1:
        return None
    (key,) = jaxpr.invars
    splits = [e for e in jaxpr.eqns if key in e.invars] + [
        v for v in jaxpr.outvars if v is key]
    if (len(splits) != 1 or getattr(splits[0], "primitive", None) is None
            or splits[0].primitive.name != "random_split"
            or len(splits[0].params["shape"]) != 1):
        return None
    keys = splits[0].outvars[0]
    folds = [e for e in jaxpr.eqns if keys in e.invars] + [
        v for v in jaxpr.outvars if v is keys]
    if (len(folds) != 1 or getattr(folds[0], "primitive", None) is None
            or folds[0].primitive.name != "random_fold_in" or folds[0].invars[0] is not keys):
        return None
    counts = _constant(closed, folds[0].invars[1])
    if counts is None or counts.size == 0 or not (counts == counts.flat[0]).all():
        return None
    return splits[0].params["shape"][0], int(counts.flat[0])


def _only_counts(jaxpr: Any) -> frozenset:
    """The equations that only compute the counts folded into the layer keys: a
    layered ``from_bits`` leaves them out (they depend on the number of layers, and the
    keys are given)."""
    producer = {out: n for n, eqn in enumerate(jaxpr.eqns) for out in eqn.outvars}
    splits = {e.outvars[0] for e in jaxpr.eqns if e.primitive.name == "random_split"
              and e.invars[0] is jaxpr.invars[0]}
    needed, stack = set(), [v for v in jaxpr.outvars if not _compat.is_literal(v)]
    while stack:
        n = producer.get(stack.pop())
        if n is None or n in needed:
            continue
        needed.add(n)
        eqn = jaxpr.eqns[n]
        counts = eqn.primitive.name == "random_fold_in" and eqn.invars[0] in splits
        ins = eqn.invars[:1] if counts else eqn.invars
        stack.extend(v for v in ins if not _compat.is_literal(v))
    return frozenset(range(len(jaxpr.eqns))) - needed


def _constant(closed: Any, v: Any, limit: int = 1 << 16) -> np.ndarray | None:
    """The value of ``v`` when it is computed from literals and constants alone (a
    stream counter incremented as ``count + 1`` per parameter, batched by ``nnx.vmap``),
    evaluated here; None otherwise."""
    if _compat.is_literal(v):
        return np.asarray(_compat.literal_value(v))
    jaxpr = closed.jaxpr
    consts = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    producer = {out: n for n, eqn in enumerate(jaxpr.eqns) for out in eqn.outvars}
    needed, used, stack, seen = set(), [], [v], set()
    while stack:
        x = stack.pop()
        if _compat.is_literal(x) or x in seen:
            continue
        seen.add(x)
        if x in consts:
            if isinstance(consts[x], jax.core.Tracer):
                return None
            used.append(x)
            continue
        n = producer.get(x)
        if n is None or jaxpr.eqns[n].effects or math.prod(
                getattr(x.aval, "shape", ())) > limit or _compat.is_key_array(x.aval):
            return None  # an input (the key), an effect, a large or key value
        needed.add(n)
        stack.extend(jaxpr.eqns[n].invars)
    sub = _compat.new_closed_jaxpr(used, [consts[c] for c in used], [], [v],
                                   [jaxpr.eqns[n] for n in sorted(needed)])
    (value,) = programs.eval_constants(sub)
    return np.asarray(value)


def chunked(fn: Callable[[Any], jax.Array], key_spec: Any, shape, dtype,
            chunk: int = CHUNK_ELEMENTS) -> Callable[[Any], jax.Array]:
    """Returns ``fn`` re-expressed to draw its output ``chunk`` elements at a time.

    Args:
      fn: ``fn(key) -> array`` of ``shape`` and ``dtype`` (an initializer with its shape
        bound).
      key_spec: the abstract key ``fn`` takes.
      shape: the output shape.
      dtype: the output dtype.
      chunk: elements per block.

    Returns:
      ``g(key)`` with values bit-identical to ``jax.jit(fn)(key)`` and temporaries of
      one block; trace it inside ``jax.jit``.

    Raises:
      NotChunkable: if ``fn`` is not random bits followed by elementwise ops, the key is
        not a (partitionable) threefry key, or the output is too small to bother.
    """
    if key_spec is None:
        raise NotChunkable("no key")
    closed = jax.make_jaxpr(fn)(key_spec)  # raw uint32 keys show up as random_wrap
    draw = chunked_jaxpr(closed, shape, dtype, chunk)
    return lambda key: draw(key, closed.consts)


def chunked_jaxpr(closed: Any, shape, dtype, chunk: int = CHUNK_ELEMENTS) -> Callable:
    """Like ``chunked``, for a traced ``fn``: ``closed`` is its closed jaxpr.

    Returns:
      ``g(key, consts)``: the draw, with the jaxpr's constants given at call time (as
      arguments of the enclosing ``jax.jit``, or ``closed.consts`` themselves).
    """
    shape = tuple(shape)
    total = math.prod(shape)
    if total <= chunk or total >= 2**32 or not jax.config.jax_threefry_partitionable:
        raise NotChunkable("size or PRNG configuration")
    if len(closed.jaxpr.invars) != 1:
        raise NotChunkable("no key")
    # Blocks of whole leading-axis rows, written in place into the output buffer.
    row = math.prod(shape[1:])
    rows = max(1, chunk // row)
    if rows == 1 and row > chunk:
        raise NotChunkable("rows larger than one chunk")
    n_full, rest = divmod(shape[0], rows)
    jaxpr = closed.jaxpr  # the closures below keep the jaxpr, never the constants

    def block(key, consts, first_row, n_rows):  # first_row: a traced int
        offset = first_row.astype(np.uint32) * np.uint32(row)
        return _draw_block(jaxpr, key, consts, shape, dtype,
                           lax.iota(np.uint32, n_rows * row) + offset, (n_rows,) + shape[1:])

    # Dry run: find out now (abstractly) whether every step is supported.
    key_aval = closed.in_avals[0]
    jax.eval_shape(
        lambda k, c: block(k, c, jnp.uint32(0), rows),
        jax.ShapeDtypeStruct(key_aval.shape, key_aval.dtype), list(closed.consts),
    )
    zeros = (0,) * (len(shape) - 1)

    def draw(key, consts):
        def body(i, out):
            first = i * rows
            return lax.dynamic_update_slice(
                out, block(key, consts, first, rows), (first, *zeros)
            )

        out = lax.fori_loop(0, n_full, body, jnp.zeros(shape, dtype))
        if rest:
            tail = block(key, consts, jnp.uint32(n_full * rows), rest)
            out = lax.dynamic_update_slice(out, tail, (n_full * rows, *zeros))
        return out

    return draw


def _shard_offsets(spec: Any, mesh: Any, local: tuple[int, ...]) -> list[Any]:
    """Inside ``shard_map``: where this device's shard starts, per dimension."""
    out = []
    for dim, names in enumerate(tuple(spec) + (None,) * (len(local) - len(tuple(spec)))):
        if names is None:
            out.append(np.uint32(0))
            continue
        names = (names,) if isinstance(names, str) else tuple(names)
        index = jnp.uint32(0)
        for name in names:  # row-major over the named axes, as NamedSharding lays out
            index = index * np.uint32(mesh.shape[name]) + lax.axis_index(name).astype(np.uint32)
        out.append(index * np.uint32(local[dim]))
    return out


def sharded_chunked_jaxpr(closed: Any, shape, dtype, sharding: Any,
                          chunk: int = CHUNK_ELEMENTS) -> Callable:
    """Like ``chunked_jaxpr``, each device drawing only its own shard, block by block.

    Element ``i`` of the leaf depends on the key and ``i`` alone, so a device computes
    the flat indices of its shard's elements and draws them in blocks of whole local
    rows: no device holds more than its shard plus one block of temporaries, and every
    value is bit-identical to drawing the leaf whole.

    Args:
      closed: the initializer's closed jaxpr (``fn(key)``).
      shape: the leaf's (global) shape.
      dtype: its dtype.
      sharding: its ``NamedSharding``.
      chunk: elements per block.

    Returns:
      ``g(key, consts)``, to trace inside ``jax.jit(..., out_shardings=sharding)``.
    """
    shape = tuple(shape)
    if not isinstance(sharding, jax.sharding.NamedSharding) or not shape:
        raise NotChunkable("not a NamedSharding")
    if math.prod(shape) >= 2**32 or not jax.config.jax_threefry_partitionable:
        raise NotChunkable("size or PRNG configuration")
    if len(closed.jaxpr.invars) != 1:
        raise NotChunkable("no key")
    mesh, spec = sharding.mesh, sharding.spec
    local = tuple(sharding.shard_shape(shape))
    row = math.prod(local[1:])
    rows = max(1, min(local[0], chunk // max(row, 1)))
    if row > chunk:
        raise NotChunkable("rows larger than one chunk")
    n_full, rest = divmod(local[0], rows)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    jaxpr = closed.jaxpr

    def counters(offsets, first_row, n_rows):
        """Flat indices in the leaf of local rows [first_row, first_row + n_rows)."""
        block = (n_rows,) + local[1:]
        flat = jnp.zeros(block, np.uint32)
        for d in range(len(shape)):
            index = lax.broadcasted_iota(np.uint32, block, d) + offsets[d]
            if d == 0:
                index = index + first_row.astype(np.uint32)
            flat = flat + index * np.uint32(strides[d])
        return flat.reshape(-1)

    def block(key, consts, offsets, first_row, n_rows):
        return _draw_block(jaxpr, key, consts, shape, dtype,
                           counters(offsets, first_row, n_rows), (n_rows,) + local[1:])

    key_aval = closed.in_avals[0]
    jax.eval_shape(  # dry run: every step supported?
        lambda k, c: block(k, c, [np.uint32(0)] * len(shape), jnp.int32(0), rows),
        jax.ShapeDtypeStruct(key_aval.shape, key_aval.dtype), list(closed.consts),
    )
    zeros = (0,) * (len(shape) - 1)

    def per_device(key, consts):
        offsets = _shard_offsets(spec, mesh, local)

        def body(i, out):
            first = i * rows
            return lax.dynamic_update_slice(
                out, block(key, consts, offsets, first, rows), (first, *zeros))

        out = lax.fori_loop(0, n_full, body, jnp.zeros(local, dtype))
        if rest:
            tail = block(key, consts, offsets, jnp.int32(n_full * rows), rest)
            out = lax.dynamic_update_slice(out, tail, (n_full * rows, *zeros))
        return out

    replicated = jax.sharding.PartitionSpec()

    def draw(key, consts):
        return jax.shard_map(
            per_device, mesh=mesh, in_specs=(replicated, [replicated] * len(consts)),
            out_specs=spec, check_vma=False,
        )(key, list(consts))

    return draw
