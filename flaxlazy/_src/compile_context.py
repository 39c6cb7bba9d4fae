"""The context a function is compiled under, as part of every compiled-code cache key.

A compiled function depends on more than its program and its placement: traced inside
``jax.set_mesh`` (or ``use_abstract_mesh``, or the deprecated ``with mesh:``) its inputs
and outputs take the ambient mesh's shardings and axis types, and the PRNG and dtype
configuration change what it computes. Every cache of compiled code keys on ``key()``,
so code compiled under one context is never served under another.
"""

from __future__ import annotations

from typing import Any

import jax

from flaxlazy._src import _compat

# Configuration that changes the code a random initializer compiles to.
_CONFIG = (
    "jax_threefry_partitionable",
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_numpy_dtype_promotion",
)


def key() -> tuple[Any, ...]:
    """The ambient abstract mesh, concrete mesh and legacy mesh (with their axis types),
    and the relevant configuration: equal keys compile to the same code.

    Examples:
      >>> import jax
      >>> key() == key()
      True
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> with jax.set_mesh(mesh):
      ...     inside = key()
      >>> inside == key()
      False
    """
    config = tuple(getattr(jax.config, name, None) for name in _CONFIG)
    return (jax.sharding.get_abstract_mesh(), _compat.concrete_mesh(),
            _compat.legacy_mesh(), config)
