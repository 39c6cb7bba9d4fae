"""What ``flaxlazy inspect TARGET`` points at, loaded and made ready for ``inspect``.

``MODULE:NAME`` and ``FILE.py:NAME`` (and REF options such as ``--rules``) name an object
in a module: a file is imported as ``python FILE.py`` would run it (its folder first on
``sys.path``, under a private module name), a dotted module as ``python -m`` would find it
(the current directory on ``sys.path``). What loading adds to ``sys.path`` and
``sys.modules`` lasts while the command runs (``loading``) and is taken away after; a
loaded file is kept, so naming it again gives the same module. ``build_model`` turns the
object named into a ``Model``: a Linen module and its inputs, or an NNX constructor and
its arguments. Problems are ``cli.args.UsageError``s in one line.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect as pyinspect
import os
import pathlib
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

from flaxlazy._src.cli import args as cli_args

UsageError = cli_args.UsageError

IMPORT_EXITED = (
    "{flag}: importing {text} exited ({exit}) instead of defining its objects; a file "
    "flaxlazy imports must not exit: put its script code under `if __name__ == '__main__':`."
)
FACTORY_EXITED = (
    "TARGET {ref!r}: the factory exited ({exit}) instead of returning a model; return the "
    "module, (module, inputs) or (constructor, args) rather than exiting."
)


_LOADED: dict[str, Any] = {}  # a file's resolved path -> its module, loaded once
_SCOPE = threading.local()  # .added: what this thread's ``loading()`` block added


class _Added(NamedTuple):
    paths: list[str]  # entries put in front of ``sys.path``
    modules: list[tuple[str, Any]]  # (name, module) put in ``sys.modules``


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """A block in which targets are loaded, after which ``sys.path`` and ``sys.modules``
    lose what loading them added (a nested block belongs to the outermost one).

    A target's code may import modules beside it while it runs (its factory, its model's
    constructor), not only while it is imported: ``flaxlazy inspect`` runs in one block.

    Examples:
      >>> import os, sys, tempfile
      >>> folder = tempfile.mkdtemp()
      >>> with open(os.path.join(folder, "target.py"), "w") as f:
      ...     _ = f.write("import flax.linen as nn\\nmodel = nn.Dense(3)\\n")
      >>> before = list(sys.path)
      >>> with loading():
      ...     module = load_module(os.path.join(folder, "target.py"), "TARGET")
      ...     sys.path[0] == os.path.realpath(folder), module.__name__ in sys.modules
      (True, True)
      >>> sys.path == before, module.__name__ in sys.modules, type(module.model).__name__
      (True, False, 'Dense')
    """
    if getattr(_SCOPE, "added", None) is not None:
        yield
        return
    added = _SCOPE.added = _Added([], [])
    try:
        yield
    finally:
        _SCOPE.added = None
        for entry in reversed(added.paths):
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)
        for name, module in added.modules:
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _put_on_path(entry: str) -> None:
    sys.path.insert(0, entry)
    _SCOPE.added.paths.append(entry)


def _import_file(path: pathlib.Path) -> Any:
    resolved = str(path.resolve())
    _put_on_path(str(path.resolve().parent))  # as `python FILE.py` would
    module = _LOADED.get(resolved)
    if module is not None:
        if module.__name__ not in sys.modules:  # while the block runs, as when imported
            sys.modules[module.__name__] = module
            _SCOPE.added.modules.append((module.__name__, module))
        return module
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    name = f"_flaxlazy_target_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Linen modules) look their module up here
    _SCOPE.added.modules.append((name, module))
    spec.loader.exec_module(module)  # on failure, ``loading`` removes the name again
    _LOADED[resolved] = module
    return module


def load_module(text: str, flag: str) -> Any:
    """The Python module of ``FILE.py`` or ``package.module``.

    Inside a ``loading()`` block, what it puts on ``sys.path`` and in ``sys.modules``
    stays until the block ends; outside one, until it returns.
    """
    with loading():
        return _load_module(text, flag)


def _load_module(text: str, flag: str) -> Any:
    if text.endswith(".py") or "/" in text or os.sep in text:
        path = pathlib.Path(text)
        if not path.is_file():
            raise UsageError(f"{flag} {text!r}: no such file.")
        try:
            return _import_file(path)
        except SystemExit as e:
            raise UsageError(IMPORT_EXITED.format(flag=flag, text=text, exit=exited(e))) from e
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"{flag}: importing {text} failed: {one_line(e)}") from e
    if os.getcwd() not in sys.path and "" not in sys.path:
        _put_on_path(os.getcwd())  # as `python -m` would
    try:
        return importlib.import_module(text)
    except SystemExit as e:
        raise UsageError(IMPORT_EXITED.format(flag=flag, text=text, exit=exited(e))) from e
    except ModuleNotFoundError as e:
        if e.name and text.startswith(e.name):
            raise UsageError(
                f"{flag}: cannot import {text!r} ({e}). Run from the directory that holds "
                "it, or name a file: path/to/file.py:NAME."
            ) from e
        raise UsageError(f"{flag}: importing {text} failed: {one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{flag}: importing {text} failed: {one_line(e)}") from e


def exited(e: SystemExit) -> str:
    """How user code exited, as it would have written it: ``SystemExit(7)``."""
    return f"SystemExit({', '.join(map(repr, e.args))})"


def resolve(ref: str, flag: str, default_module: Any = None) -> Any:
    """The object ``MODULE:NAME`` / ``FILE.py:NAME`` (or ``NAME`` in ``default_module``) names."""
    drive = 2 if re.match(r"[A-Za-z]:[\\/]", ref) else 0  # C:\\models\\m.py:NAME
    if ref.count(":", drive) > 1:
        first = ref.index(":", drive)
        guess = ref[:ref.index(":", first + 1)]
        raise UsageError(f"{flag} {ref!r}: expected MODULE:NAME or FILE.py:NAME, one ':' "
                         f"after the file or module, got {ref.count(':', drive)}. Name one "
                         f"object, e.g. {guess!r} (an attribute of it as NAME.ATTR).")
    where, colon, name = ref.rpartition(":")
    if not colon:
        if default_module is None:
            raise UsageError(f"{flag} {ref!r}: expected MODULE:NAME or FILE.py:NAME, e.g. "
                             "examples/factories.py:llama7b.")
        module, name, where = default_module, ref, "TARGET's module"
    else:
        if not where or not name:
            raise UsageError(f"{flag} {ref!r}: expected MODULE:NAME or FILE.py:NAME.")
        module = load_module(where, flag)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(name, public, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UsageError(f"{flag} {ref!r}: {where} has no {name!r}.{hint}")
        obj = getattr(obj, part)
    return obj


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class Model(NamedTuple):
    """What TARGET names, ready for ``inspect``: ``module`` (a Linen module or an NNX
    constructor), its ``args`` (Linen: the inputs) and ``kwargs``, and whether it is NNX."""

    module: Any
    args: tuple
    kwargs: dict
    nnx: bool


def build_model(obj: Any, ref: str, inputs: tuple, kwargs: dict, given: bool,
                arguments: tuple[tuple, dict] = ((), {}), arguments_given: bool = False
                ) -> Model:
    """The model TARGET names, with the inputs (``--input``) or the NNX constructor's
    arguments (``--arg``/``--kwarg``) the command line gives."""
    import flax.linen as nn

    made = obj  # a Linen module, an NNX class, a function taking `rngs`: not called
    if isinstance(obj, nn.Module) or _nnx_constructor(obj):
        pass
    elif _nnx_instance(obj):
        raise UsageError(_ALREADY_BUILT.format(ref=ref, what="is", name=type(obj).__name__))
    elif not callable(obj):
        raise UsageError(f"TARGET {ref!r} is a {type(obj).__name__}, not a Linen module, an "
                         "NNX Module class or a function returning one.")
    else:
        try:
            made = obj()
        except SystemExit as e:
            raise UsageError(FACTORY_EXITED.format(ref=ref, exit=exited(e))) from e
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"TARGET {ref!r}: the factory raised {one_line(e)}") from e
    extra_args, extra_kwargs = (), {}
    if isinstance(made, tuple) and 2 <= len(made) <= 3:
        made, extra_args, *rest = made
        extra_kwargs = rest[0] if rest else {}
        if not isinstance(extra_args, (tuple, list)):
            extra_args = (extra_args,)
        if not isinstance(extra_kwargs, dict):
            raise UsageError(f"TARGET {ref!r} gives kwargs of type "
                             f"{type(extra_kwargs).__name__}; expected a dict.")
    if _nnx_instance(made):
        raise UsageError(_ALREADY_BUILT.format(ref=ref, what="gives", name=type(made).__name__))
    if isinstance(made, nn.Module):
        if arguments_given:
            raise UsageError(f"--arg/--kwarg pass an NNX constructor its arguments; TARGET "
                             f"{ref!r} is a Linen module: give its inputs with --input.")
        if given:  # --input replaces what the factory gives
            return Model(made, inputs, kwargs, False)
        return Model(made, tuple(extra_args), dict(extra_kwargs), False)
    if not _nnx_target(made):
        raise UsageError(f"TARGET {ref!r} gives a {type(made).__name__}; expected a "
                         "flax.linen.Module, (module, inputs) or (module, inputs, kwargs), or "
                         "an NNX constructor, (constructor, args) or (constructor, args, "
                         "kwargs).")
    if given:
        raise UsageError("--input gives a Linen module its inputs; pass an NNX constructor its "
                         "arguments with --arg/--kwarg (an array as a spec: --arg f32[8,16]).")
    args = arguments[0] if arguments[0] else tuple(extra_args)
    return Model(made, args, {**extra_kwargs, **arguments[1]}, True)


_ALREADY_BUILT = (
    "TARGET {ref!r} {what} an NNX module already constructed ({name}): its arrays are "
    "allocated. Name its class, or return (class, args, kwargs) from the factory, and "
    "flaxlazy inspect constructs it abstractly."
)


def _nnx_instance(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - depends on the installed flax
        return False
    return isinstance(obj, nnx.Module)


def _nnx_target(obj: Any) -> bool:
    """An NNX constructor: a callable that is neither a Linen module nor an NNX instance."""
    from flaxlazy._src.nnx import call as nnx_call

    return nnx_call.is_nnx_target(obj) and not _nnx_instance(obj)


def _nnx_constructor(obj: Any) -> bool:
    """Named as TARGET, an NNX constructor rather than a factory: an NNX Module class, or a
    function with an ``rngs`` parameter."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    if isinstance(obj, type):
        return issubclass(obj, nnx.Module)
    return _nnx_target(obj) and _rngs_parameter(obj) is not None


def _signature(ctor: Any, args: tuple = (), kwargs: dict | None = None
               ) -> tuple[pyinspect.Signature | None, tuple, dict]:
    """The constructor's own signature (a class's ``__init__`` without ``self``; under
    ``functools.partial``, the wrapped one with the bound arguments added to ``args`` and
    ``kwargs``), or None where Python gives none."""
    kwargs = dict(kwargs or {})
    while isinstance(ctor, functools.partial):
        args, kwargs, ctor = (*ctor.args, *args), {**ctor.keywords, **kwargs}, ctor.func
    try:
        if isinstance(ctor, type):  # NNX's metaclass hides __init__ from signature(cls)
            sig = pyinspect.signature(ctor.__init__)
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        else:
            sig = pyinspect.signature(ctor)
    except (TypeError, ValueError):  # a builtin, an odd callable
        return None, args, kwargs
    return sig, args, kwargs


def _rngs_parameter(ctor: Any) -> pyinspect.Parameter | None:
    sig, _, _ = _signature(ctor)
    parameter = None if sig is None else sig.parameters.get("rngs")
    if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return None
    return parameter


def with_rngs(ctor: Any, args: tuple, kwargs: dict, streams: list[str] | None) -> dict:
    """``kwargs`` plus ``rngs=nnx.Rngs(0)`` (or one stream per name in ``streams``) when
    the constructor takes ``rngs`` and the arguments do not give it."""
    from flax import nnx

    parameter = _rngs_parameter(ctor)
    if parameter is None or "rngs" in kwargs:
        return kwargs
    sig, all_args, all_kwargs = _signature(ctor, args, kwargs)
    try:
        bound = sig.bind_partial(*all_args, **all_kwargs)
    except TypeError:
        return kwargs  # the arguments do not fit: inspect says how, in the constructor's words
    if "rngs" in bound.arguments or parameter.default not in (parameter.empty, None):
        return kwargs
    rngs = nnx.Rngs(**dict.fromkeys(streams, 0)) if streams else nnx.Rngs(0)
    return {**kwargs, "rngs": rngs}
