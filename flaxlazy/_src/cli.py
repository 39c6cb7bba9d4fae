"""The ``flaxlazy`` command: ``flaxlazy inspect TARGET [options]`` (also ``python -m flaxlazy``).

Everything the command does is ``flaxlazy.inspect``; this module only turns the command
line into its arguments (a factory to call, specs or an NNX constructor's arguments, a
mesh, names of objects to import)
and its result into text, JSON and an exit status: 0 (the report), 1 (``--strict`` and
something ``materialize`` would stop on, or "does not fit"), 2 (a usage error: a bad
TARGET, a factory that raises, a malformed mesh or spec; one line, with the traceback
only under ``--debug``).
"""

from __future__ import annotations

import argparse
import ast
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

PROG = "flaxlazy"
DESCRIPTION = (
    "Inspect a Flax Linen or NNX model without allocating anything: every parameter's shape, "
    "initializer and PartitionSpec, the bytes each device will hold (with the optimizer "
    "state), whether that fits, and how many functions materialize will compile."
)
TARGET_HELP = (
    "what to inspect: MODULE:NAME (a dotted module importable from the current directory) "
    "or FILE.py:NAME. NAME is a Linen module instance; an NNX Module class, or a function "
    "taking `rngs` (an NNX constructor: give its arguments with --arg/--kwarg); or a "
    "FACTORY, called with no arguments, returning a Linen module (give its inputs with "
    "--input), (module, inputs) or (module, inputs, kwargs), or an NNX constructor, "
    "(constructor, args) or (constructor, args, kwargs)."
)
EPILOG = (
    "REF arguments (--rules, --logical-axis-rules, --optimizer) name an object the same "
    "way as TARGET, MODULE:NAME or FILE.py:NAME, or by NAME alone in TARGET's module. "
    "Exit status: 0 the report; 1 with --strict, when materialize would stop (a leaf no "
    "rule covers, a rule that matches nothing, an indivisible dimension) or the load does "
    "not fit --device-memory; 2 a usage error. NNX: the report is what "
    "flaxlazy.materialize(constructor, *args, **kwargs) (with --optimizer, "
    "init_train_state) would create; an NNX constructor that takes `rngs` and is not "
    "given one gets rngs=nnx.Rngs(0) (--rngs NAMES: a stream per name). Examples: "
    "flaxlazy inspect examples/factories.py:llama7b --mesh data=8,model=8 "
    "--rules LLAMA_RULES --optimizer adamw --device-memory 80GiB; "
    "flaxlazy inspect examples/factories.py:GPT --arg 12 --arg 768 --arg 50304 "
    "--mesh data=2,model=4 --rules GPT_RULES --optimizer adamw (NNX)"
)
MESH_FORM = "expected NAME=SIZE pairs separated by commas, such as data=2,model=4"
ARG_HELP = (
    "a constructor argument, in order; repeatable; replaces the positional "
    "arguments the factory returns. VALUE is a Python literal (12, 0.1, True, None, "
    "'text', (1, 2)), an array spec such as f32[8,16] (an abstract array), or else a string"
)
KWARG_HELP = (
    "a constructor keyword argument, NAME=VALUE (VALUE as for --arg); "
    "repeatable; added to (or replacing) the keyword arguments the factory returns"
)
_SPEC_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9]*\[.*\]")


class UsageError(Exception):
    """A problem with the command line or the target: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=4" -> {"data": 2, "model": 4}``.

    Examples:
      >>> parse_mesh("data=2, model=4")
      {'data': 2, 'model': 4}
      >>> parse_mesh("data=2,model")
      Traceback (most recent call last):
      ...
      flaxlazy._src.cli.UsageError: --mesh 'data=2,model': 'model' is not NAME=SIZE; ...
    """
    out: dict[str, int] = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([0-9]+)\s*", part)
        if not match:
            raise UsageError(f"--mesh {text!r}: {part.strip()!r} is not NAME=SIZE; {MESH_FORM}.")
        name, size = match.group(1), int(match.group(2))
        if name in out:
            raise UsageError(f"--mesh {text!r}: axis {name!r} is given twice; {MESH_FORM}.")
        if size < 1:
            raise UsageError(f"--mesh {text!r}: axis {name!r} has size {size}; sizes are >= 1.")
        out[name] = size
    return out


def parse_inputs(texts: Sequence[str]) -> tuple[tuple, dict]:
    """``["i32[8,128]", "mask=bool[8,128]"]`` -> positional and keyword specs."""
    from flaxlazy._src import specs

    args, kwargs = [], {}
    for text in texts:
        name, eq, spec_text = text.partition("=")
        if not eq:
            name, spec_text = None, text
        elif not name.isidentifier():
            raise UsageError(f"--input {text!r}: {name!r} is not a keyword name; write "
                             "NAME=SPEC, e.g. mask=bool[8,128].")
        try:
            value = specs.spec(spec_text.strip())
        except (TypeError, ValueError) as e:
            raise UsageError(f"--input {text!r}: {e}") from None
        if name is None:
            if kwargs:
                raise UsageError(f"--input {text!r}: positional inputs go before keyword ones.")
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def parse_value(text: str, flag: str) -> Any:
    """A constructor argument from the command line: a literal, a spec, or the string.

    Examples:
      >>> parse_value("12", "--arg"), parse_value("(1, 2)", "--arg"), parse_value("gelu", "--arg")
      (12, (1, 2), 'gelu')
      >>> parse_value("f32[8,16]", "--arg")
      ShapeDtypeStruct(shape=(8, 16), dtype=float32)
    """
    from flaxlazy._src import specs

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _SPEC_LIKE.fullmatch(text.strip()):
        try:
            return specs.spec(text.strip())
        except (TypeError, ValueError) as e:
            raise UsageError(f"{flag} {text!r}: {e}") from None
    return text


def parse_arguments(arg_texts: Sequence[str], kwarg_texts: Sequence[str]) -> tuple[tuple, dict]:
    """``--arg`` and ``--kwarg`` values: an NNX constructor's positional and keyword
    arguments."""
    args = tuple(parse_value(text, "--arg") for text in arg_texts)
    kwargs = {}
    for text in kwarg_texts:
        name, eq, value = text.partition("=")
        name = name.strip()
        if not eq:
            raise UsageError(f"--kwarg {text!r}: expected NAME=VALUE, e.g. heads=12.")
        if not name.isidentifier():
            raise UsageError(f"--kwarg {text!r}: {name!r} is not a keyword name; write "
                             "NAME=VALUE, e.g. heads=12.")
        kwargs[name] = parse_value(value, "--kwarg")
    return args, kwargs


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
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would
    try:
        return importlib.import_module(text)
    except ModuleNotFoundError as e:
        if e.name and text.startswith(e.name):
            raise UsageError(
                f"{flag}: cannot import {text!r} ({e}). Run from the directory that holds "
                "it, or name a file: path/to/file.py:NAME."
            ) from e
        raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{flag}: importing {text} failed: {_one_line(e)}") from e


def resolve(ref: str, flag: str, default_module: Any = None) -> Any:
    """The object ``MODULE:NAME`` / ``FILE.py:NAME`` (or ``NAME`` in ``default_module``) names."""
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


def parser() -> argparse.ArgumentParser:
    from flaxlazy import __version__

    top = _Parser(prog=PROG, description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                  parser_class=_Parser)
    p = commands.add_parser("inspect", help="will it fit, how is it sharded (nothing allocated)",
                            description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="Linen: an input spec such as i32[8,2048], or NAME=SPEC for a keyword "
                        "input; repeatable, in order; replaces the inputs the factory returns")
    p.add_argument("--arg", action="append", default=[], metavar="VALUE", help="NNX: " + ARG_HELP)
    p.add_argument("--kwarg", action="append", default=[], metavar="NAME=VALUE",
                   help="NNX: " + KWARG_HELP)
    p.add_argument("--mesh", metavar="AXES",
                   help="an abstract mesh, e.g. data=8,model=8 (no devices needed)")
    p.add_argument("--rules", metavar="REF", help="partition rules, [(pattern, PartitionSpec)]")
    p.add_argument("--logical-axis-rules", metavar="REF",
                   help="logical axis rules, [(logical_name, mesh_axes)]")
    p.add_argument("--require-rules", action=argparse.BooleanOptionalAction, default=None,
                   help="whether every leaf needs a rule or annotation (default: when --rules "
                        "is given)")
    p.add_argument("--allow-unused-rules", action="store_true",
                   help="accept rules that match no leaf")
    p.add_argument("--optimizer", metavar="NAME|REF",
                   help="add the optimizer state: adamw, adam, sgd, adafactor, lion, or REF to "
                        "an optax transformation (or a function of no arguments returning one)")
    p.add_argument("--dtype", help="cast floating parameters to this dtype (what-if), e.g. bf16")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="one device's memory, e.g. 80GiB: says whether the load fits")
    p.add_argument("--rngs", metavar="NAMES",
                   help="rng streams, comma-separated: Linen, the keys init needs (default: "
                        "params); NNX, the streams of the nnx.Rngs given to a constructor "
                        "that takes `rngs` and is not given one (default: nnx.Rngs(0))")
    p.add_argument("--method", help="Linen: the module method init calls (default: __call__)")
    p.add_argument("--top", metavar="N|all",
                   help="list the N largest leaves, or all (default: all up to 40, else 10)")
    p.add_argument("--depth", type=_positive, metavar="K", help="subtotals per module to depth K")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when materialize would stop, or the load does not fit")
    p.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    return top


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def _top(text: str | None) -> int | None:
    if text is None:
        return None
    if text == "all":
        return sys.maxsize
    if not text.isdigit():
        raise UsageError(f"--top {text!r}: expected a number of leaves or 'all'.")
    return int(text)


def _optimizer(text: str | None, target_module: Any) -> Any:
    from flaxlazy._src import inspect_report

    if text is None or text in inspect_report.OPTIMIZERS:
        return text
    if ":" not in text and not hasattr(target_module, text):
        raise UsageError(f"--optimizer {text!r}: expected one of "
                         f"{', '.join(inspect_report.OPTIMIZERS)}, or MODULE:NAME / "
                         "FILE.py:NAME of an optax transformation.")
    tx = resolve(text, "--optimizer", target_module)
    import optax

    if not isinstance(tx, optax.GradientTransformation) and callable(tx):
        try:
            tx = tx()
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--optimizer {text!r} raised {_one_line(e)}") from e
    if not isinstance(tx, optax.GradientTransformation):
        raise UsageError(f"--optimizer {text!r} is a {type(tx).__name__}, not an optax "
                         "GradientTransformation.")
    return tx


def run(args: argparse.Namespace) -> int:
    """Runs ``inspect`` for parsed ``args``; returns the exit status."""
    import jax

    from flaxlazy._src import inspect_render
    from flaxlazy._src import inspect_report

    mesh = parse_mesh(args.mesh) if args.mesh is not None else None
    for flag, value, check in (("--device-memory", args.device_memory, inspect_report.parse_bytes),
                               ("--dtype", args.dtype, inspect_report.cast_dtype)):
        try:
            _ = value is not None and check(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{flag}: {e}") from None
    inputs, kwargs = parse_inputs(args.input)
    arguments = parse_arguments(args.arg, args.kwarg)
    top = _top(args.top)
    where = args.target.rpartition(":")[0]
    obj = resolve(args.target, "TARGET")
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
            optimizer=optimizer, dtype=args.dtype, device_memory=args.device_memory,
            method=args.method, top=top, depth=args.depth, **call_kwargs,
        )
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        raise UsageError(f"inspecting {args.target} failed: {_one_line(e)}{hint}") from e
    report = dataclasses.replace(report, target=args.target)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(report.render(color=color))
    failures = report.failures()
    if args.strict and failures:
        shown = failures[: inspect_render.MAX_PROBLEMS]
        for problem in shown:
            print(f"{PROG} inspect: --strict: {problem.message}", file=sys.stderr)
        if len(failures) > len(shown):
            print(f"{PROG} inspect: --strict: ... and {len(failures) - len(shown)} more",
                  file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``flaxlazy`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "JAX_PLATFORMS" not in os.environ:
        # Shapes only: never take an accelerator (nor its preallocated memory) from a job.
        import jax

        jax.config.update("jax_platforms", "cpu")
    debug = "--debug" in argv
    try:
        return run(parser().parse_args(argv))
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
