"""The Linen entrance: a ``module.init`` call, traced abstractly with its variables recorded."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import errors as flax_errors
from flax.core.scope import DenyList

from flaxlazy._src import _compat
from flaxlazy._src import gc_pause
from flaxlazy._src import paths
from flaxlazy._src import placement as placement_lib
from flaxlazy._src import specs
from flaxlazy._src import traced_call
from flaxlazy._src.linen import optimizer as optimizer_lib
from flaxlazy._src.linen import recorder as recorder_lib

DEFAULT_MUTABLE = DenyList("intermediates")
PARAMS = "params"


@dataclasses.dataclass(frozen=True)
class InitCall:
    """One ``module.init`` call with its array inputs split from its static ones.

    Array-like leaves of the inputs (arrays and ShapeDtypeStructs) are "dynamic": they
    count only by shape and dtype. Every other leaf (Python flags, strings, modules) is
    static and passed through as is, exactly as ``module.init`` would see it.
    """

    module: nn.Module
    method: Any
    mutable: Any
    init_kwargs: tuple  # extra Module.init options, e.g. capture_intermediates
    treedef: Any  # of (args, kwargs)
    static: tuple  # leaves, with None where a dynamic leaf goes
    rngs: Any  # the abstract rngs (a ShapeDtypeStruct or a dict of them)
    inputs: tuple  # the abstract dynamic leaves
    fn: str = "materialize"  # the public function, for errors

    def rebuild(self, dyn: list) -> tuple[tuple, dict]:
        it = iter(dyn)
        leaves = [next(it) if s is _DYNAMIC else s for s in self.static]
        args, kwargs = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return args, kwargs

    def run(self, rngs: Any, dyn: list) -> Any:
        """Calls ``module.init`` with the given rngs and dynamic inputs."""
        args, kwargs = self.rebuild(dyn)
        return self.module.init(
            rngs, *args, method=self.method, mutable=self.mutable,
            **dict(self.init_kwargs), **kwargs,
        )


class _Dynamic:
    def __repr__(self):
        return "<dynamic>"


_DYNAMIC = _Dynamic()


def dynamic_inputs(args: tuple, kwargs: dict) -> list:
    """The array-like leaves of a call's inputs, in the order ``InitCall.inputs`` uses."""
    leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)))
    return [x for x in leaves if specs.is_array_like(x)]


ACCEPTS = "a flax.linen.Module instance such as nn.Dense(4)"


def accepts(target: Any) -> bool:
    """Whether ``target`` is the Linen entrance's: a Linen module (a Linen class too, which
    ``check_module`` then explains)."""
    return isinstance(target, nn.Module) or (
        isinstance(target, type) and issubclass(target, nn.Module))


NOT_A_MODULE = (
    "{fn}: `{what}` must be a flax.linen.Module instance such as nn.Dense(4), got "
    "{got}.{hint}"
)


def check_module(module: Any, *, fn: str, what: str = "module") -> None:
    """Raises a ``TypeError`` naming ``what`` unless ``module`` is a Linen module instance.

    Examples:
      >>> import flax.linen as nn
      >>> check_module(nn.Dense, fn="lazy")
      Traceback (most recent call last):
      ...
      TypeError: lazy: `module` must be a flax.linen.Module instance such as nn.Dense(4),
      got the class Dense. Create an instance: Dense(...).
    """
    if isinstance(module, nn.Module):
        return
    hint = ""
    if isinstance(module, type):
        got = f"the class {module.__name__}"
        if issubclass(module, nn.Module):
            hint = f" Create an instance: {module.__name__}(...)."
    else:
        text = repr(module)
        got = f"{type(module).__name__} {text}" if len(text) < 60 and "\n" not in text else (
            f"a {type(module).__module__}.{type(module).__name__}")
        if type(module).__module__.startswith("flax.nnx") or any(
            c.__module__.startswith("flax.nnx") for c in type(module).__mro__
        ):
            hint = (f" For NNX, pass the class and its arguments: flaxlazy.{fn}("
                    f"{type(module).__name__}, ..., rngs=nnx.Rngs(0)).")
        elif callable(module):
            hint = " To wrap a function, make it a Linen module (nn.compact __call__)."
    raise TypeError(NOT_A_MODULE.format(fn=fn, what=what, got=got, hint=hint))


def root_params_key(rngs: Any) -> Any:
    """The key Flax derives parameter keys from: ``rngs`` or ``rngs["params"]``."""
    if isinstance(rngs, Mapping):
        return rngs.get("params")
    return rngs


RNGS_FORM = (
    "a PRNG key (jax.random.key(0), or the raw uint32[2] of jax.random.PRNGKey(0)) or a "
    "dict of them such as {'params': k1, 'dropout': k2}"
)


def _check_rngs(rngs: Any, *, fn: str) -> None:
    items = rngs.items() if isinstance(rngs, Mapping) else [(None, rngs)]
    for name, leaf in items:
        if not specs.is_key(leaf):
            where = "`rngs`" if name is None else f"`rngs[{name!r}]`"
            got = (
                f"{type(leaf).__name__} of dtype {leaf.dtype} and shape {np.shape(leaf)}"
                if hasattr(leaf, "dtype") else repr(leaf)
            )
            raise TypeError(f"{fn}: {where} must be {RNGS_FORM}; got {got}.")


def split_rngs_argument(args: tuple, kwargs: dict, *, fn: str) -> tuple[Any, tuple]:
    """``(rngs, inputs)`` of a Linen call: ``f(module, rngs, *inputs)`` or ``rngs=``."""
    if "rngs" in kwargs:
        return kwargs.pop("rngs"), tuple(args)
    if not args:
        raise TypeError(
            f"{fn}: missing `rngs`: for a Linen module pass a PRNG key after it, "
            f"{fn}(module, jax.random.key(0), *inputs)."
        )
    return args[0], tuple(args[1:])


def reject_linen_options(fn: str, *, method: Any, mutable: Any, capture_intermediates: Any
                         ) -> None:
    """Raises a ``TypeError`` for ``Module.init`` options given with an NNX constructor."""
    given = [
        name for name, value, default in (
            ("method", method, None), ("mutable", mutable, DEFAULT_MUTABLE),
            ("capture_intermediates", capture_intermediates, False),
        ) if value is not default
    ]
    if given:
        one = len(given) == 1
        raise TypeError(
            f"{fn}: {', '.join(f'`{n}`' for n in given)} "
            f"{'is an option' if one else 'are options'} of Linen's Module.init and "
            f"{'means' if one else 'mean'} nothing for an NNX constructor. Drop "
            f"{'it' if one else 'them'}; the constructor's own arguments follow the class."
        )


NOT_MUTABLE = (
    "{fn}: `mutable={mutable!r}` does not let init create the {col!r} collection the "
    "module creates ({var!r} in {scope!r}): Module.init creates only the collections "
    "`mutable` names. Leave `mutable` out (the default creates every collection but "
    "'intermediates'), or name every collection the module creates, e.g. "
    "mutable={example!r}."
)


def _check_mutable(mutable: Any, *, fn: str) -> None:
    if mutable is None:
        raise TypeError(
            f"{fn}: `mutable` must be a collection filter as in Module.init: True, a "
            "collection name, a list of them such as ['params', 'batch_stats'], or a "
            "flax.core.DenyList; got None. Leave it out to create every collection but "
            "'intermediates'."
        )


def _not_mutable(call: InitCall, error: Exception) -> ValueError | None:
    """The clearer error for Flax's ``ScopeCollectionNotFound`` under a ``mutable`` the
    caller gave (at init, a collection is empty only because it is not mutable)."""
    found = re.search(r'access "(.*)" from collection "(.*)" in "(.*)" but', str(error))
    if call.mutable is DEFAULT_MUTABLE or found is None:
        return None
    var, col, scope = found.groups()
    named = [call.mutable] if isinstance(call.mutable, str) else (
        list(call.mutable) if isinstance(call.mutable, (list, tuple, set, frozenset)) else [])
    example = list(dict.fromkeys([PARAMS, *(c for c in named if isinstance(c, str)), col]))
    return ValueError(NOT_MUTABLE.format(fn=call.fn, mutable=call.mutable, col=col,
                                         var=var, scope=scope, example=example))


def make_call(
    module: nn.Module,
    rngs: Any,
    args: tuple,
    kwargs: dict,
    *,
    method: Any = None,
    mutable: Any = DEFAULT_MUTABLE,
    init_kwargs: Mapping[str, Any] | None = None,
    fn: str = "materialize",
) -> InitCall:
    """Splits a ``module.init`` call into its abstract inputs and static parts."""
    check_module(module, fn=fn)
    _check_rngs(rngs, fn=fn)
    _check_mutable(mutable, fn=fn)
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
    static = tuple(_DYNAMIC if specs.is_array_like(x) else x for x in leaves)
    inputs = tuple(specs.to_spec(x) for x in dynamic_inputs(args, kwargs))
    abstract_rngs = jax.tree_util.tree_map(specs.to_spec, rngs)
    if isinstance(abstract_rngs, Mapping):
        abstract_rngs = dict(abstract_rngs)
    return InitCall(
        module, method, mutable, tuple(sorted((init_kwargs or {}).items())), treedef,
        static, abstract_rngs, inputs, fn,
    )


@dataclasses.dataclass(frozen=True)
class Traced:
    """The result of tracing ``module.init`` abstractly.

    Attributes:
      call: the traced call.
      variables: the variables tree with ``jax.ShapeDtypeStruct`` leaves (boxes kept).
      records: how each variable was created, keyed by ``(collection, path)``.
    """

    call: InitCall
    variables: Any
    records: Mapping[tuple[str, tuple[str, ...]], recorder_lib.Record]

    # The core's view (shared with the NNX entrance): roots, overrides, the fallback.
    override_stream = PARAMS
    checkpoint_subtree = PARAMS  # from_checkpoint's default: a saved variables dict
    rngs_update_compiles = False  # the caller's keys are values: nothing to update

    @property
    def n_rng(self) -> int:
        return len(jax.tree_util.tree_leaves(self.call.rngs))

    @property
    def override_root(self) -> Any:
        """The abstract root key override keys derive from (None without ``params``)."""
        return root_params_key(self.call.rngs)

    def roots(self, rngs: Any) -> dict[str, Any]:
        """The root keys by stream name: Linen derives every parameter key from ``params``."""
        return {PARAMS: root_params_key(rngs)}

    def rng_leaves(self, rngs: Any) -> list:
        return jax.tree_util.tree_leaves(rngs)

    def fallback_jaxpr(self, names: list[str]) -> Any:
        """``module.init`` traced to a jaxpr returning only the leaves ``names``.

        Its inputs are the rngs leaves, then the dynamic inputs.
        """
        call = self.call

        def run(rngs, dyn):
            flat = dict(paths.flatten(call.run(rngs, dyn))[0])
            return [paths.unbox(flat[n]) for n in names]

        return jax.make_jaxpr(run)(call.rngs, list(call.inputs))


def trace(call: InitCall, *, record: bool = True) -> Traced:
    """Runs ``module.init`` under ``jax.eval_shape`` and records variable creation.

    Never cached: what a module creates can depend on anything its code reads (fields,
    closures, globals), so every call traces afresh. Tracing is abstract and cheap; the
    expensive part, compiled code, is cached by what it computes (``programs``).
    Where flaxlazy's self-check fails on this jax/flax pair (``_compat``), nothing is
    recorded and every variable comes from the compiled ``module.init``.
    """
    found = {"records": {}}
    record = record and _compat.warn_if_fallback()

    def fn(rngs, dyn):
        if not record:
            return call.run(rngs, dyn)
        with recorder_lib.recording(root_params_key(rngs)) as rec:
            variables = call.run(rngs, dyn)
        rec.mark_final(variables)
        found["records"] = {} if rec.unreliable else rec.records
        return variables

    try:
        with gc_pause.paused():
            variables = jax.eval_shape(fn, call.rngs, list(call.inputs))
    except flax_errors.ScopeCollectionNotFound as e:
        clearer = _not_mutable(call, e)
        if clearer is None:
            raise
        raise clearer from e
    except flax_errors.InvalidRngError as e:
        if isinstance(call.rngs, Mapping) and "params" not in call.rngs:
            raise ValueError(
                f"`rngs` has no 'params' key (it has {sorted(call.rngs)}), but the module "
                "creates parameters. Add one: rngs={'params': jax.random.key(0), ...}."
            ) from e
        raise
    return Traced(call, variables, found["records"])


def _identity(variables: Any) -> Any:
    return variables


def trace_call(
    module: nn.Module, args: tuple, kwargs: dict, *, fn: str,
    placement: placement_lib.Placement, options: Mapping[str, Any], abstract: bool = False,
    record: bool | None = None,
) -> traced_call.TracedCall:
    """The Linen entrance's trace: ``module.init(rngs, *inputs, **kwargs)``, abstractly.

    Args:
      module: the Linen module.
      args: ``(rngs, *inputs)`` (or the inputs alone, with ``rngs`` in ``kwargs``).
      kwargs: the keyword inputs (``rngs=`` is taken out of them).
      fn: the public function, for errors.
      placement: the call's placement; its mesh is where a model that names mesh axes is
        traced (see ``placement.trace_for``).
      options: ``Module.init``'s ``method``, ``mutable`` and ``capture_intermediates``.
      abstract: shapes only (by default nothing recorded for a plan).
      record: whether to record how each variable is created, for a plan (default:
        ``not abstract``).

    Returns:
      A ``TracedCall`` whose ``build`` returns the variables tree as it is, and whose
      ``abstract_optimizer`` and ``train_state`` are a ``flaxlazy.TrainState``'s.
    """
    rngs, inputs = split_rngs_argument(args, kwargs, fn=fn)
    call = make_call(
        module, rngs, inputs, kwargs, method=options.get("method"),
        mutable=options.get("mutable", DEFAULT_MUTABLE), fn=fn,
        init_kwargs=init_options(options.get("capture_intermediates", False)),
    )
    record = not abstract if record is None else record
    traced = placement_lib.trace_for(placement.mesh, lambda: trace(call, record=record))
    return traced_call.TracedCall(
        traced, rngs, dynamic_inputs(inputs, kwargs), _identity,
        functools.partial(optimizer_lib.abstract_state, traced.variables),
        functools.partial(optimizer_lib.assemble, module, abstract=abstract))


def init_options(capture_intermediates: Any) -> dict:
    return {"capture_intermediates": capture_intermediates} if capture_intermediates else {}
