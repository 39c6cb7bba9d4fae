"""The options of ``flaxlazy.inspect`` (and of ``flaxlazy inspect``) checked and turned
into values: a device's memory as bytes, a mesh given as ``{axis: size}``, the what-if
dtype, the optimizers known by name. Each problem is a ``TypeError`` or ``ValueError``
naming the option, what it expected and what it got.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh
from jax.sharding import Mesh

from flaxlazy._src import sharding as sharding_lib
from flaxlazy._src import specs as specs_lib

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "adam": lambda: optax.adam(1e-3),
    "sgd": lambda: optax.sgd(1e-3),
    "adafactor": lambda: optax.adafactor(1e-3),
    "lion": lambda: optax.lion(1e-4),
}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
BAD_BYTES = (
    "`device_memory` {value!r} is not a size: write a number with a unit, e.g. '80GiB', "
    "'16 GiB', '80GB' (10**9 bytes) or '512MiB' (K, M, G, T alone are KiB, MiB, GiB, TiB)."
)
BAD_OPTIMIZER = (
    "`optimizer` {value!r}: expected an optax.GradientTransformation or one of {names}."
)


def parse_bytes(value: str | int) -> int:
    """Bytes from a size such as ``"80GiB"``, ``"16 GB"`` or ``"512M"`` (an int is bytes).

    Examples:
      >>> parse_bytes("80GiB") == 80 * 2**30, parse_bytes("1.5 GB"), parse_bytes("2k")
      (True, 1500000000, 2048)
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(BAD_BYTES.format(value=value))
    return int(float(match.group(1)) * _UNITS[unit])


# JAX counts a mesh's devices in a C++ int: beyond it, "RuntimeError: std::bad_cast".
MAX_DEVICES = 2**31 - 1


def as_mesh(mesh: Any) -> Mesh | AbstractMesh | None:
    """A ``Mesh`` or ``AbstractMesh`` as it is, or ``{"data": 2, "model": 4}`` as an AbstractMesh.

    Examples:
      >>> as_mesh({"data": 2, "model": 4}).shape
      OrderedDict([('data', 2), ('model', 4)])
    """
    if mesh is None or isinstance(mesh, (Mesh, AbstractMesh)):
        return mesh
    if isinstance(mesh, Mapping) and mesh and all(
        isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        and v > 0 for k, v in mesh.items()
    ):
        if math.prod(int(v) for v in mesh.values()) > MAX_DEVICES:
            raise ValueError(
                f"`mesh` {dict(mesh)!r} has {math.prod(int(v) for v in mesh.values()):,} "
                f"devices; JAX counts at most {MAX_DEVICES:,}. Give smaller axis sizes."
            )
        return AbstractMesh(tuple(int(v) for v in mesh.values()), tuple(mesh))
    if isinstance(mesh, Mapping):
        raise TypeError(
            f"`mesh` {dict(mesh)!r}: a mapping must give each axis name (str) a positive "
            "int size, e.g. {'data': 2, 'model': 4}."
        )
    sharding_lib.check_mesh(mesh)  # raises, naming what was given
    raise AssertionError("unreachable")


def cast_dtype(dtype: Any) -> Any:
    """The floating ``numpy`` dtype ``dtype=`` names (``"bf16"``, ``jnp.float16``...).

    Examples:
      >>> cast_dtype("bf16"), cast_dtype("f32")
      (dtype(bfloat16), dtype('float32'))
    """
    found = specs_lib._dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    try:
        found = np.dtype(found) if found is not None else None
    except TypeError:
        found = None
    if found is None or not jax.numpy.issubdtype(found, jax.numpy.floating):
        raise TypeError(
            f"`dtype` {dtype!r} is not a floating dtype: parameters are cast to it for a "
            "what-if, so give one such as 'bf16', 'f16' or 'f32'."
        )
    return found
