"""``Lazy``: a module's shapes, init and apply as a bundle of pure functions."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import flax.linen as nn

from flaxlazy._src import abstract as abstract_lib
from flaxlazy._src import entrances
from flaxlazy._src import materialize as materialize_lib


class Lazy(NamedTuple):
    """A module's lazy-init functions.

    A drop-in for code that calls ``model.init`` / ``model.apply`` (Linen), or that
    constructs an NNX module and calls it.

    Attributes:
      shapes: ``shapes(rngs, *inputs, **kwargs)``: ``flaxlazy.abstract_init``; the
        variables as ``jax.ShapeDtypeStruct``s, nothing computed. NNX:
        ``shapes(*constructor_args, **constructor_kwargs)``, the abstract module.
      init: ``init(rngs, *inputs, **kwargs)``: ``flaxlazy.materialize`` with the
        bundle's initializer tree; compiled, and callable inside ``jax.jit`` too. NNX:
        ``init(*constructor_args, **constructor_kwargs)``, the module.
      apply: ``apply(variables, *args, **kwargs)``: ``module.apply``. NNX:
        ``apply(model, *args, **kwargs)`` calls the model.
    """

    shapes: Callable[..., Any]
    init: Callable[..., Any]
    apply: Callable[..., Any]


def lazy(module: nn.Module, *, initializers: Any = None) -> Lazy:
    """Wraps ``module`` in a ``Lazy`` bundle.

    Args:
      module: a Flax Linen module (no input sizes needed), or an NNX Module class (or a
        function returning an NNX module).
      initializers: an initializer tree applied by ``init`` (see ``materialize``).

    Returns:
      A ``Lazy`` of ``shapes``, ``init`` and ``apply``.

    Raises:
      TypeError: if no entrance takes ``module`` (``entrances.find``), or its entrance
        cannot initialize it (a Linen class rather than an instance, an NNX module
        already constructed rather than its class).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, flaxlazy
      >>> net = flaxlazy.lazy(nn.Dense(4), initializers={"bias": nn.initializers.ones})
      >>> net.shapes(jax.random.key(0), flaxlazy.spec("f32[2,3]"))["params"]["kernel"].shape
      (3, 4)
      >>> variables = net.init(jax.random.key(0), flaxlazy.spec("f32[2,3]"))
      >>> net.apply(variables, jnp.zeros((2, 3)))
      Array([[1., 1., 1., 1.],
             [1., 1., 1., 1.]], dtype=float32)
    """
    entrance = entrances.find(module, fn="lazy")
    entrance.check(module, fn="lazy")
    return Lazy(
        shapes=functools.partial(abstract_lib.abstract_init, module),
        init=functools.partial(materialize_lib.materialize, module, initializers=initializers),
        apply=entrance.apply(module),
    )
