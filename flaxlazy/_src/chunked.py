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

# Leaves with more elements than this are drawn in chunks of CHUNK_ELEMENTS.
MIN_ELEMENTS = 1 << 20
CHUNK_ELEMENTS = 1 << 18

_ELEMENTWISE = frozenset(
    """abs add and atan2 bitcast_convert_type cbrt ceil clamp convert_element_type copy
    copy_p cos div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite
    le log log1p logistic lt max min mul ne neg nextafter not or pow rem round rsqrt
    select_n shift_left shift_right_arithmetic shift_right_logical sign sin sqrt square
    stop_gradient sub tan tanh xor""".split()
)
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"})
_SAME_LAYOUT = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim"})


class NotChunkable(Exception):
    """The initializer is not ``random_bits`` + elementwise ops; draw it whole."""


class _Block:
    """A full-shape value, held as the current flat block of its elements."""

    __slots__ = ("value",)

    def __init__(self, value: jax.Array):
        self.value = value


class _Context:
    def __init__(self, full_shape: tuple[int, ...], offset: jax.Array, size: int):
        self.full_shape = full_shape
        self.offset = offset
        self.size = size

    def bits(self, key: jax.Array, bit_width: int) -> jax.Array:
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape:
            raise NotChunkable("random_bits on a batch of keys")
        if jax.random.key_impl(key) != jax.random.key_impl(jax.random.key(0, impl="threefry2x32")):
            raise NotChunkable("not a threefry2x32 key")
        data = jax.random.key_data(key)
        lo = lax.iota(np.uint32, self.size) + self.offset
        hi = jnp.zeros_like(lo)
        bits1, bits2 = _compat.threefry2x32_p.bind(data[0], data[1], hi, lo)
        if bit_width == 64:
            return (bits1.astype(np.uint64) << np.uint64(32)) | bits2.astype(np.uint64)
        bits = bits1 ^ bits2
        return bits if bit_width == 32 else bits.astype(_compat.uint_dtype(bit_width))


def _full_size(aval: Any, ctx: _Context) -> bool:
    return math.prod(getattr(aval, "shape", ())) == math.prod(ctx.full_shape)


def _as_operand(x: Any) -> Any:
    if isinstance(x, _Block):
        return x.value
    if np.size(x) != 1:
        raise NotChunkable("an elementwise operand that is not a scalar")
    return jnp.reshape(x, ())


def _eval(jaxpr: Any, consts: list, args: list, ctx: _Context) -> list:
    env: dict = {}

    def read(v):
        return v.val if _compat.is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        blocks = any(isinstance(x, _Block) for x in ins)
        if name == "random_bits":
            if tuple(eqn.params["shape"]) != ctx.full_shape:
                raise NotChunkable("random bits of another shape")
            outs = [_Block(ctx.bits(ins[0], eqn.params["bit_width"]))]
        elif name in _CALLS:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            closed = sub if _compat.is_closed_jaxpr(sub) else None
            inner = closed.jaxpr if closed else sub
            outs = _eval(inner, closed.consts if closed else [], ins, ctx)
        elif blocks and name in _ELEMENTWISE:
            out = eqn.primitive.bind(*map(_as_operand, ins), **eqn.params)
            outs = [_Block(out)]
        elif blocks and name in _SAME_LAYOUT and _full_size(eqn.outvars[0].aval, ctx):
            if not isinstance(ins[0], _Block):
                raise NotChunkable(f"{name} of a non-random operand")
            outs = [ins[0]]  # row-major flat blocks are unchanged by these
        elif blocks:
            raise NotChunkable(f"primitive {name!r} on a random array")
        elif any(_full_size(v.aval, ctx) for v in eqn.outvars) and math.prod(ctx.full_shape) > 1:
            raise NotChunkable(f"full-size non-random value from {name!r}")
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


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
        ctx = _Context(shape, first_row.astype(np.uint32) * np.uint32(row), n_rows * row)
        (out,) = _eval(jaxpr, list(consts), [key], ctx)
        if not isinstance(out, _Block):
            raise NotChunkable("the output is not drawn from random bits")
        return out.value.astype(dtype).reshape((n_rows,) + shape[1:])

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
