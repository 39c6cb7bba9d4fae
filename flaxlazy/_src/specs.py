"""Input specs: abstract stand-ins for arrays (``"f32[8,512]"`` -> ShapeDtypeStruct)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPE_PREFIXES = {
    "f16": jnp.float16,
    "f32": jnp.float32,
    "f64": jnp.float64,
    "bf16": jnp.bfloat16,
    "i8": jnp.int8,
    "i16": jnp.int16,
    "i32": jnp.int32,
    "i64": jnp.int64,
    "u8": jnp.uint8,
    "u16": jnp.uint16,
    "u32": jnp.uint32,
    "u64": jnp.uint64,
    "bool": jnp.bool_,
}

_SPEC_RE = re.compile(r"^\s*([a-z]+[0-9]*)\s*\[\s*([0-9,\s]*)\]\s*$")

_SPEC_FORM = (
    "expected the form DTYPE[DIM,DIM,...] such as 'f32[8,512]', 'i32[8,128]' or 'f32[]', "
    f"with DTYPE one of {', '.join(DTYPE_PREFIXES)}"
)


def _parse(text: str) -> tuple[tuple[int, ...], Any]:
    match = _SPEC_RE.match(text)
    if match is None:
        raise ValueError(f"Malformed spec {text!r}: {_SPEC_FORM}.")
    prefix, dims = match.groups()
    if prefix not in DTYPE_PREFIXES:
        raise ValueError(f"Unknown dtype prefix {prefix!r} in spec {text!r}: {_SPEC_FORM}.")
    parts = [p.strip() for p in dims.split(",")] if dims.strip() else []
    if any(not p for p in parts):
        raise ValueError(f"Empty dimension in spec {text!r}: {_SPEC_FORM}.")
    return tuple(int(p) for p in parts), DTYPE_PREFIXES[prefix]


def spec(shape: tuple[int, ...] | str, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    """Returns an abstract array: a shape and dtype, no memory.

    Args:
      shape: a tuple of ints, or a string ``"DTYPE[DIM,...]"`` such as ``"f32[8,512]"``,
        ``"i32[8,128]"``, ``"bf16[2,224,224,3]"`` or ``"f32[]"`` (a scalar). Dtype prefixes:
        f16 f32 f64 bf16 i8 i16 i32 i64 u8 u16 u32 u64 bool.
      dtype: the dtype when ``shape`` is a tuple. A string spec carries its own dtype, and
        passing ``dtype`` as well is an error.

    Returns:
      A ``jax.ShapeDtypeStruct``.

    Raises:
      ValueError: if the string is malformed, or a dimension is negative.

    Examples:
      >>> import flaxlazy
      >>> flaxlazy.spec("f32[8,512]")
      ShapeDtypeStruct(shape=(8, 512), dtype=float32)
      >>> flaxlazy.spec((2, 3), "int32")
      ShapeDtypeStruct(shape=(2, 3), dtype=int32)
    """
    if isinstance(shape, str):
        if dtype is not jnp.float32:
            raise ValueError(
                f"spec({shape!r}, dtype={dtype!r}): a string spec carries its own dtype; "
                "pass either 'f32[...]' or a tuple shape with dtype=."
            )
        shape, dtype = _parse(shape)
    elif isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as e:
        raise TypeError(f"spec: `shape` must be a tuple of ints or a string, got {shape!r}.") from e
    if any(d < 0 for d in shape):
        raise ValueError(f"spec: negative dimension in shape {shape}.")
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def is_array_like(x: Any) -> bool:
    """True for leaves that count only by shape and dtype (arrays and ShapeDtypeStructs)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def to_spec(x: Any) -> jax.ShapeDtypeStruct:
    """The abstract form of an array-like leaf (keeps a ShapeDtypeStruct's sharding)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
