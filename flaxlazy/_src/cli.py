"""The ``flaxlazy`` command: ``flaxlazy inspect TARGET [options]`` (also ``python -m flaxlazy``).

Everything the command does is ``flaxlazy.inspect``; this module only turns the command
line (parsed by ``cli_args``) into its arguments (a factory to call, specs or an NNX
constructor's arguments, a mesh, names of objects to import) and its result into text,
JSON and an exit status: 0 (the report), 1 (``--strict`` and something ``materialize``
would stop on, or "does not fit"), 2 (a usage error: a bad TARGET, a factory that raises
or exits, a malformed mesh or spec; one line, with the traceback only under ``--debug``).
With ``--json``, what the target's code prints goes to stderr: stdout is the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect as pyinspect
import json
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

from flaxlazy._src import cli_args

PROG = cli_args.PROG
UsageError = cli_args.UsageError

IMPORT_EXITED = (
    "{flag}: importing {text} exited ({exit}) instead of defining its objects; a file "
    "flaxlazy imports must not exit: put its script code under `if __name__ == '__main__':`."
)
FACTORY_EXITED = (
    "TARGET {ref!r}: the factory exited ({exit}) instead of returning a model; return the "
    "module, (module, inputs) or (constructor, args) rather than exiting."
)


_LOADED: dict[str, Any] = {}


def _import_file(path: pathlib.Path) -> Any:
    resolved = str(path.resolve())
    if resolved in _LOADED:
        return _LOADED[resolved]
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    name = f"_flaxlazy_target_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Linen modules) look their module up here
    sys.path.insert(0, str(path.resolve().parent))  # as `python FILE.py` would
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _LOADED[resolved] = module
    return module


def load_module(text: str, flag: str) -> Any:
    """The Python module of ``FILE.py`` or ``package.module``."""
    if text.endswith(".py") or "/" in text or os.sep in text:
        path = pathlib.Path(text)
        if not path.is_file():
            raise UsageError(f"{flag} {text!r}: no such file.")
        try:
            return _import_file(path)
        except SystemExit as e:
            raise UsageError(IMPORT_EXITED.format(flag=flag, text=text, exit=_exit(e))) from e
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would
    try:
        return importlib.import_module(text)
    except SystemExit as e:
        raise UsageError(IMPORT_EXITED.format(flag=flag, text=text, exit=_exit(e))) from e
    except ModuleNotFoundError as e:
        if e.name and text.startswith(e.name):
            raise UsageError(
                f"{flag}: cannot import {text!r} ({e}). Run from the directory that holds "
                "it, or name a file: path/to/file.py:NAME."
            ) from e
        raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e


def _exit(e: SystemExit) -> str:
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


def _one_line(e: BaseException) -> str:
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
            raise UsageError(FACTORY_EXITED.format(ref=ref, exit=_exit(e))) from e
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"TARGET {ref!r}: the factory raised {_one_line(e)}") from e
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


def _optimizer(text: str | None, target_module: Any) -> Any:
    from flaxlazy._src import inspect_options

    if text is None or text in inspect_options.OPTIMIZERS:
        return text
    if ":" not in text and not hasattr(target_module, text):
        raise UsageError(f"--optimizer {text!r}: expected one of "
                         f"{', '.join(inspect_options.OPTIMIZERS)}, or MODULE:NAME / "
                         "FILE.py:NAME of an optax transformation.")
    tx = resolve(text, "--optimizer", target_module)
    import optax

    if not isinstance(tx, optax.GradientTransformation) and callable(tx):
        try:
            tx = tx()
        except SystemExit as e:
            raise UsageError(f"--optimizer {text!r} exited ({_exit(e)}) instead of returning "
                             "an optax transformation; return one rather than exiting.") from e
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--optimizer {text!r} raised {_one_line(e)}") from e
    if not isinstance(tx, optax.GradientTransformation):
        raise UsageError(f"--optimizer {text!r} is a {type(tx).__name__}, not an optax "
                         "GradientTransformation.")
    return tx


def run(args: argparse.Namespace) -> int:
    """Runs ``inspect`` for parsed ``args``; returns the exit status."""
    from flaxlazy._src import inspect_render

    with _stdout_to_stderr() if args.json else contextlib.nullcontext():
        report = _report(args)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(report.render(color=color))
    failures = report.failures()
    if args.strict and failures:
        groups = inspect_render.group_problems(failures, [leaf.path for leaf in report.leaves])
        for group in groups[: inspect_render.MAX_PROBLEMS]:
            print(f"{PROG} inspect: --strict: {inspect_render.problem_text(group)}",
                  file=sys.stderr)
        if len(groups) > inspect_render.MAX_PROBLEMS:
            more = len(groups) - inspect_render.MAX_PROBLEMS
            print(f"{PROG} inspect: --strict: ... and {more} more", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> Any:
    """The ``flaxlazy.Report`` for parsed ``args``: options checked first, then the
    target's code (importing, the factory, the constructor) run."""
    import jax

    from flaxlazy._src import inspect_options
    from flaxlazy._src import inspect_report

    mesh = cli_args.parse_mesh(args.mesh) if args.mesh is not None else None
    memory = (cli_args.parse_size(args.device_memory, "--device-memory")
              if args.device_memory is not None else None)
    try:
        _ = args.dtype is not None and inspect_options.cast_dtype(args.dtype)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--dtype: {e}") from None
    inputs, kwargs = cli_args.parse_inputs(args.input)
    arguments = cli_args.parse_arguments(args.arg, args.kwarg)
    top = cli_args.parse_top(args.top)
    obj = resolve(args.target, "TARGET")
    where = args.target.rpartition(":")[0]
    target_module = load_module(where, "TARGET") if where else None
    model = build_model(obj, args.target, inputs, kwargs, bool(args.input), arguments,
                        bool(args.arg or args.kwarg))
    refs = {}
    for flag, value in (("--rules", args.rules), ("--logical-axis-rules",
                                                  args.logical_axis_rules)):
        refs[flag] = resolve(value, flag, target_module) if value is not None else None
    if mesh is None and (args.rules or args.logical_axis_rules or args.require_rules is not None):
        raise UsageError("--rules, --logical-axis-rules and --require-rules need a --mesh.")
    optimizer = _optimizer(args.optimizer, target_module)
    names = [n.strip() for n in (args.rngs or "params").split(",") if n.strip()]
    if model.nnx:
        call_args = model.args
        call_kwargs = with_rngs(model.module, model.args, model.kwargs,
                                names if args.rngs is not None else None)
        hint = "" if model.args or model.kwargs else (
            " (no arguments were given: pass --arg VALUE, --kwarg NAME=VALUE)")
    else:
        key = jax.eval_shape(jax.random.key, 0)  # abstract: no device array
        rngs = key if names == ["params"] else {n: key for n in names}
        call_args, call_kwargs = (rngs, *model.args), model.kwargs
        hint = "" if model.args or model.kwargs else " (no inputs were given: pass --input SPEC)"
    try:
        report = inspect_report.inspect(
            model.module, *call_args, mesh=mesh, partition_rules=refs["--rules"],
            logical_axis_rules=refs["--logical-axis-rules"],
            allow_unused_rules=args.allow_unused_rules, require_rules=args.require_rules,
            optimizer=optimizer, dtype=args.dtype, device_memory=memory,
            method=args.method, top=top, depth=args.depth, **call_kwargs,
        )
    except SystemExit as e:  # the model's own code: its constructor, its __call__
        raise UsageError(f"inspecting {args.target} failed: the model's code exited "
                         f"({_exit(e)}); build the model rather than exiting.") from e
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        raise UsageError(f"inspecting {args.target} failed: {_one_line(e)}{hint}") from e
    return dataclasses.replace(report, target=args.target)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Within: what is printed to stdout goes to stderr, Python's ``print`` and writes to
    file descriptor 1 alike (a subprocess, a C extension); restored on the way out."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``flaxlazy`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "JAX_PLATFORMS" not in os.environ:
        # Shapes only: never take an accelerator (nor its preallocated memory) from a job.
        import jax

        jax.config.update("jax_platforms", "cpu")
    debug = "--debug" in argv
    try:
        return run(cli_args.parse_argv(argv))
    except BrokenPipeError:  # `flaxlazy inspect ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e if isinstance(e, UsageError) else _one_line(e)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
