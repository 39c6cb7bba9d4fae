"""Recording how Flax creates each variable while a Linen init is traced abstractly.

Flax creates a parameter with ``init_fn(scope.make_rng("params"), *init_args)``, where
the key is the root ``params`` key with a SHA-1 of static path data folded in (see
``LazyRng`` and ``_fold_in_static`` in ``flax.core.scope``). While ``abstract_init`` traces
``module.init`` under ``jax.eval_shape``, this module watches ``Scope.param``,
``Scope.variable`` and ``_fold_in_static`` and keeps, per variable, the initializer, its
arguments and the static data of its key. A variable whose whole recipe is static
(``Record.replayable``) can later be created alone, by a small compiled function, with a
value identical to ``module.init``'s; anything else (``nn.jit``, initializers fed traced
values, variables changed after creation) is left to the traced fallback.

``nn.remat`` (``jax.checkpoint``) changes no value, but its inside sees new tracers for
the root key and returns new tracers for the variables. While recording, ``jax.checkpoint``
is wrapped to note which tracer inside stands for which value outside (only on an exact
match of the argument and result structures), so remat'd parameters replay alone too.

``nn.scan`` and ``nn.vmap`` with ``split_rngs`` give each layer the key
``split(k, length)[i]`` (``k``: the root key, or an outer layer's key) and stack each
layer's variables along axis 0. While recording, ``jax.random.split``, ``jax.lax.scan`` and
``jax.vmap`` are wrapped to note which tracer inside a mapped call is row ``i`` of which
array outside, and which array outside stacks which value inside. A variable whose key is
sliced from splits of the root key by exactly the mapped calls that stack it (or whose
value does not depend on the layer at all) is static too: ``Record.layers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import paths
from flaxlazy._src import programs


@dataclasses.dataclass
class Record:
    """How one variable was created during the abstract trace.

    Attributes:
      collection: the variable collection (``"params"``, ``"batch_stats"``...).
      path: the module path and variable name.
      init_fn: the initializer Flax called.
      init_args: its positional arguments after the key (for params) or all of them.
      init_kwargs: its keyword arguments.
      takes_key: whether ``init_fn`` received a PRNG key first (``Scope.param``).
      key_data: the static data folded into the (layer's) root ``params`` key to make
        that key, or None when the key did not derive from the root key so.
      output: the (abstract) value ``init_fn`` returned: for stacked (``nn.scan``) layers,
        one layer's value.
      final: whether ``output`` is exactly the variable's final value in the tree, or,
        stacked, exactly one layer of it.
      program: ``init_fn`` traced alone for this call (``programs.Program`` of
        ``fn(key)``, or of ``fn()`` without a key), or None if it could not be.
      key_maps: the mapped calls (outermost first) whose split the key was sliced from.
      out_maps: the mapped calls (outermost first) that stack ``output`` into the
        variable, along axis 0.
      layers: the sizes of those stacking axes (``()``: not stacked).
    """

    collection: str
    path: tuple[str, ...]
    init_fn: Any
    init_args: tuple
    init_kwargs: dict
    takes_key: bool
    key_data: tuple | None
    output: Any
    final: bool = False
    program: Any = None
    key_maps: tuple = ()
    out_maps: tuple = ()
    layers: tuple[int, ...] = ()

    stream = "params"  # Linen derives every parameter key from the root params key

    @property
    def fold(self) -> int | None:
        """The uint32 folded into the root key to make this variable's key."""
        return _compat.static_hash(self.key_data) if self.takes_key and self.key_data else None

    @property
    def static_args(self) -> bool:
        leaves = jax.tree_util.tree_leaves((self.init_args, self.init_kwargs))
        return not any(isinstance(x, jax.core.Tracer) for x in leaves)

    @property
    def split(self) -> bool:
        """Whether each layer of a stacked variable has a key of its own (split per layer);
        otherwise every layer holds the same value."""
        return bool(self.takes_key and self.key_maps)

    @property
    def replayable(self) -> bool:
        """True if the value can be recreated from static data and the root key alone."""
        return (
            self.final
            and self.static_args
            and (not self.takes_key or (
                self.key_data is not None and self.key_maps in ((), self.out_maps)))
        )


class Recorder:
    """Collects ``Record``s while active; see ``recording``."""

    def __init__(self, root_key: Any):
        self.root_key = root_key
        self.records: dict[tuple[str, tuple[str, ...]], Record] = {}
        self._folds: dict[int, tuple[Any, Any, tuple]] = {}
        # Set when an initializer had to run twice: its side effects on the module (a
        # make_rng, a counter) may then differ from module.init's, so no record is used.
        self.unreliable = False
        # Values that cross a value-preserving lifted transform (nn.remat): the tracer
        # inside -> the value outside, by id (both kept alive here).
        self._aliases: dict[int, tuple[Any, Any]] = {}
        # Mapped calls (lax.scan, vmap), each a token: a tracer inside -> (it, the array
        # outside it is row i of, token); a value inside -> (it, the array outside that
        # stacks it, token); a split's output -> (it, the key split).
        self._rows: dict[int, tuple[Any, Any, Any]] = {}
        self._stacks: dict[int, tuple[Any, Any, Any]] = {}
        self._splits: dict[int, tuple[Any, Any]] = {}
        self._pure: dict[Any, programs.Program] = {}  # see ``run``

    def alias(self, inner: Any, outer: Any) -> None:
        """Records that ``inner`` (inside a transform) stands for ``outer`` (outside it)."""
        self._aliases[id(inner)] = (inner, outer)

    def mapped(self, pairs: list[tuple[Any, Any]], token: Any, *, out: bool) -> None:
        """Records ``(inside, outside)`` pairs of a mapped call along axis 0: rows of its
        inputs, or (``out``) its stacked outputs."""
        table = self._stacks if out else self._rows
        for inside, outside in pairs:
            if inside is not outside:
                table[id(inside)] = (inside, outside, token)

    def split_key(self, out: Any, key: Any) -> None:
        self._splits[id(out)] = (out, key)

    def outer(self, x: Any) -> Any:
        """The outermost value ``x`` stands for (``x`` itself outside any transform)."""
        while (entry := self._lookup(self._aliases, x)) is not None:
            x = entry[1]
        return x

    def _lookup(self, table: dict, x: Any) -> tuple | None:
        entry = table.get(id(x))
        return entry if entry is not None and entry[0] is x else None

    def stacked(self, x: Any) -> tuple[Any, tuple]:
        """``(value, maps)``: the outermost value that holds ``x``, and the mapped calls
        (outermost first) that stacked it there."""
        maps = []
        while (entry := self._lookup(self._stacks, x := self.outer(x))) is not None:
            maps.append(entry[2])
            x = entry[1]
        return x, tuple(reversed(maps))

    def _same(self, node: Any, output: Any) -> tuple | None:
        """The mapped calls stacking ``output`` into tree ``node`` (``()``: it is exactly
        ``node``), or None when ``node`` is not ``output`` seen from outside."""
        if node is output:
            return ()
        got, want = jax.tree_util.tree_leaves(node), jax.tree_util.tree_leaves(output)
        if _boxed_structure(node) != _boxed_structure(output) or len(got) != len(want):
            return None  # (stacking adds an axis name to a box: its metadata may differ)
        found = {(v is g, maps) for g, (v, maps) in
                 zip(got, map(self.stacked, want), strict=True)}
        if len(found) != 1:
            return None
        ((same, maps),) = found
        return maps if same else None

    def run(self, fn: Any, *key: Any, pure: Any = None) -> tuple[Any, Any]:
        """Calls an initializer ``fn(*key)`` for Flax, tracing it alone on the way.

        The initializer is traced once, to a ``programs.Program`` the plan replays later,
        and Flax gets a stand-in of the same shapes and dtypes (this is an abstract trace:
        values are never read), so the initializer's work is traced once, not twice.
        Programs that captured values of the enclosing trace (data-dependent init) or
        give weak-typed or key outputs are evaluated instead, giving Flax the real value.

        ``pure``: a key (``pure_call``) under which this very call was traced before in
        this trace: its program is reused (48 layers' kernels trace one initializer once).
        """
        specs = [jax.ShapeDtypeStruct(k.shape, k.dtype) for k in key]
        memo = None if pure is None else (pure, tuple(specs))
        program = self._pure.get(memo) if memo is not None else None
        if program is None:
            try:
                program = programs.trace(fn, *specs)
            except Exception:  # noqa: BLE001 - e.g. it calls back into the module
                self.unreliable = True
                return fn(*key), None
            if memo is not None:
                self._pure[memo] = program
        avals = program.jaxpr.out_avals
        if programs.leaked_tracers(program) or any(
            a.weak_type or _compat.is_key_array(a) for a in avals
        ):
            return programs.runner(program)(program.runtime_consts, *key), program
        stand_in = [jnp.zeros(a.shape, a.dtype, out_sharding=_explicit(a)) for a in avals]
        return jax.tree_util.tree_unflatten(program.out_tree, stand_in), program

    def key_source(self, key: Any) -> tuple[tuple | None, tuple]:
        """``(data, maps)``: the static data folded into a layer key to make ``key``, and
        the mapped calls (outermost first) that sliced that layer key, row by row, from
        splits of the root key; data None when ``key`` is not derived so."""
        entry = self._lookup(self._folds, key)
        if entry is None:
            return None, ()
        x, maps = self.outer(entry[1]), []
        while x is not self.root_key:
            row = self._lookup(self._rows, x)
            split = row and self._lookup(self._splits, self.outer(row[1]))
            if not split:
                return None, ()
            maps.append(row[2])
            x = self.outer(split[1])
        # no data folded in: the root key itself; left to tracing
        return entry[2] or None, tuple(reversed(maps))

    def mark_final(self, variables: Any) -> None:
        """Marks the records whose output is exactly the final variable value, or one
        layer of it (``Record.layers``)."""
        for (col, path), rec in self.records.items():
            node = variables.get(col, {}) if hasattr(variables, "get") else {}
            for name in path:
                node = node.get(name) if hasattr(node, "get") else None
                if node is None:
                    break
            maps = None if node is None else self._same(node, rec.output)
            rec.final = maps is not None
            if maps:
                leaf = jax.tree_util.tree_leaves(node)[0]
                rec.out_maps, rec.layers = maps, tuple(leaf.shape[:len(maps)])


_NOTHING = object()

# Modules whose initializers are pure functions of their key, arguments and closure
# (JAX's ``jax.nn.initializers``, which Flax re-exports): no state, no globals read.
_PURE_MODULES = frozenset({"jax.nn.initializers", "jax._src.nn.initializers"})


def _explicit(aval: Any) -> Any:
    """The sharding an output was created with when it shards something
    (``out_sharding=`` on a mesh of Explicit axes), for its stand-in to carry; else None."""
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return None
    return sharding


def pure_call(fn: Any, args: tuple, kwargs: dict) -> Any:
    """A key for a call of a JAX initializer ``fn(key, *args, **kwargs)`` that is equal
    only for the same function object and equal plain arguments (shapes, dtypes), so
    that within one trace equal keys trace to the same program; None for anything else
    (user initializers may read state that changes between calls).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> init = jax.nn.initializers.lecun_normal()
      >>> pure_call(init, ((4, 3), jnp.float32), {}) == pure_call(init, ((4, 3), jnp.float32), {})
      True
      >>> pure_call(lambda k, s: jnp.zeros(s), ((4, 3),), {}) is None
      True
    """
    if not inspect.isfunction(fn) or fn.__module__ not in _PURE_MODULES or not all(
        _immutable(cell.cell_contents) for cell in fn.__closure__ or ()
    ):
        return None
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    if any(isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)) for x in leaves):
        return None
    key = (fn, tree, tuple((type(x), x) for x in leaves))  # types: 1 and True differ
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _immutable(x: Any) -> bool:
    """Whether ``x`` is a plain value that cannot change (a closure's scale, mode, axes);
    a captured array or list could be mutated between two calls."""
    if isinstance(x, tuple):
        return all(map(_immutable, x))
    return isinstance(x, (bool, int, float, complex, str, bytes, type(None), np.dtype, type))


def _boxed_structure(tree: Any) -> Any:
    """The structure of a variable value with Flax boxes as leaves."""
    return jax.tree_util.tree_structure(tree, is_leaf=paths.is_box)


def _pairs(inside: Any, outside: Any, axes: Any = 0) -> list[tuple[Any, Any]]:
    """The ``(inside, outside)`` leaf pairs of two trees of one structure that a mapped
    call maps along axis 0 (``axes``: a prefix tree of axes, as ``jax.vmap`` takes them);
    none where the structures or the axes do not line up."""
    if inside is _NOTHING or outside is _NOTHING:
        return []
    got, got_tree = jax.tree_util.tree_flatten(inside)
    want, want_tree = jax.tree_util.tree_flatten(outside)
    if got_tree != want_tree:
        return []
    if isinstance(axes, list):
        axes = tuple(axes)
    flat_axes: list = []
    try:
        jax.tree_util.tree_map(
            lambda ax, sub: flat_axes.extend([ax] * len(jax.tree_util.tree_leaves(sub))),
            axes, outside, is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError):
        return []
    if len(flat_axes) != len(got):
        return []
    return [(i, o) for i, o, ax in zip(got, want, flat_axes, strict=True) if ax == 0]


@contextlib.contextmanager
def recording(root_key: Any):
    """Records variable creation by Flax Linen scopes inside the ``with`` block.

    Args:
      root_key: the (traced) root ``params`` key that ``module.init`` receives.

    Yields:
      A ``Recorder``; its ``records`` fill in as the model is traced.
    """
    rec = Recorder(root_key)

    def remat(orig_remat, fun=None, **kwargs):
        """``jax.checkpoint`` that records which tracers inside stand for which outside.

        Checkpointing changes no value, so a parameter created inside ``nn.remat`` from
        the root key is replayed alone like any other. Only an exact structural match of
        inputs (and of outputs) is aliased; anything else is simply not aliased.
        """
        if fun is None:
            return functools.partial(remat, orig_remat, **kwargs)

        @functools.wraps(fun)
        def call(*args, **kw):
            outside, outside_tree = jax.tree_util.tree_flatten((args, kw))
            inside_out = {}

            def inner(*a, **k):
                inside, inside_tree = jax.tree_util.tree_flatten((a, k))
                if inside_tree == outside_tree:
                    for i, o in zip(inside, outside, strict=True):
                        if i is not o:
                            rec.alias(i, o)
                out = fun(*a, **k)
                inside_out["leaves"] = jax.tree_util.tree_flatten(out)
                return out

            out = orig_remat(inner, **kwargs)(*args, **kw)
            if "leaves" in inside_out:
                leaves, tree = jax.tree_util.tree_flatten(out)
                inner_leaves, inner_tree = inside_out["leaves"]
                if tree == inner_tree:
                    for i, o in zip(inner_leaves, leaves, strict=True):
                        rec.alias(i, o)
            return out

        return call

    def split(orig_split, key, num=2):
        out = orig_split(key, num)
        if isinstance(num, int):  # rows of out: the keys a mapped call slices
            rec.split_key(out, key)
        return out

    def clone(orig_clone, key):
        out = orig_clone(key)
        rec.alias(out, key)  # same value
        return out

    def scan(orig_scan, f, init, xs=None, *args, **kwargs):
        """``lax.scan`` noting the rows of ``xs`` inside and the stacked ``ys`` outside."""
        token, seen = object(), {}

        def body(carry, x):
            rec.mapped(_pairs(x, xs), token, out=False)
            out = f(carry, x)
            seen["ys"] = out[1] if isinstance(out, tuple) and len(out) == 2 else _NOTHING
            return out

        carry, ys = orig_scan(body, init, xs, *args, **kwargs)
        rec.mapped(_pairs(seen.get("ys", _NOTHING), ys), token, out=True)
        return carry, ys

    def vmap(orig_vmap, fun, in_axes=0, out_axes=0, *args, **kwargs):
        """``jax.vmap`` noting, on axis 0, the rows inside and the stacked outputs outside."""

        @functools.wraps(fun)
        def call(*a, **kw):
            token, seen = object(), {}

            def inner(*ia, **ikw):
                rec.mapped(_pairs((ia, ikw), (a, kw), (in_axes, 0)), token, out=False)
                seen["out"] = fun(*ia, **ikw)
                return seen["out"]

            out = orig_vmap(inner, in_axes, out_axes, *args, **kwargs)(*a, **kw)
            rec.mapped(_pairs(seen.get("out", _NOTHING), out, out_axes), token, out=True)
            return out

        return call

    def fold(orig_fold, rng, data):
        out = orig_fold(rng, data)
        rec._folds[id(out)] = (out, rng, tuple(data))
        return out

    def param(orig_param, self, name, init_fn, *init_args, unbox=True, **init_kwargs):
        if self.has_variable("params", name) or not self.is_mutable_collection("params"):
            return orig_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        seen = {}

        def spy(key, *args, **kwargs):
            out, program = rec.run(lambda k: init_fn(k, *args, **kwargs), key,
                                   pure=pure_call(init_fn, args, kwargs))
            seen.update(key=key, out=out, program=program)
            return out

        value = orig_param(self, name, spy, *init_args, unbox=unbox, **init_kwargs)
        if seen:
            path = tuple(self.path) + (name,)
            data, maps = rec.key_source(seen["key"])
            rec.records[("params", path)] = Record(
                "params", path, init_fn, init_args, init_kwargs, True, data, seen["out"],
                program=seen["program"], key_maps=maps,
            )
        return value

    def variable(orig_variable, self, col, name, init_fn=None, *init_args, unbox=True,
                 **init_kwargs):
        if (
            init_fn is None
            or self.has_variable(col, name)
            or not self.is_mutable_collection(col)
        ):
            return orig_variable(self, col, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        seen = {}

        def spy(*args, **kwargs):
            out, program = rec.run(lambda: init_fn(*args, **kwargs))
            seen.update(out=out, program=program)
            return out

        value = orig_variable(self, col, name, spy, *init_args, unbox=unbox, **init_kwargs)
        if seen:
            path = tuple(self.path) + (name,)
            rec.records[(col, path)] = Record(
                col, path, init_fn, init_args, init_kwargs, False, None, seen["out"],
                program=seen["program"],
            )
        return value

    hooks = {
        "flax.core.scope._fold_in_static": fold,
        "flax.core.scope.Scope.param": param,
        "flax.core.scope.Scope.variable": variable,
        "jax.checkpoint": remat,
        "jax.remat": remat,
        "jax.random.split": split,
        "jax.random.clone": clone,
        "jax.lax.scan": scan,
        "jax.vmap": vmap,
    }
    with _compat.thread_patches(hooks):
        yield rec
