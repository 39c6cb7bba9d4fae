"""Per-leaf programs cut out of one traced constructor: which leaves replay alone, and how.

A framework whose parameters are created by plain JAX code (Flax NNX: ``kernel_init(
rngs.params(), shape, dtype)``) is traced once, whole, to a jaxpr whose inputs are the
RNG streams' root keys (and the call's array inputs) and whose outputs are every
variable. A stream hands out ``fold_in(root, count)``; with the counts known at trace
time, each such ``random_fold_in`` of a root key by a known count is a *cut*: the
variables computed from that one key alone can be recreated alone, by the slice of the
jaxpr between the cut and the variable, applied to ``fold_in(root, count)``. The slice
is a ``programs.Program`` like any other, so equal slices (layer 0's kernel and layer
23's) share one compiled function and compile time stays flat in depth.

Anything else (a variable computed from a root key directly, from several keys, from an
array input, from a traced value of an enclosing transform, or through an effect) is
left to the traced fallback: the whole jaxpr, pruned to what it needs.

Small values computed from constants alone (the stream counters, ``jnp.zeros(())``) are
evaluated here once, so a counter incremented as ``count + 1`` a hundred times is a
known number at every cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import programs

# Values computed from constants alone are evaluated at trace time up to this size.
FOLD_ELEMENTS = 64

_EMPTY: frozenset = frozenset()
_PLAIN = jax.tree_util.tree_structure(0)


@dataclasses.dataclass(frozen=True)
class Cut:
    """A key ``fold_in(roots[root], count)`` the traced code drew from a root key."""

    root: int
    count: int


@dataclasses.dataclass(frozen=True)
class Slice:
    """How one output of the traced jaxpr can be recreated.

    Attributes:
      program: ``fn(key)`` (``cut`` given) or ``fn()``: the output alone; None when it
        cannot be recreated alone (it needs the traced fallback).
      cut: the key the program takes, or None for a keyless program.
      known: the output's value when it was computed from constants alone (small only).
    """

    program: programs.Program | None
    cut: Cut | None
    known: Any = None

    @property
    def stacked(self) -> tuple[int, ...]:
        """The stack shape when the output is drawn per layer from a split key (e.g.
        ``nnx.vmap`` over ``nnx.split_rngs``): the batch shape of the keys its program
        folds counters into; ``()`` otherwise."""
        if self.program is None:
            return ()
        for eqn in self.program.jaxpr.jaxpr.eqns:
            if eqn.primitive.name == "random_fold_in" and eqn.invars[0].aval.shape:
                return tuple(eqn.invars[0].aval.shape)
        return ()


def _small(eqn: Any) -> bool:
    """Whether an equation computes small values only: its outputs, and every value inside
    the jaxprs it runs (a ``jit`` of a large draw summed to a scalar is not small), have at
    most ``FOLD_ELEMENTS`` elements. Only such work is done at trace time."""
    if any(not hasattr(v.aval, "shape") or math.prod(v.aval.shape) > FOLD_ELEMENTS
           for v in eqn.outvars):
        return False
    return all(_small(inner) for jaxpr in _compat.inner_jaxprs(eqn) for inner in jaxpr.eqns)


class Analysis:
    """The slices of every output of a closed jaxpr with ``n_roots`` root-key inputs first.

    Args:
      closed: the traced jaxpr; its first ``n_roots`` inputs are root keys.
      n_roots: how many inputs are root keys (the rest are other inputs).
    """

    def __init__(self, closed: Any, n_roots: int):
        self.closed = closed
        jaxpr = closed.jaxpr
        self._roots = {v: i for i, v in enumerate(jaxpr.invars[:n_roots])}
        self._known = self._fold(closed)
        self._producer: dict[Any, int] = {}
        self._cuts: dict[Any, Cut] = {}
        self._deps = self._dependencies(jaxpr)

    # ------------------------------------------------------------------ analysis
    def _fold(self, closed: Any) -> dict:
        """Values of the small outputs computed from constants (and literals) alone."""
        jaxpr = closed.jaxpr
        known = {
            v: c for v, c in zip(jaxpr.constvars, closed.consts, strict=True)
            if not isinstance(c, jax.core.Tracer) and np.size(c) <= FOLD_ELEMENTS
        }
        foldable, outs = [], []
        lacking = _compat.devices_lacking()  # only what needs no devices is evaluated
        for eqn in jaxpr.eqns:
            if eqn.effects or not all(
                _compat.is_literal(v) or v in known for v in eqn.invars
            ):
                continue
            if not _small(eqn) or (lacking and _compat.names_a_mesh(eqn)
                                   and not programs.in_numpy(eqn)):
                continue
            foldable.append(eqn)
            for v in eqn.outvars:
                if not _compat.is_dropvar(v):
                    known[v] = None  # value filled in below
                    outs.append(v)
        if foldable:
            constvars = [v for v in jaxpr.constvars if known.get(v) is not None]
            sub = _compat.new_closed_jaxpr(
                constvars, [known[v] for v in constvars], [], outs, foldable
            )
            known.update(zip(outs, programs.eval_constants(sub), strict=True))
        return known

    def _value(self, v: Any) -> Any:
        if _compat.is_literal(v):
            return _compat.literal_value(v)
        return self._known.get(v)

    def _dependencies(self, jaxpr: Any) -> dict:
        """Per variable: the root inputs, other inputs and cuts its value depends on."""
        deps: dict[Any, frozenset] = {}
        for i, v in enumerate(jaxpr.invars):
            deps[v] = frozenset({("in", i)})
        for v, c in zip(jaxpr.constvars, self.closed.consts, strict=True):
            # A tracer of an enclosing trace: data the slice cannot stand alone without.
            deps[v] = frozenset({("tracer", id(v))}) if isinstance(c, jax.core.Tracer) else _EMPTY
        for n, eqn in enumerate(jaxpr.eqns):
            if eqn.primitive.name == "random_fold_in" and eqn.invars[0] in self._roots:
                count = self._value(eqn.invars[1])
                if count is not None and np.ndim(count) == 0:
                    out = eqn.outvars[0]
                    self._cuts[out] = Cut(self._roots[eqn.invars[0]], int(count))
                    self._producer[out] = n
                    deps[out] = frozenset({("cut", out)})
                    continue
            found = _EMPTY
            for v in eqn.invars:
                if not _compat.is_literal(v):
                    found = found | deps[v]
            if eqn.effects:
                found = found | {("effect", n)}
            for v in eqn.outvars:
                self._producer[v] = n
                deps[v] = found
        return deps

    # ------------------------------------------------------------------ results
    def slice(self, index: int) -> Slice:
        """How output ``index`` can be recreated (see ``Slice``)."""
        out = self.closed.jaxpr.outvars[index]
        if _compat.is_literal(out):
            return Slice(self._program([], out), None, _compat.literal_value(out))
        found = self._deps.get(out, _EMPTY)
        known = self._known.get(out)
        if not found:
            return Slice(self._program([], out), None, known)
        if len(found) == 1:
            ((kind, v),) = found
            if kind == "cut":
                return Slice(self._program([v], out), self._cuts[v])
        return Slice(None, None)

    def _program(self, invars: list, out: Any) -> programs.Program:
        """The slice of the jaxpr computing ``out`` from ``invars`` (cuts) and constants."""
        jaxpr = self.closed.jaxpr
        stop = set(invars)
        needed: set[int] = set()
        stack = [out] if not _compat.is_literal(out) else []
        seen = set()
        while stack:
            v = stack.pop()
            if v in seen or v in stop:
                continue
            seen.add(v)
            n = self._producer.get(v)
            if n is None or n in needed:
                continue
            needed.add(n)
            stack.extend(x for x in jaxpr.eqns[n].invars if not _compat.is_literal(x))
        eqns = [jaxpr.eqns[n] for n in sorted(needed)]
        used = seen
        pairs = [
            (v, c) for v, c in zip(jaxpr.constvars, self.closed.consts, strict=True)
            if v in used
        ]
        closed = _compat.new_closed_jaxpr(
            [v for v, _ in pairs], [c for _, c in pairs], list(invars), [out], eqns
        )
        return programs.from_closed(closed, _PLAIN)

    def pruned(self, indices: Sequence[int]) -> Any:
        """The whole jaxpr returning only outputs ``indices`` (for the traced fallback)."""
        jaxpr = self.closed.jaxpr
        return _compat.new_closed_jaxpr(
            list(jaxpr.constvars), list(self.closed.consts), list(jaxpr.invars),
            [jaxpr.outvars[i] for i in indices], list(jaxpr.eqns),
        )
