"""Programs: what a leaf's initializer computes, as a traced jaxpr with a sound cache key.

Caching a compiled initializer by how the Python function *looks* (its code object and
closure) is unsound: two closures with the same code can capture different arrays, read
a changed global, or be bound methods of objects whose state changed. Here a function is
traced for the exact leaf it makes (``jax.make_jaxpr``), and the compiled-code cache is
keyed by the traced program itself: every primitive, its parameters, literal values, and
the values of small captured constants. Large captured constants are not baked into the
compiled code at all: they are passed as arguments at every call, so only their shapes
and dtypes enter the key. Equal keys therefore mean equal computations on equal inputs;
two ``normal(0.02)`` closures still share one compiled function, and anything that
computes something else gets its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from flaxlazy._src import _compat
from flaxlazy._src import cache as cache_lib

# Captured constants up to this many bytes are baked into compiled code (keyed by value);
# larger ones are passed as runtime arguments (keyed by shape and dtype only).
BAKE_BYTES = 4096

# Primitive parameters that only define derivatives, never forward values.
_DERIVATIVE_ONLY = frozenset(
    {"jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd", "out_trees",
     "symbolic_zeros", "jvp", "transpose"}
)

# Primitives that keep a row-major array's elements in order (a ``reshape`` without
# ``dimensions``) or only repeat them: a reshaped fill stays a fill (``fill_value``), a
# reshaped random block keeps its flat indices (``draw.chunked``).
SAME_LAYOUT = frozenset({"reshape", "broadcast_in_dim", "expand_dims", "squeeze"})

# jaxpr -> its key, for as long as the jaxpr lives: JAX reuses inner jaxprs (a jitted
# ``jnp`` function's, per shape) and keeps them in its own bounded caches; holding them
# here would keep them, and what JAX caches by them, alive for longer.
_SUB_KEYS = cache_lib.ByObject()


class Unkeyable(Exception):
    """A program with a part whose identity cannot be captured; it is never cached."""


class Program(NamedTuple):
    """A traced ``fn(*args)`` with its cache key.

    Attributes:
      jaxpr: the closed jaxpr (its constants are the captured values).
      key: a hashable identity: equal keys compute equal outputs from equal arguments
        and equal ``runtime_consts``. None when some part cannot be keyed (not cached).
      baked: per constant, whether it is small enough to be compiled in (and is keyed by
        value) rather than passed at run time.
      out_tree: the output pytree structure.
    """

    jaxpr: Any
    key: Hashable | None
    baked: tuple[bool, ...]
    out_tree: Any

    def as_single_output(self) -> Program:
        """The same program returning its one output array bare (e.g. out of a box)."""
        if self.out_tree.num_leaves != 1:
            raise ValueError(f"the program has {self.out_tree.num_leaves} outputs, not one")
        plain = jax.tree_util.tree_structure(0)
        key = None if self.key is None else self.key[:-1] + (plain,)
        return self._replace(key=key, out_tree=plain)

    @property
    def runtime_consts(self) -> list:
        """The constants passed as arguments at every call (the large ones)."""
        return [c for c, b in zip(self.jaxpr.consts, self.baked, strict=True) if not b]


def trace(fn: Callable[..., Any], *args: Any) -> Program:
    """Traces ``fn(*args)`` (``args`` abstract or concrete) to a keyed ``Program``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
      >>> a = trace(lambda k: jax.random.normal(k, (3,)) * 2.0, spec)
      >>> b = trace(lambda k: jax.random.normal(k, (3,)) * 2.0, spec)
      >>> c = trace(lambda k: jax.random.normal(k, (3,)) * 3.0, spec)
      >>> a.key == b.key, a.key == c.key
      (True, False)
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    return from_closed(closed, jax.tree_util.tree_structure(out_shape))


def from_closed(closed: Any, out_tree: Any) -> Program:
    """The ``Program`` of a closed jaxpr (e.g. one cut out of a larger trace)."""
    baked = tuple(_bakeable(c) for c in closed.consts)
    key = _key_or_none(lambda: (
        _jaxpr_key(closed.jaxpr),
        tuple(_value_key(c) if b else _aval_key(_compat.aval(c))
              for c, b in zip(closed.consts, baked, strict=True)),
        out_tree,
    ))
    return Program(closed, key, baked, out_tree)


def runner(program: Program, draw: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """``run(runtime_consts, *args)``: ``fn(*args)`` evaluated from the program.

    Trace it inside ``jax.jit``. It holds the jaxpr and the baked (small) constants only,
    so a cached compiled function never keeps a large captured array alive. ``draw``,
    if given, evaluates instead as ``draw(*args, consts)`` (a chunked draw of the same
    jaxpr).
    """
    jaxpr, out_tree, baked = program.jaxpr.jaxpr, program.out_tree, program.baked
    kept = [c if b else None for c, b in zip(program.jaxpr.consts, baked, strict=True)]

    def run(runtime: list, *args: Any) -> Any:
        it = iter(runtime)
        consts = [c if b else next(it) for c, b in zip(kept, baked, strict=True)]
        if draw is not None:
            return draw(*args, consts)
        flat = _compat.eval_jaxpr(jaxpr, consts, *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(out_tree, flat)

    return run


def fill_value(program: Program) -> Any:
    """The scalar a program fills its one output with, whatever its inputs, or None.

    ``jnp.zeros(shape)``, ``jnp.ones(shape, bf16)``, ``jnp.full(shape, 7)``: a broadcast
    of a literal, possibly reshaped (``zeros(flat_shape).reshape(shape)``), nothing else.
    Such a leaf needs no compiled code at all.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(fill_value(trace(lambda: jnp.ones((2, 3), jnp.bfloat16))))
      1.0
      >>> float(fill_value(trace(lambda: jnp.zeros(6).reshape(2, 3))))
      0.0
      >>> fill_value(trace(lambda: jnp.arange(3.0))) is None
      True
    """
    jaxpr = program.jaxpr.jaxpr  # its inputs (a key it ignores) may not be read
    if jaxpr.constvars or len(jaxpr.outvars) != 1:
        return None
    (out,) = jaxpr.outvars
    if _compat.is_literal(out):
        return _compat.literal_value(out)
    value, filled = None, set()
    for eqn in jaxpr.eqns:
        if len(eqn.invars) != 1 or len(eqn.outvars) != 1:
            return None
        (operand,) = eqn.invars
        name = eqn.primitive.name
        if name == "broadcast_in_dim" and _compat.is_literal(operand) and value is None:
            value = _compat.literal_value(operand)
        elif not (name in SAME_LAYOUT and operand in filled
                  and eqn.params.get("dimensions") is None):
            return None
        filled.add(eqn.outvars[0])
    return value if out in filled else None


def eval_constants(closed: Any) -> list:
    """The outputs of a closed jaxpr without inputs (values computed from constants).

    Integer arithmetic (stream counters: ``broadcast_in_dim``, ``add``, conversions) is
    evaluated in numpy, with XLA's wrap-around, and so are the operations that only move
    elements (``broadcast_in_dim``, ``reshape``, ``squeeze``: a ``zeros`` bias) of any
    dtype: evaluating them eagerly in JAX would compile each operation for each shape (a
    counter batched over 48 layers, then 49), and JAX keeps every such executable (about
    2 MiB each) for the life of the process. Anything else is evaluated by JAX.
    """
    env = dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    pending: list = []  # equations for JAX, evaluated together (one jaxpr, not one each)
    made: set = set()  # their outputs

    def read(v):
        return _compat.literal_value(v) if _compat.is_literal(v) else env[v]

    def flush():
        if not pending:
            return
        free = list(dict.fromkeys(v for e in pending for v in e.invars
                                  if not _compat.is_literal(v) and v not in made))
        outs = [v for e in pending for v in e.outvars if not _compat.is_dropvar(v)]
        run = _compat.new_closed_jaxpr([], [], free, outs, pending)
        with jax.ensure_compile_time_eval():
            env.update(zip(outs, _compat.eval_jaxpr(run.jaxpr, [], *map(read, free)),
                           strict=True))
        pending.clear()
        made.clear()

    for eqn in closed.jaxpr.eqns:
        if any(not _compat.is_literal(v) and v in made for v in eqn.invars):
            if eqn.primitive.name not in _NUMPY_OPS:
                pending.append(eqn)
                made.update(eqn.outvars)
                continue
            flush()  # an integer operation on their outputs: evaluate them first
        out = _numpy_op(eqn, [read(v) for v in eqn.invars])
        if out is not None:
            env[eqn.outvars[0]] = out
        else:
            pending.append(eqn)
            made.update(eqn.outvars)
    flush()
    return [read(v) for v in closed.jaxpr.outvars]


_INTEGER_OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply}
# Operations that only move or repeat elements: exact in numpy for every dtype.
_MOVES = frozenset({"broadcast_in_dim", "reshape", "squeeze"})
_NUMPY_OPS = frozenset(_INTEGER_OPS) | {"convert_element_type"} | _MOVES


def in_numpy(eqn: Any) -> bool:
    """Whether ``eval_constants`` evaluates ``eqn`` in numpy, by its types: integer
    arithmetic, or an operation that moves elements of one dtype."""
    name = eqn.primitive.name
    if name not in _NUMPY_OPS or len(eqn.outvars) != 1:
        return False
    dtype = getattr(eqn.outvars[0].aval, "dtype", None)
    dtypes = [getattr(v.aval, "dtype", None) for v in eqn.invars]
    if name in _MOVES and isinstance(dtype, np.dtype) and all(d == dtype for d in dtypes):
        return eqn.params.get("sharding") is None  # see _moved
    return _integer(dtype) and all(map(_integer, dtypes))


def _numpy_op(eqn: Any, ins: list) -> np.ndarray | None:
    """One operation evaluated in numpy (integer arithmetic, or moving elements of any
    dtype), or None if it is not one of those."""
    name = eqn.primitive.name
    if name not in _NUMPY_OPS or len(eqn.outvars) != 1:
        return None
    dtype = getattr(eqn.outvars[0].aval, "dtype", None)
    if name in _MOVES and _all_of_dtype(ins, dtype):
        return _moved(eqn, name, np.asarray(ins[0]), dtype)
    if not _integer(dtype) or not all(map(_is_integer, ins)):
        return None
    try:
        with np.errstate(over="ignore"):  # wrapping around, as XLA does
            return _integer_value(eqn, name, dtype, [np.asarray(x) for x in ins])
    except (TypeError, ValueError, OverflowError):
        return None


def _integer(dtype: Any) -> bool:
    try:
        return dtype is not None and np.issubdtype(dtype, np.integer)
    except TypeError:  # e.g. a key type
        return False


def _is_integer(x: Any) -> bool:
    """An integer Python number or concrete array (not a tracer, not a bool)."""
    if isinstance(x, jax.core.Tracer) or isinstance(x, bool):
        return False
    return isinstance(x, int) or _integer(getattr(x, "dtype", None))


def _all_of_dtype(ins: list, dtype: Any) -> bool:
    """Whether every input is a concrete array (or literal) of exactly ``dtype``, a
    numpy dtype (not a key type)."""
    if not isinstance(dtype, np.dtype) or not ins:
        return False
    return all(
        not isinstance(x, jax.core.Tracer) and not _compat.is_key_array(x)
        and isinstance(getattr(x, "dtype", None), np.dtype) and x.dtype == dtype
        for x in ins
    )


def _integer_value(eqn: Any, name: str, dtype: Any, ins: list) -> np.ndarray | None:
    if name in _INTEGER_OPS:
        a, b = (x.astype(dtype) for x in ins)
        return np.asarray(_INTEGER_OPS[name](a, b), dtype)
    if name == "convert_element_type":
        return ins[0].astype(dtype)
    if name in _MOVES:
        return _moved(eqn, name, ins[0].astype(dtype), dtype)
    return None


def _moved(eqn: Any, name: str, x: np.ndarray, dtype: Any) -> np.ndarray | None:
    """``x`` broadcast, reshaped or squeezed as the equation says; None for a variant
    numpy does not evaluate exactly so (a sharded result, a transposing reshape)."""
    params = eqn.params
    if params.get("sharding") is not None:
        return None
    if name == "broadcast_in_dim":
        shape = [1] * len(params["shape"])
        for axis, size in zip(params["broadcast_dimensions"], x.shape, strict=True):
            shape[axis] = size
        return np.array(np.broadcast_to(x.reshape(shape), params["shape"]), dtype)
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        return np.array(x.reshape(params["new_sizes"]), dtype)
    if name == "squeeze":
        return np.array(np.squeeze(x, axis=tuple(params["dimensions"])), dtype)
    return None


def jaxpr_key(jaxpr: Any) -> Hashable | None:
    """The structural key of an open jaxpr (constants as inputs), or None if unkeyable."""
    return _key_or_none(lambda: _jaxpr_key(jaxpr))


def _key_or_none(build: Callable[[], Hashable]) -> Hashable | None:
    try:
        key = build()
        hash(key)
    except (Unkeyable, TypeError):
        return None
    return key


def leaked_tracers(program: Program) -> bool:
    """Whether the program captured tracers of an enclosing trace (data-dependent)."""
    return any(isinstance(c, jax.core.Tracer) for c in program.jaxpr.consts)


def _bakeable(c: Any) -> bool:
    if isinstance(c, jax.core.Tracer) or _compat.is_key_array(c):
        return False
    return np.asarray(c).nbytes <= BAKE_BYTES


def _aval_key(aval: Any) -> tuple:
    return (
        type(aval).__name__, tuple(getattr(aval, "shape", ())), _name(getattr(aval, "dtype", "")),
        bool(getattr(aval, "weak_type", False)), _hashable(getattr(aval, "sharding", None)),
    )


def _name(dtype: Any) -> str:
    """A dtype's name, one string object per name (cached keys hold thousands)."""
    return sys.intern(str(dtype))


def _hashable(x: Any) -> Any:
    try:
        hash(x)
    except TypeError as e:
        raise Unkeyable(repr(x)) from e
    return x


def _value_key(x: Any) -> tuple:
    """A concrete value by dtype, shape and bytes (``1``, ``1.0`` and ``True`` differ)."""
    if isinstance(x, jax.core.Tracer):
        raise Unkeyable("a tracer")
    if _compat.is_key_array(x):
        x = jax.random.key_data(x)
    arr = np.asarray(x)
    return ("value", type(x).__name__, _name(arr.dtype), arr.shape, arr.tobytes())


def _param_key(name: str, v: Any) -> Any:
    if name in _DERIVATIVE_ONLY:
        return None
    if _compat.is_closed_jaxpr(v):
        return ("closed", _sub_key(v.jaxpr), tuple(_value_key(c) for c in v.consts))
    if _compat.is_jaxpr(v):
        return ("jaxpr", _sub_key(v))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_param_key("", x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _param_key("", x)) for k, x in v.items())))
    if isinstance(v, (bool, int, float, complex, str, type(None))):
        return (type(v).__name__, v)
    if isinstance(v, np.dtype):
        return ("dtype", _name(v))
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        return _value_key(v)
    # Shardings, meshes, enums, dimension numbers...: hashable by value, or by identity
    # (kept alive by the key, so the identity cannot be reused).
    return (type(v).__qualname__, _hashable(v))


def _sub_key(jaxpr: Any) -> tuple:
    return _SUB_KEYS.get(jaxpr, _jaxpr_key)


def _jaxpr_key(jaxpr: Any) -> tuple:
    """Every equation by primitive, parameters and operands; variables by position."""
    names: dict[Any, int] = {}

    def bind(v: Any) -> tuple:
        names[v] = len(names)
        return _aval_key(v.aval)

    def ref(v: Any) -> Any:
        if _compat.is_literal(v):
            return _value_key(v.val) + (_aval_key(v.aval),)
        return names[v] if v in names else ("free", _aval_key(v.aval))

    head = (tuple(bind(v) for v in jaxpr.constvars), tuple(bind(v) for v in jaxpr.invars))
    eqns = []
    for eqn in jaxpr.eqns:
        ins = tuple(ref(v) for v in eqn.invars)
        params = tuple(sorted((k, _param_key(k, p)) for k, p in eqn.params.items()))
        outs = tuple(bind(v) for v in eqn.outvars)
        eqns.append((eqn.primitive.name, ins, params, outs))
    return head + (tuple(eqns), tuple(ref(v) for v in jaxpr.outvars))
