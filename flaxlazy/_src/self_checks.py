"""Self-checks of flaxlazy's own replay code against the installed JAX and Flax.

flaxlazy recreates a Linen parameter without running ``module.init`` by folding its own
hash of the variable's path into the root key (``_compat.static_hash``), and draws
large leaves in chunks (``draw.chunked``). Both agree with Flax and JAX only as long as their
private behaviour stays as it is, so ``_compat.fast_path()`` and ``_compat.chunking_ok()``
run the checks below once, on first use, and fall back to slower paths that are always
right where one fails. They run flaxlazy code, so they live here, above ``_compat`` (which
imports nothing of flaxlazy), and register with it when this module is imported
(``flaxlazy/__init__.py`` imports it).
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
from flax.core import scope as flax_scope

from flaxlazy._src import _compat
from flaxlazy._src import programs
from flaxlazy._src.draw import chunked


def check_key_derivation() -> None:
    """Raises ``AssertionError`` unless Flax folds exactly ``_compat.static_hash`` into a
    parameter's key, with the same primitive, and ``Scope`` has the methods flaxlazy hooks.

    Compared as traced programs: nothing is compiled.

    Examples:
      >>> check_key_derivation()  # passes on the supported versions
    """
    spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    for data in (("params", "Dense_0", "kernel"), ("Block_3", 7, "x" * 40, 2**40)):
        ours = programs.trace(
            lambda k, d=data: jax.random.fold_in(k, np.uint32(_compat.static_hash(d))), spec
        )
        theirs = programs.trace(lambda k, d=data: flax_scope._fold_in_static(k, d), spec)
        if ours.key is None or ours.key != theirs.key:
            raise AssertionError("Flax derives parameter keys differently")
    for name in ("param", "variable", "has_variable", "is_mutable_collection"):
        if not hasattr(flax_scope.Scope, name):
            raise AssertionError(f"flax Scope has no {name!r}")
    params = inspect.signature(flax_scope.Scope.param).parameters
    if "init_fn" not in params or "unbox" not in params:
        raise AssertionError("Scope.param has another signature")


def check_chunked_draw() -> None:
    """Raises unless a chunked draw is bit-identical to the whole draw (compiles both).

    Examples:
      >>> check_chunked_draw()  # passes on the supported versions
    """
    init = jax.nn.initializers.lecun_normal()
    shape = (64, 33)
    spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    draw = chunked.chunked(lambda k: init(k, shape), spec, shape, jax.numpy.float32, chunk=256)
    key = jax.random.key(11)
    whole = jax.jit(lambda k: init(k, shape))(key)
    if not bool((jax.jit(draw)(key) == whole).all()):
        raise AssertionError("a chunked draw differs from the whole draw")


_compat.register_self_check("fast_path", check_key_derivation)
_compat.register_self_check("chunking", check_chunked_draw)
