"""Input specs: abstract stand-ins for arrays (``"f32[8,512]"`` -> ShapeDtypeStruct)."""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPE_PREFIXES = {
    "f16": jnp.float16,
    "f32": jnp.float32,
    "f64": jnp.float64,
    "bf16": jnp.bfloat16,
    "c64": jnp.complex64,
    "c128": jnp.complex128,
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
# The names the project prints (``np.dtype(...).name``): "float32", "bfloat16", "int32"...
DTYPE_NAMES = {jnp.dtype(d).name: d for d in DTYPE_PREFIXES.values()}

_SPEC_RE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*\[\s*([0-9,\s]*)\]\s*$")

_SPEC_FORM = (
    "expected the form DTYPE[DIM,DIM,...] such as 'f32[8,512]', 'int32[8,128]' or 'f32[]', "
    f"with DTYPE one of {', '.join(DTYPE_PREFIXES)} or a full name such as "
    "float32, bfloat16, int32, uint8"
)
_ARRAY_GIVEN = (
    "spec: `shape` is an array ({what}), not a shape. Wherever flaxlazy takes inputs an "
    "array counts only by its shape and dtype, so pass it as it is, or its abstract form "
    "jax.ShapeDtypeStruct(x.shape, x.dtype){ints}."
)
_BAD_DTYPE = (
    "spec: `dtype` {dtype!r} is not a numeric or bool dtype{why}. Pass a JAX dtype such as "
    "jnp.float32, jnp.bfloat16 or jnp.int32, or a name such as 'f32', 'bf16', 'i32' (as in "
    "'f32[8]') or 'float32', 'bfloat16', 'int32'.{hint}"
)


def _dtype_from_name(name: str) -> Any | None:
    """The dtype of a short (``"f32"``) or full (``"float32"``) name, or None."""
    if name in DTYPE_PREFIXES:
        return DTYPE_PREFIXES[name]
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        return None
    try:  # other canonical JAX names, e.g. "float8_e4m3fn", "int4"
        dtype = jnp.dtype(name)
    except (TypeError, ValueError):
        return None
    return dtype if dtype.name == name and _is_numeric(dtype) else None


def _is_numeric(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)


def _parse(text: str) -> tuple[tuple[int, ...], Any]:
    match = _SPEC_RE.match(text)
    if match is None:
        hint = ""
        if _dtype_from_name(text.strip()) is not None:
            hint = f" For a scalar write '{text.strip()}[]'."
        raise ValueError(f"Malformed spec {text!r}: {_SPEC_FORM}.{hint}")
    prefix, dims = match.groups()
    dtype = _dtype_from_name(prefix)
    if dtype is None:
        raise ValueError(f"Unknown dtype prefix {prefix!r} in spec {text!r}: {_SPEC_FORM}.")
    parts = [p.strip() for p in dims.split(",")] if dims.strip() else []
    if any(not p for p in parts):
        raise ValueError(f"Empty dimension in spec {text!r}: {_SPEC_FORM}.")
    return tuple(int(p) for p in parts), dtype


def _dim(d: Any, i: int, shape: Any) -> int:
    if isinstance(d, (bool, np.bool_)):
        raise TypeError(
            f"spec: `shape` {shape!r} has the bool {d!r} as dimension {i}; dimensions are "
            "ints (a bool is not a size)."
        )
    try:
        return operator.index(d)
    except TypeError:
        pass
    fix = ""
    if isinstance(d, (float, np.floating)):
        fix = f" Convert it explicitly, e.g. int({d!r}) or round({d!r})."
    raise TypeError(
        f"spec: `shape` {shape!r} has {type(d).__name__} {d!r} as dimension {i}; dimensions "
        f"must be ints.{fix}"
    )


def _check_dtype(dtype: Any) -> Any:
    if dtype is None:
        return jnp.dtype(jnp.float32)
    if isinstance(dtype, str):
        found = _dtype_from_name(dtype)
        if found is None:
            names = ["float32", "bfloat16", "int32", *DTYPE_NAMES, *DTYPE_PREFIXES]
            close = difflib.get_close_matches(dtype, names, n=len(names))
            close = sorted(close, key=names.index)  # float32 before float64
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(_BAD_DTYPE.format(dtype=dtype, why=" name", hint=hint))
        return jnp.dtype(found)
    try:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG key dtypes
            return dtype
        resolved = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(_BAD_DTYPE.format(
            dtype=dtype, why=f" (a {type(dtype).__name__})", hint="",
        )) from None
    if not _is_numeric(resolved):
        raise TypeError(_BAD_DTYPE.format(
            dtype=dtype, why=f" (it is {resolved.name})", hint="",
        ))
    return resolved


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (bytes, bytearray)):
        raise TypeError(
            f"spec: `shape` is bytes {shape!r}; pass a str spec such as 'f32[8,512]' "
            "(decode it first: shape.decode()) or a tuple of ints."
        )
    if isinstance(shape, Mapping):
        raise TypeError(
            f"spec: `shape` is a {type(shape).__name__}; expected a tuple of ints or a str "
            "such as 'f32[8,512]'. For a dict of inputs, make one spec per entry: "
            "{name: flaxlazy.spec(s) for name, s in shapes.items()}."
        )
    if isinstance(shape, jax.ShapeDtypeStruct) or (
        hasattr(shape, "shape") and hasattr(shape, "dtype") and np.ndim(shape) > 0
    ):
        ints = ""
        if jnp.issubdtype(shape.dtype, jnp.integer) and np.ndim(shape) == 1:
            ints = "; if it holds the dimensions themselves, pass tuple(int(d) for d in x)"
        what = f"{type(shape).__name__} of shape {tuple(shape.shape)}, {shape.dtype}"
        raise TypeError(_ARRAY_GIVEN.format(what=what, ints=ints))
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        return (operator.index(shape),)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(
            f"spec: `shape` must be a tuple of ints or a str such as 'f32[8,512]'; got "
            f"{type(shape).__name__} {shape!r}."
        )
    dims = tuple(_dim(d, i, shape) for i, d in enumerate(shape))
    if any(d < 0 for d in dims):
        raise ValueError(f"spec: negative dimension in `shape` {dims}.")
    return dims


def spec(shape: Sequence[int] | str, dtype: Any = None) -> jax.ShapeDtypeStruct:
    """Returns an abstract array: a shape and dtype, no memory.

    Args:
      shape: a tuple (or list) of ints, or a string ``"DTYPE[DIM,...]"`` such as
        ``"f32[8,512]"``, ``"i32[8,128]"``, ``"bf16[2,224,224,3]"`` or ``"f32[]"`` (a
        scalar). Short dtype names: f16 f32 f64 bf16 c64 c128 i8 i16 i32 i64 u8 u16 u32
        u64 bool; the full names that flaxlazy prints (``"float32[8,512]"``,
        ``"bfloat16[...]"``, ``"int32[...]"``, ``"uint8[...]"``) work too.
      dtype: the dtype when ``shape`` is a tuple (default float32): a JAX/NumPy dtype or
        one of the names above (``"i8"`` is int8, as in a spec string). A string spec
        carries its own dtype, and passing ``dtype`` as well is an error.

    Returns:
      A ``jax.ShapeDtypeStruct``.

    Raises:
      ValueError: if the string is malformed, or a dimension is negative.
      TypeError: a shape that is not ints (floats, bools, an array, bytes, a dict), or
        a dtype that is not numeric or bool.

    Examples:
      >>> import flaxlazy
      >>> flaxlazy.spec("f32[8,512]")
      ShapeDtypeStruct(shape=(8, 512), dtype=float32)
      >>> flaxlazy.spec("bfloat16[2,3]")
      ShapeDtypeStruct(shape=(2, 3), dtype=bfloat16)
      >>> flaxlazy.spec((2, 3), "int32")
      ShapeDtypeStruct(shape=(2, 3), dtype=int32)
      >>> flaxlazy.spec((2.5, 3))
      Traceback (most recent call last):
      ...
      TypeError: spec: `shape` (2.5, 3) has float 2.5 as dimension 0; dimensions must be
      ints. Convert it explicitly, e.g. int(2.5) or round(2.5).
    """
    if isinstance(shape, str):
        if dtype is not None:
            raise ValueError(
                f"spec({shape!r}, dtype={dtype!r}): a string spec carries its own dtype; "
                "pass either 'f32[...]' or a tuple shape with `dtype`."
            )
        dims, dtype = _parse(shape)
        return jax.ShapeDtypeStruct(dims, jnp.dtype(dtype))
    dims = _check_shape(shape)
    return jax.ShapeDtypeStruct(dims, _check_dtype(dtype))


def is_key(x: Any) -> bool:
    """Whether ``x`` is a PRNG key (or keys): typed, or raw ``uint32[..., 2]``.

    Examples:
      >>> import jax
      >>> is_key(jax.random.key(0)), is_key(jax.random.PRNGKey(0)), is_key(0)
      (True, True, False)
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None or not is_array_like(x):
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return np.dtype(dtype) == np.uint32 and tuple(np.shape(x))[-1:] == (2,)


def is_array_like(x: Any) -> bool:
    """True for leaves that count only by shape and dtype (arrays and ShapeDtypeStructs)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def to_spec(x: Any) -> jax.ShapeDtypeStruct:
    """The abstract form of an array-like leaf (keeps a ShapeDtypeStruct's sharding)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
