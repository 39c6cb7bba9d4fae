"""The ``flaxlazy`` command line: its parser, and option values (a mesh, specs, constructor
arguments, a size) turned into what ``inspect`` takes.

Every problem is a ``UsageError``: one line naming the option, what it expected, what it
got and the fix; ``cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Sequence
from typing import Any

from flaxlazy._src import inspect_options

PROG = "flaxlazy"
DESCRIPTION = (
    "Inspect a Flax Linen or NNX model without allocating anything: every parameter's shape, "
    "initializer and PartitionSpec, the bytes each device will hold (with the optimizer "
    "state), whether that fits, and how many functions materialize will compile."
)
TOP_EPILOG = "Each command lists its own options: flaxlazy inspect --help."
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
MAX_DEVICES = inspect_options.MAX_DEVICES
ARG_HELP = (
    "a constructor argument, in order; repeatable; replaces the positional "
    "arguments the factory returns. VALUE is a Python literal (12, 0.1, True, None, "
    "'text', (1, 2)), an array spec such as f32[8,16] (an abstract array), or else a string"
)
KWARG_HELP = (
    "a constructor keyword argument, NAME=VALUE (VALUE as for --arg); "
    "repeatable; added to (or replacing) the keyword arguments the factory returns"
)
# A word and a bracket: meant as an array spec (f32[8,16]), even when malformed.
_SPEC_LIKE = re.compile(r"\s*[A-Za-z][A-Za-z0-9]*\s*\[.*", re.DOTALL)


class UsageError(Exception):
    """A problem with the command line or the target: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``flaxlazy`` parser and its commands' parsers, by name."""
    from flaxlazy import __version__

    top = _Parser(prog=PROG, description=DESCRIPTION, epilog=TOP_EPILOG)
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                  parser_class=_Parser)
    p = commands.add_parser("inspect", help="will it fit, how is it sharded (nothing allocated; "
                                            "its options: flaxlazy inspect --help)",
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
    p.add_argument("--weights", metavar="PATH",
                   help="check a safetensors checkpoint (file, directory or index) against the "
                        "model from its headers alone, nothing read: each parameter's key and "
                        "transform (the init column), and the host memory the load needs")
    p.add_argument("--rename", metavar="llama|gpt2|REF",
                   help="with --weights: the rename rules, flaxlazy.LLAMA_HF (llama, the "
                        "default), GPT2_HF (gpt2), or REF to a list of (regex, key[, transform])")
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
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (what the target prints goes to stderr)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when materialize would stop, or the load does not fit")
    p.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    return top, {"inspect": p}


def parser() -> argparse.ArgumentParser:
    """The ``flaxlazy`` argument parser."""
    return _parsers()[0]


def parse_argv(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; a value may start with ``-`` (``--device-memory -1GiB``
    reads as ``--device-memory=-1GiB``), and an unknown option names its command's help.

    Examples:
      >>> parse_argv(["inspect", "m.py:f", "--arg", "-x", "--arg=-1.5e3"]).arg
      ['-x', '-1.5e3']
      >>> parse_argv(["inspect", "m.py:f", "--bogus"])
      Traceback (most recent call last):
      ...
      flaxlazy._src.cli.args.UsageError: unrecognized arguments: --bogus (see flaxlazy inspect ...)
    """
    top, commands = _parsers()
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if a in commands), None)
    if at is not None:
        argv[at + 1:] = _join_dash_values(argv[at + 1:], commands[argv[at]])
    args, extra = top.parse_known_args(argv)
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} "
                         f"(see {commands[args.command].prog} --help)")
    return args


def _join_dash_values(argv: list[str], command: argparse.ArgumentParser) -> list[str]:
    """``--opt -value`` as ``--opt=-value`` for the options that take a value, where
    ``-value`` is not one of the options (argparse would read it as a missing value)."""
    actions = [a for a in command._actions if a.option_strings]
    options = {s for a in actions for s in a.option_strings}
    takes_value = {s for a in actions if a.nargs is None for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        token, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if token == "--":
            return out + argv[i:]
        if (token in takes_value and value.startswith("-") and not value.startswith("--")
                and value not in options):
            out.append(f"{token}={value}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=4" -> {"data": 2, "model": 4}``: positive sizes, ``MAX_DEVICES`` at
    most in all (the mesh is abstract: it needs no devices).

    Examples:
      >>> parse_mesh("data=2, model=4")
      {'data': 2, 'model': 4}
      >>> parse_mesh("data=2,model")
      Traceback (most recent call last):
      ...
      flaxlazy._src.cli.args.UsageError: --mesh 'data=2,model': 'model' is not NAME=SIZE; ...
    """
    out: dict[str, int] = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([0-9]+)\s*", part)
        if not match:
            raise UsageError(f"--mesh {text!r}: {part.strip()!r} is not NAME=SIZE; {MESH_FORM}.")
        name, digits = match.group(1), match.group(2).lstrip("0") or "0"
        if name in out:
            raise UsageError(f"--mesh {text!r}: axis {name!r} is given twice; {MESH_FORM}.")
        # Compared as text first: int() refuses numbers of more than 4300 digits.
        if len(digits) > len(str(MAX_DEVICES)) or int(digits) > MAX_DEVICES:
            shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
            raise UsageError(f"--mesh {text!r}: axis {name!r} has size {shown}; sizes are "
                             f"positive ints of at most {MAX_DEVICES:,} devices in all (JAX's "
                             "limit). Give the devices along each axis, e.g. data=8,model=8.")
        size = int(digits)
        if size < 1:
            raise UsageError(f"--mesh {text!r}: axis {name!r} has size {size}; sizes are >= 1.")
        out[name] = size
    total = 1
    for size in out.values():
        total *= size
    if total > MAX_DEVICES:
        raise UsageError(f"--mesh {text!r}: {total:,} devices in all; a mesh holds at most "
                         f"{MAX_DEVICES:,} (JAX's limit). Give smaller axis sizes, e.g. "
                         "data=8,model=8.")
    return out


def parse_size(text: str, flag: str) -> int:
    """Bytes from a positive size such as ``80GiB`` (``inspect_options.parse_bytes``).

    Examples:
      >>> parse_size("1KiB", "--device-memory")
      1024
      >>> parse_size("-1GiB", "--device-memory")
      Traceback (most recent call last):
      ...
      flaxlazy._src.cli.args.UsageError: --device-memory '-1GiB': a negative size; ...
    """
    if text.strip().startswith("-"):
        raise UsageError(f"{flag} {text!r}: a negative size; expected one device's memory, "
                         "a positive size such as 80GiB or 16GB.")
    try:
        size = inspect_options.parse_bytes(text)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None
    if size < 1:
        raise UsageError(f"{flag} {text!r}: {size} bytes; expected one device's memory, a "
                         "positive size such as 80GiB or 16GB.")
    return size


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
      >>> parse_value("f32[2,", "--arg")
      Traceback (most recent call last):
      ...
      flaxlazy._src.cli.args.UsageError: --arg 'f32[2,': Malformed spec 'f32[2,': ...
    """
    from flaxlazy._src import specs

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _SPEC_LIKE.fullmatch(text):
        try:
            return specs.spec(text.strip())
        except (TypeError, ValueError) as e:
            raise UsageError(f"{flag} {text!r}: {e} To pass the text itself, quote it as a "
                             f"Python string: {flag} \"{text!r}\".") from None
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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def parse_top(text: str | None) -> int | None:
    """``--top``: a number of leaves, ``all`` (``sys.maxsize``) or None."""
    if text is None:
        return None
    if text == "all":
        return sys.maxsize
    if not text.isdigit():
        raise UsageError(f"--top {text!r}: expected a number of leaves or 'all'.")
    return int(text)
