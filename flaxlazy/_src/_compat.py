"""Every private JAX, Flax and Orbax API flaxlazy touches, in one place, checked before use.

This module imports only JAX, Flax, Orbax and the standard library: nothing of flaxlazy
(an import-linter contract in ``pyproject.toml`` keeps it a leaf). Public names are used
wherever JAX offers one (``jax.extend.core`` for the jaxpr types, ``jax.extend.random``
for the ``threefry2x32`` primitive); ``jax._src`` only where it offers none.

flaxlazy reproduces Flax's parameter values by replaying how Flax derives each key
(``flax.core.scope._fold_in_static``, ``Scope.param``/``Scope.variable``) and draws large
leaves in chunks by re-evaluating jaxprs. None of that is public API, so ``fast_path()``
and ``chunking_ok()`` check once, on first use, that each piece exists and behaves as
expected: a key derived the way flaxlazy derives it equals Flax's, and a chunked draw
equals the whole draw. Those checks run flaxlazy's own code, so they live above this
module (``self_checks.py``) and register here (``register_self_check``). On a version
where a check fails, materialization falls back to one compiled run of ``module.init``
(always equal to ``jax.jit(module.init)``) and warns once, naming the failed check,
rather than risk a wrong value.

Process-wide changes, and threads. Where Flax, JAX or Orbax offer no hook, flaxlazy changes
process-wide state, and only here, always under one lock (``_PROCESS_LOCK``):

- ``thread_patches`` wraps a few Flax/JAX functions (``Scope.param``, ``jax.vmap``,
  ``RngStream.__call__``...; the list is ``_patch_points``) while any thread traces a
  model, and puts the originals back when the last one is done. A wrapper dispatches per
  thread: only a thread inside a ``thread_patches`` block sees its hooks; every other call
  runs the original. Caveats: while any thread traces, every thread's calls of those
  functions pass through the wrapper (one thread-local lookup); a thread started inside a
  block does not inherit its hooks (what it creates is not recorded, so those variables
  come from the traced run, with the same values); a reference to a wrapped function
  taken while it is installed (``from jax import vmap`` in a module first imported during
  a trace) keeps the wrapper, which then only calls the original; and a function patched
  again by someone else while wrapped keeps their patch on top of the wrapper.
- ``orbax_quiet`` installs, once per process and for its lifetime, a logging filter and a
  ``sys.unraisablehook`` that drop only Orbax's failure noise from the threads of a
  running ``orbax_quiet`` block (see there); everything else passes through.

Python's cyclic garbage collector is also paused, process-wide, while any thread traces;
that switch is not a private API and is counted in ``gc_pause.py``.

The supported versions are declared in ``pyproject.toml``; Orbax internals are used by
``checkpoint/orbax_io.py`` and ``checkpoint/integrity.py`` only through the ``orbax_*``
functions here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex_core
from flax import config as flax_config
from flax.core import scope as flax_scope
from jax.extend import random as jex_random
from jax.extend.core import primitives as jex_primitives

try:  # jax internals without a public name: the trace state, dead-code elimination
    from jax._src import core as _core
    from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover - depends on the installed jax
    _core = _pe = None

FALLBACK_WARNING = (
    "flaxlazy: this jax {jax} / flax {flax} pair fails flaxlazy's self-check ({reason}). "
    "Falling back to one compiled run of module.init for every variable: values are "
    "still exactly jax.jit(module.init)'s, but without the per-parameter fast path "
    "(compile time grows with depth). Supported versions are declared in flaxlazy's "
    "package metadata."
)

# Every change this module makes to process-wide state (patches, filters) happens under it.
_PROCESS_LOCK = threading.Lock()

threefry2x32_p = jex_random.threefry2x32_p  # the raw threefry primitive, for chunked draws


# ----------------------------------------------------------------------------- jaxprs
def aval(x: Any) -> Any:
    """The abstract value of an array or tracer (public ``jax.typeof``)."""
    return jax.typeof(x)


def eval_jaxpr(jaxpr: Any, consts: list, *args: Any) -> list:
    return jax.core.eval_jaxpr(jaxpr, consts, *args)


def inner_jaxprs(eqn: Any) -> list:
    """The jaxprs an equation runs (a ``jit``'s, a ``scan``'s body...), not recursively."""
    return list(jex_core.jaxprs_in_params(eqn.params))


def is_jaxpr(x: Any) -> bool:
    return isinstance(x, jex_core.Jaxpr)


def is_closed_jaxpr(x: Any) -> bool:
    return isinstance(x, jex_core.ClosedJaxpr)


def is_literal(x: Any) -> bool:
    return isinstance(x, jex_core.Literal)


def trace_state_clean() -> bool:
    """Whether no JAX transformation is tracing right now (calls run eagerly)."""
    return _core.trace_state_clean()


def is_key_array(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def literal_value(x: Any) -> Any:
    """The value of a jaxpr ``Literal``."""
    return x.val


def is_dropvar(x: Any) -> bool:
    return isinstance(x, jex_core.DropVar)


def new_closed_jaxpr(
    constvars: list, consts: list, invars: list, outvars: list, eqns: list
) -> Any:
    """A ``ClosedJaxpr`` assembled from parts of another jaxpr (vars shared with it)."""
    effects = set().union(*(eqn.effects for eqn in eqns)) if eqns else frozenset()
    info = jex_core.DebugInfo(
        "flaxlazy", "a slice of a traced constructor", tuple(f"in{i}" for i in range(len(invars))),
        tuple(f"out{i}" for i in range(len(outvars))),
    )
    jaxpr = jex_core.Jaxpr(constvars, invars, outvars, eqns, effects, info)
    return jex_core.ClosedJaxpr(jaxpr, consts)


def key_impl(dtype: Any) -> Any:
    """The PRNG implementation of a key dtype (``key<fry>``: threefry2x32)."""
    return dtype._impl


def convert_constvars_jaxpr(jaxpr: Any) -> Any:
    return _pe.convert_constvars_jaxpr(jaxpr)


def dce_jaxpr(jaxpr: Any, used_outputs: list[bool]) -> tuple[Any, list[bool]]:
    """Dead-code elimination: the jaxpr pruned to ``used_outputs``, and its used inputs."""
    return _pe.dce_jaxpr(jaxpr, used_outputs)


def uint_dtype(bit_width: int) -> Any:
    """The unsigned dtype ``jax.random.bits`` returns for ``bit_width`` (``jnp.uint8``...)."""
    return getattr(jax.numpy, f"uint{bit_width}")


# Primitives that call a sub-jaxpr. Their names change across jax versions (``pjit``
# became ``jit``, ``checkpoint`` became ``remat2``): this version's names, read off
# ``jax.extend``, and the older ones.
CALL_PRIMITIVES = frozenset(
    {p.name for p in (jex_primitives.jit_p, jex_primitives.closed_call_p,
                      jex_primitives.call_p, jex_primitives.remat_p)}
    | {"pjit", "core_call", "remat", "checkpoint"}
)


# ------------------------------------------------------------------------------ flax
Scope = flax_scope.Scope


def static_hash(data: tuple[str | int, ...]) -> int:
    """The uint32 that Flax's private ``_fold_in_static`` folds into a key for ``data``
    (a variable's path), computed as Flax computes it; ``self_checks`` verifies it."""
    m = hashlib.sha1()
    for x in data:
        if flax_config.flax_fix_rng_separator:
            m.update(b"\00")
        if isinstance(x, str):
            m.update(x.encode("utf-8"))
        elif isinstance(x, int):
            m.update(x.to_bytes((x.bit_length() + 7) // 8, byteorder="big"))
        else:
            raise ValueError(f"Expected int or string, got: {x}")
    return int.from_bytes(m.digest()[:4], byteorder="big")


# ------------------------------------------------------------------------------- nnx
def nnx_variable_name(kind: type) -> str | None:
    """NNX's registered collection name for a variable type (``BatchStat``: ``batch_stats``)."""
    from flax.nnx import variablelib

    try:
        return variablelib.variable_name_from_type(kind, allow_register=False)
    except (ValueError, AttributeError, TypeError):
        return None


def nnx_unconstrained() -> contextlib.AbstractContextManager:
    """NNX variables created inside (on this thread) are not sharding-constrained (their
    metadata, e.g. ``eager_sharding``, stays as NNX sets it): flaxlazy places every leaf
    itself."""

    def shard_value(original, value, *args, **kwargs):
        del original, args, kwargs
        return value

    return thread_patches({"flax.core.spmd.shard_value": shard_value})


def nnx_sharding_names(variable: Any) -> tuple | None:
    """The axis names of an NNX variable's sharding annotation, or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for name in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(name)
        if names is not None:
            spec = getattr(names, "spec", names)  # a NamedSharding
            return tuple(spec)
    return None


def nnx_sharding_rules(variable: Any) -> Any:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("sharding_rules")


# -------------------------------------------------------------------- thread patches
# Flax offers no hook where a Linen variable is created or an NNX stream hands out a
# key, so flaxlazy wraps a few functions while it traces: installed while any thread
# traces, dispatching per thread (how, and the caveats: the module docstring).
def _patch_points() -> dict[str, tuple[Any, str]]:
    from flax.core import spmd
    from flax.nnx import rnglib

    return {
        "flax.core.scope._fold_in_static": (flax_scope, "_fold_in_static"),
        "flax.core.scope.Scope.param": (flax_scope.Scope, "param"),
        "flax.core.scope.Scope.variable": (flax_scope.Scope, "variable"),
        "flax.core.spmd.shard_value": (spmd, "shard_value"),
        "flax.nnx.rnglib.RngStream.__call__": (rnglib.RngStream, "__call__"),
        "jax.checkpoint": (jax, "checkpoint"),
        "jax.remat": (jax, "remat"),
        "jax.random.split": (jax.random, "split"),
        "jax.random.clone": (jax.random, "clone"),
        "jax.lax.scan": (jax.lax, "scan"),
        "jax.vmap": (jax, "vmap"),
    }


_MISSING = object()
_PATCH_USERS = [0]  # threads inside ``thread_patches`` right now
_INSTALLED: dict[str, tuple[Any, str, Any, Any]] = {}  # point -> owner, name, was, wrapper
_HOOKS = threading.local()  # .stack: this thread's hook tables, innermost last


def _hooked(point: str, original: Any) -> Any:
    """``original`` behind this thread's hooks for ``point`` (innermost first)."""
    fn = original
    for table in getattr(_HOOKS, "stack", ()):
        hook = table.get(point)
        if hook is not None:
            fn = functools.partial(hook, fn)
    return fn


def _wrapper(point: str, original: Any) -> Any:
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if not getattr(_HOOKS, "stack", None):
            return original(*args, **kwargs)
        return _hooked(point, original)(*args, **kwargs)

    return dispatch


def _install() -> None:
    for point, (owner, name) in _patch_points().items():
        current = getattr(owner, name, _MISSING)
        if current is _MISSING:
            continue  # (jax.random.clone, on a jax without it)
        # A class's own attribute is put back; an inherited one is deleted again.
        was = vars(owner).get(name, _MISSING) if isinstance(owner, type) else current
        wrapper = _wrapper(point, current)
        setattr(owner, name, wrapper)
        _INSTALLED[point] = (owner, name, was, wrapper)


def _uninstall() -> None:
    for owner, name, was, wrapper in _INSTALLED.values():
        if getattr(owner, name, _MISSING) is not wrapper:
            continue  # patched again by someone else since: theirs stays
        if was is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, was)
    _INSTALLED.clear()


@contextlib.contextmanager
def thread_patches(hooks: dict[str, Any]):
    """Hooks on Flax/JAX functions, seen by the calling thread only, inside the block.

    Args:
      hooks: patch point (a key of ``_patch_points()``: the function's dotted name) ->
        ``hook(original, *args, **kwargs)``, called instead of the function on this
        thread; ``original`` is the function itself (or the enclosing block's hook).
        Methods get ``self`` after ``original``.

    Examples:
      >>> import threading, jax
      >>> seen = []
      >>> def split(original, key, num=2):
      ...     seen.append(num)
      ...     return original(key, num)
      >>> plain = jax.random.split
      >>> with thread_patches({"jax.random.split": split}):
      ...     _ = jax.random.split(jax.random.key(0), 3)
      ...     t = threading.Thread(target=jax.random.split, args=(jax.random.key(0), 4))
      ...     t.start(); t.join()
      >>> seen, jax.random.split is plain
      ([3], True)
    """
    unknown = set(hooks) - _patch_points().keys()
    if unknown:
        raise ValueError(f"unknown patch points {sorted(unknown)}")
    with _PROCESS_LOCK:
        if _PATCH_USERS[0] == 0:
            _install()
        _PATCH_USERS[0] += 1
    stack = _HOOKS.__dict__.setdefault("stack", [])
    stack.append(dict(hooks))
    try:
        yield
    finally:
        stack.pop()
        with _PROCESS_LOCK:
            _PATCH_USERS[0] -= 1
            if _PATCH_USERS[0] == 0:
                _uninstall()


# ---------------------------------------------------------------------------- meshes
def concrete_mesh() -> Any:
    """The concrete mesh of a ``jax.set_mesh`` around this call, or None; unlike
    ``jax.sharding.get_mesh`` it may be asked inside a trace."""
    from jax._src import mesh as mesh_lib

    return mesh_lib.get_concrete_mesh()


def eager_outside_abstract_mesh() -> Any:
    """A context in which a value computed eagerly at trace time needs no devices.

    Under an ``AbstractMesh`` alone (``jax.sharding.use_abstract_mesh``, as ``inspect``
    traces on a mesh it may not have), JAX refuses to compute anything eagerly; inside
    this context the abstract mesh is set aside, and everything else is as it was.
    """
    if not devices_lacking():
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def devices_lacking() -> bool:
    """Whether this context has a mesh but not its devices (an ``AbstractMesh`` alone,
    ``jax.sharding.use_abstract_mesh``, as ``inspect`` traces on a mesh it may not have):
    then an equation traced under that mesh may not be evaluated (``names_a_mesh``)."""
    if jax.sharding.get_abstract_mesh().empty:
        return False
    concrete = concrete_mesh()
    return concrete is None or concrete.empty


def names_a_mesh(eqn: Any) -> bool:
    """Whether evaluating a jaxpr equation needs the mesh it was traced under: its outputs
    are laid out on the mesh, or JAX recorded the mesh with it (its ``ctx``, a ``jit``'s
    ``ctx_mesh``)."""
    meshes = [getattr(getattr(v.aval, "sharding", None), "mesh", None) for v in eqn.outvars]
    meshes += [eqn.params.get("ctx_mesh"), getattr(eqn.ctx, "cur_abstract_mesh", None)]
    return any(mesh is not None and not mesh.empty for mesh in meshes)


def legacy_mesh() -> Any:
    """The mesh of a deprecated ``with mesh:`` block around this call (empty if none)."""
    from jax._src import mesh as mesh_lib

    return mesh_lib.thread_resources.env.physical_mesh


# ----------------------------------------------------------------------------- orbax
def orbax_type_handler_registry() -> Any:
    """Orbax's type-handler registry module (private), or None on another layout."""
    try:
        from orbax.checkpoint._src.serialization import type_handler_registry
    except ImportError:  # pragma: no cover - depends on the installed orbax
        return None
    return type_handler_registry


def orbax_tensorstore_utils() -> Any:
    """Orbax's TensorStore helpers (``ArrayReadSpec``, ``get_ts_context``; private)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    return tensorstore_utils


# When a save or read fails, Orbax's worker threads log the error again, traceback and
# all, at ERROR level ("_SignalingThread.run() raised an exception"), and TensorStore
# callbacks that finish after Orbax closed its event loop report "RuntimeError: Event
# loop is closed" through ``sys.unraisablehook``; flaxlazy raises one error of its own
# instead. Orbax offers no switch for either, so two filters are installed once, on
# first use, and act narrowly: the log filter drops Orbax's WARNING-and-above records
# only from the threads of a running ``orbax_quiet`` block (the thread that entered it,
# and threads started while it runs); the unraisable filter drops only that
# closed-loop error, raised in a callback from native code, once an ``orbax_quiet``
# block is running or has failed. Everything else passes through unchanged.
_QUIET_BLOCKS: dict[int, tuple[int, frozenset]] = {}  # id -> (owner thread, threads before)
_QUIET_FAILED = [False]


@functools.cache
def _orbax_folder() -> str:
    import os

    import orbax.checkpoint

    return os.path.dirname(orbax.checkpoint.__file__) + os.sep


def _quiet_record(record: Any) -> bool:
    """A ``logging`` filter: False for an Orbax warning or error from a quiet thread."""
    import logging

    blocks = list(_QUIET_BLOCKS.values())
    if (not blocks or record.levelno < logging.WARNING
            or not record.pathname.startswith(_orbax_folder())):
        return True
    return not any(record.thread == owner or record.thread not in before
                   for owner, before in blocks)


def _late_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable error is a native callback finding its event loop closed."""
    tb = unraisable.exc_traceback
    return (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
        and tb.tb_frame.f_back is None  # called from native code, not from Python
    )


def _install_quiet_filters() -> None:
    import logging
    import sys

    absl = logging.getLogger("absl")
    if _quiet_record not in absl.filters:
        absl.addFilter(_quiet_record)
    previous = sys.unraisablehook
    if getattr(previous, "_flaxlazy_quiet", False):
        return

    def unraisable_hook(unraisable: Any) -> None:
        if (_QUIET_BLOCKS or _QUIET_FAILED[0]) and _late_loop_callback(unraisable):
            return
        previous(unraisable)

    unraisable_hook._flaxlazy_quiet = True
    sys.unraisablehook = unraisable_hook


@contextlib.contextmanager
def orbax_quiet():
    """A block whose Orbax failures reach the caller only as the exception raised.

    Examples:
      >>> with orbax_quiet():
      ...   pass
    """
    key = object()
    with _PROCESS_LOCK:
        _install_quiet_filters()
        before = frozenset(t.ident for t in threading.enumerate())
        _QUIET_BLOCKS[id(key)] = (threading.get_ident(), before)
    try:
        yield
    except BaseException:
        _QUIET_FAILED[0] = True
        raise
    finally:
        with _PROCESS_LOCK:
            del _QUIET_BLOCKS[id(key)]


def orbax_threads() -> set[threading.Thread]:
    """The threads Orbax runs right now (its writers, signalling and metadata threads)."""
    return {t for t in threading.enumerate() if type(t).__module__.startswith("orbax.")}


# ----------------------------------------------------------------------- self-checks
# The checks that run flaxlazy's own code (its key hash, its chunked draws) live in
# ``self_checks.py``, above this module, and register here when it is imported
# (``flaxlazy/__init__.py`` imports it). A verdict without its checks is negative.
_SELF_CHECKS: dict[str, list[Callable[[], None]]] = {"fast_path": [], "chunking": []}


def register_self_check(verdict: str, check: Callable[[], None]) -> None:
    """Adds ``check`` to the checks behind ``fast_path()`` or ``chunking_ok()``.

    Args:
      verdict: ``"fast_path"`` (replaying Flax's key derivation) or ``"chunking"``
        (chunked draws bit-identical to whole draws).
      check: called with no arguments; raises (any exception) where flaxlazy's code
        disagrees with the installed JAX/Flax. Registering the same check again does
        nothing. Verdicts already computed are cached (``fast_path.cache_clear()``).

    Examples:
      >>> sorted(_SELF_CHECKS)
      ['chunking', 'fast_path']
      >>> [check.__name__ for check in _SELF_CHECKS["fast_path"]]
      ['check_key_derivation']
    """
    checks = _SELF_CHECKS[verdict]
    if check not in checks:
        checks.append(check)


def _check_jaxpr_tools() -> None:
    for name, obj in (("jax._src.core", _core), ("partial_eval", _pe)):
        if obj is None:
            raise AssertionError(f"{name} is missing")
    closed = jax.make_jaxpr(lambda x: (x + 1.0, x * 2.0))(1.0)
    pruned, used = dce_jaxpr(convert_constvars_jaxpr(closed.jaxpr), [False, True])
    names = [eqn.primitive.name for eqn in pruned.eqns]
    if names != ["mul"] or used != [True] or len(pruned.outvars) != 1:
        raise AssertionError("dce_jaxpr behaves differently")


_UNREGISTERED = "no self-check registered (flaxlazy._src.self_checks was not imported)"


@functools.cache
def fast_path() -> tuple[bool, str]:
    """``(True, "")`` when the replay fast path is sound here, else ``(False, reason)``."""
    for check in (_check_jaxpr_tools, *_SELF_CHECKS["fast_path"]):
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure means "don't trust it"
            return False, f"{check.__name__.lstrip('_')}: {type(e).__name__}: {e}"
    if not _SELF_CHECKS["fast_path"]:
        return False, _UNREGISTERED
    return True, ""


def warn_if_fallback() -> bool:
    """True if the fast path is usable; otherwise warns (once per process) and False."""
    ok, reason = fast_path()
    if not ok and not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            FALLBACK_WARNING.format(jax=jax.__version__, flax=_flax_version(), reason=reason),
            RuntimeWarning, stacklevel=3,
        )
    return ok


_WARNED: list[bool] = []


def _flax_version() -> str:
    import flax

    return getattr(flax, "__version__", "?")


@functools.cache
def chunking_ok() -> bool:
    """Whether chunked draws are bit-identical to whole draws here (checked once)."""
    checks = _SELF_CHECKS["chunking"]
    if not checks:
        return False
    try:
        for check in checks:
            check()
    except Exception:  # noqa: BLE001 - any failure means "draw whole"
        return False
    return True
