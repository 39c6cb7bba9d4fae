"""How a leaf's key derives from its stream's root key, as the framework derives it.

A leaf's key is ``fold_in(root, fold)``, ``fold`` a static hash of its path (Linen) or its
stream count (NNX). A leaf stacked by Linen's ``nn.scan``/``nn.vmap`` with ``split_rngs``
has one key per layer: the root split into as many keys as layers
(``jax.random.split(root, n)``; nested stacks split each layer's key again), then ``fold``
folded into each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def mapped(fn: Callable, depth: int) -> Callable:
    """``fn`` of one layer, mapped (``jax.vmap``) over ``depth`` leading layer axes."""
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def layer_keys(root: Any, layers: tuple[int, ...]) -> Any:
    """The keys of stacked layers, shape ``layers`` (+ the root key's): ``root`` split into
    ``layers[0]`` keys, each of those into ``layers[1]``, and so on."""
    if not layers:
        return root
    keys = jax.random.split(root, layers[0])
    if len(layers) == 1:
        return keys
    return jax.vmap(lambda k: layer_keys(k, layers[1:]))(keys)


def leaf_key(root: Any, fold: Any, layers: tuple[int, ...] = ()) -> Any:
    """A leaf's key: ``fold_in(root, fold)``; for a leaf stacked per layer, every layer's
    ``fold_in(layer key, fold)``, shape ``layers``.

    Examples:
      >>> import jax
      >>> key = jax.random.key(0)
      >>> want = jax.random.fold_in(jax.random.split(key, 3)[1], 7)
      >>> got = leaf_key(key, 7, (3,))[1]
      >>> bool((jax.random.key_data(got) == jax.random.key_data(want)).all())
      True
    """
    return mapped(lambda k: jax.random.fold_in(k, fold), len(layers))(
        layer_keys(root, layers))
