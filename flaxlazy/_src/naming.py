"""Initializers and recorded programs in words, for reports: ``lecun_normal``,
``normal(stddev=0.02)``, ``zeros``, ``normal (params stream)``.

A leaf of the import graph beside ``programs``: the sources describe their leaves with
these names, and ``initializer_names.Names`` asks the sources.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
from typing import Any

from flaxlazy._src import _compat

# jax.nn.initializers built on variance_scaling, by (scale, mode, distribution).
_VARIANCE_SCALING = {
    (1.0, "fan_in", "truncated_normal"): "lecun_normal",
    (1.0, "fan_in", "uniform"): "lecun_uniform",
    (2.0, "fan_in", "truncated_normal"): "he_normal",
    (2.0, "fan_in", "uniform"): "he_uniform",
    (1.0, "fan_avg", "truncated_normal"): "glorot_normal",
    (1.0, "fan_avg", "uniform"): "glorot_uniform",
}
_SCALARS = (bool, int, float, str, type(None))
_MAX_DEPTH = 8
# jax.random's samplers, by the name of the function the traced program calls.
_DISTRIBUTIONS = frozenset({
    "normal", "truncated_normal", "uniform", "bernoulli", "randint", "gamma", "beta",
    "exponential", "laplace", "logistic", "cauchy", "gumbel", "orthogonal", "choice",
    "permutation", "rademacher", "categorical", "dirichlet", "poisson", "t",
})
# Primitives that only reshape or recast a value: a fill stays that fill through them.
_FILL_KEEPING = frozenset({"broadcast_in_dim", "reshape", "convert_element_type",
                           "squeeze", "expand_dims"})


def _closure(fn: Any) -> tuple[dict[str, Any], set[str]]:
    try:
        found = pyinspect.getclosurevars(fn)
    except (TypeError, ValueError):
        return {}, set()
    return dict(found.nonlocals), set(found.unbound)


def initializer_name(fn: Any, _depth: int = 0) -> str:
    """A short readable name for an initializer (or any callable).

    Examples:
      >>> import flax.linen as nn
      >>> initializer_name(nn.initializers.lecun_normal()), initializer_name(nn.initializers.zeros)
      ('lecun_normal', 'zeros')
      >>> initializer_name(nn.initializers.normal(0.02))
      'normal(stddev=0.02)'
      >>> initializer_name(nn.with_partitioning(nn.initializers.xavier_uniform(), (None, "model")))
      'glorot_uniform'
    """
    if _depth > _MAX_DEPTH:
        return "?"
    if isinstance(fn, functools.partial):
        return initializer_name(fn.func, _depth + 1)
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None:  # functools.wraps, e.g. nn.with_partitioning
        return initializer_name(wrapped, _depth + 1)
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:
        return type(fn).__name__
    outer, local, inner = qualname.partition(".<locals>.")
    if not local:
        return qualname
    if inner == "<lambda>":
        return f"lambda in {outer}"
    cells, attributes = _closure(fn)
    owner = cells.get("self")
    inits = sorted(a for a in attributes if a.endswith("init") and callable(
        getattr(owner, a, None)))
    if len(inits) == 1:  # a module's wrapper around its own `kernel_init` (DenseGeneral)
        return initializer_name(getattr(owner, inits[0]), _depth + 1)
    if outer == "variance_scaling":
        triple = (cells.get("scale"), cells.get("mode"), cells.get("distribution"))
        axes = (cells.get("in_axis"), cells.get("out_axis"), cells.get("batch_axis"))
        if triple in _VARIANCE_SCALING and axes == (-2, -1, ()):
            return _VARIANCE_SCALING[triple]
        return f"variance_scaling({', '.join(repr(x) for x in triple)})"
    args = [f"{k}={v!r}" for k, v in sorted(cells.items())
            if isinstance(v, _SCALARS) and k != "dtype"]
    return f"{outer}({', '.join(args)})" if args else outer


def _fill(jaxpr: Any) -> Any:
    """The scalar a keyless program's one output is filled with, or None if it is not a
    fill (a literal, broadcast, reshaped or recast: ``jnp.zeros``, ``jnp.full``...)."""
    inner = jaxpr.jaxpr
    if len(inner.outvars) != 1:
        return None
    producers = {v: e for e in inner.eqns for v in e.outvars}
    consts = dict(zip(inner.constvars, jaxpr.consts, strict=True))
    v = inner.outvars[0]
    for _ in range(len(inner.eqns) + 1):
        if _compat.is_literal(v):
            value = _compat.literal_value(v)
            break
        if v in consts:
            value = consts[v]
            break
        eqn = producers.get(v)
        if eqn is None or eqn.primitive.name not in _FILL_KEEPING or len(eqn.invars) != 1:
            return None
        v = eqn.invars[0]
    else:
        return None
    if getattr(value, "size", 1) != 1:
        return None
    return value.item() if hasattr(value, "item") else value


def _sampler(jaxpr: Any) -> str | None:
    """The jax.random sampler a keyed program calls at its top level, if exactly one."""
    found = {
        str(e.params.get("name", "")).lstrip("_") for e in jaxpr.jaxpr.eqns
        if "name" in e.params
    } & _DISTRIBUTIONS
    return found.pop() if len(found) == 1 else None


def program_name(record: Any) -> str:
    """A record without a named initializer (NNX: a slice of the traced constructor), in
    words read off its program: ``zeros``, ``ones``, ``constant(0.5)``, ``constant``
    (computed from constants), ``truncated_normal (params stream)``, ``random (params
    stream)``, ``key (dropout stream)`` (a key made from a stream), or ``module``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flaxlazy._src import programs
      >>> class Rec:
      ...     program = programs.trace(lambda: jnp.zeros((3, 2)))
      ...     stream = None
      >>> program_name(Rec())
      'zeros'
      >>> Rec.program = programs.trace(
      ...     lambda k: 0.02 * jax.random.normal(k, (3, 2)), jax.random.key(0))
      >>> Rec.stream = "params"
      >>> program_name(Rec())
      'normal (params stream)'
    """
    program = getattr(record, "program", None)
    if program is None:
        return "module"
    jaxpr = program.jaxpr
    stream = getattr(record, "stream", None)
    if not jaxpr.jaxpr.invars:  # keyless: from constants alone
        value = _fill(jaxpr)
        if value is None:
            return "constant"
        if isinstance(value, bool) or value not in (0, 1):
            return f"constant({value!r})"
        return "zeros" if value == 0 else "ones"
    where = f" ({stream} stream)" if stream else ""
    outs = jaxpr.jaxpr.outvars
    if len(outs) == 1 and _compat.is_key_array(outs[0].aval):  # a stream's key (or keys)
        return "key" + where
    return (_sampler(jaxpr) or "random") + where
