"""The ``flaxlazy`` command: ``flaxlazy inspect TARGET [options]`` (also ``python -m flaxlazy``).

Everything the command does is ``flaxlazy.inspect``; this module only turns the command
line into its arguments (a factory to call, specs, a mesh, names of objects to import)
and its result into text, JSON and an exit status: 0 (the report), 1 (``--strict`` and
something ``materialize`` would stop on, or "does not fit"), 2 (a usage error: a bad
TARGET, a factory that raises, a malformed mesh or spec; one line, with the traceback
only under ``--debug``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

PROG = "flaxlazy"
DESCRIPTION = (
    "Inspect a Flax Linen model without allocating anything: every parameter's shape, "
    "initializer and PartitionSpec, the bytes each device will hold (with the optimizer "
    "state), whether that fits, and how many functions materialize will compile."
)
TARGET_HELP = (
    "what to inspect: MODULE:FACTORY (a dotted module importable from the current "
    "directory) or FILE.py:FACTORY. FACTORY returns a Linen module (give its inputs with "
    "--input), or (module, inputs), or (module, inputs, kwargs); it is called with no "
    "arguments. A module instance works too."
)
EPILOG = (
    "REF arguments (--rules, --logical-axis-rules, --optimizer) name an object the same "
    "way as TARGET, MODULE:NAME or FILE.py:NAME, or by NAME alone in TARGET's module. "
    "Exit status: 0 the report; 1 with --strict, when materialize would stop (a leaf no "
    "rule covers, a rule that matches nothing, an indivisible dimension) or the load does "
    "not fit --device-memory; 2 a usage error. NNX models are not supported yet; when "
    "they are, --arg/--kwarg will pass an NNX constructor its arguments. Example: "
    "flaxlazy inspect examples/factories.py:llama7b --mesh data=8,model=8 "
    "--rules LLAMA_RULES --optimizer adamw --device-memory 80GiB"
)
MESH_FORM = "expected NAME=SIZE pairs separated by commas, such as data=2,model=4"


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


def build_model(obj: Any, ref: str, inputs: tuple, kwargs: dict, given: bool):
    """``(module, inputs, kwargs)`` from what TARGET names."""
    import flax.linen as nn

    made = obj
    if _is_nnx(obj):
        raise UsageError(f"TARGET {ref!r} is an NNX module; only Linen modules are supported "
                         "so far (NNX support will add --arg/--kwarg for its constructor).")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise UsageError(f"TARGET {ref!r} is a {type(obj).__name__}, not a Linen module "
                             "or a function returning one.")
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
    if not isinstance(made, nn.Module):
        what = type(made).__name__
        if _is_nnx(made):
            raise UsageError(f"TARGET {ref!r} gives an NNX {what}; only Linen modules are "
                             "supported so far.")
        raise UsageError(f"TARGET {ref!r} gives a {what}; expected a flax.linen.Module, "
                         "(module, inputs) or (module, inputs, kwargs).")
    if given:  # --input replaces what the factory gives
        return made, inputs, kwargs
    return made, tuple(extra_args), dict(extra_kwargs)


def _is_nnx(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - depends on the installed flax
        return False
    return isinstance(obj, nnx.Module) or (isinstance(obj, type) and issubclass(obj, nnx.Module))


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
                   help="an input spec such as i32[8,2048], or NAME=SPEC for a keyword input; "
                        "repeatable, in order; replaces the inputs the factory returns")
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
    p.add_argument("--rngs", default="params", metavar="NAMES",
                   help="rng streams init needs, comma-separated (default: params)")
    p.add_argument("--method", help="the module method init calls (default: __call__)")
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
    top = _top(args.top)
    where = args.target.rpartition(":")[0]
    obj = resolve(args.target, "TARGET")
    target_module = load_module(where, "TARGET") if where else None
    module, inputs, kwargs = build_model(obj, args.target, inputs, kwargs, bool(args.input))
    refs = {}
    for flag, value in (("--rules", args.rules), ("--logical-axis-rules",
                                                  args.logical_axis_rules)):
        refs[flag] = resolve(value, flag, target_module) if value is not None else None
    if mesh is None and (args.rules or args.logical_axis_rules or args.require_rules is not None):
        raise UsageError("--rules, --logical-axis-rules and --require-rules need a --mesh.")
    optimizer = _optimizer(args.optimizer, target_module)
    names = [n.strip() for n in args.rngs.split(",") if n.strip()]
    key = jax.eval_shape(jax.random.key, 0)  # abstract: no device array
    rngs = key if names == ["params"] else {n: key for n in names}
    try:
        report = inspect_report.inspect(
            module, rngs, *inputs, mesh=mesh, partition_rules=refs["--rules"],
            logical_axis_rules=refs["--logical-axis-rules"],
            allow_unused_rules=args.allow_unused_rules, require_rules=args.require_rules,
            optimizer=optimizer, dtype=args.dtype, device_memory=args.device_memory,
            method=args.method, top=top, depth=args.depth, **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        hint = "" if inputs or kwargs else " (no inputs were given: pass --input SPEC)"
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
