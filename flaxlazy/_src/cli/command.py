"""The ``flaxlazy`` command: ``flaxlazy inspect TARGET [options]`` (also ``python -m flaxlazy``).

Everything the command does is ``flaxlazy.inspect``; this module only turns the command
line (parsed by ``cli.args``) into its arguments (a factory to call, specs or an NNX
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
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from flaxlazy._src.cli import args as cli_args
from flaxlazy._src.cli import target as cli_target

PROG = cli_args.PROG
UsageError = cli_args.UsageError


def _optimizer(text: str | None, target_module: Any) -> Any:
    from flaxlazy._src import inspect_options

    if text is None or text in inspect_options.OPTIMIZERS:
        return text
    if ":" not in text and not hasattr(target_module, text):
        raise UsageError(f"--optimizer {text!r}: expected one of "
                         f"{', '.join(inspect_options.OPTIMIZERS)}, or MODULE:NAME / "
                         "FILE.py:NAME of an optax transformation.")
    tx = cli_target.resolve(text, "--optimizer", target_module)
    import optax

    if not isinstance(tx, optax.GradientTransformation) and callable(tx):
        try:
            tx = tx()
        except SystemExit as e:
            raise UsageError(f"--optimizer {text!r} exited ({cli_target.exited(e)}) instead of "
                             "returning an optax transformation; return one rather than "
                             "exiting.") from e
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--optimizer {text!r} raised {cli_target.one_line(e)}") from e
    if not isinstance(tx, optax.GradientTransformation):
        raise UsageError(f"--optimizer {text!r} is a {type(tx).__name__}, not an optax "
                         "GradientTransformation.")
    return tx


def _weights(args: argparse.Namespace, target_module: Any) -> Any:
    """``initializers=`` reading every parameter from ``--weights`` (None without it)."""
    if args.weights is None:
        if args.rename is not None:
            raise UsageError("--rename needs --weights.")
        return None
    import flaxlazy

    named = {None: flaxlazy.LLAMA_HF, "llama": flaxlazy.LLAMA_HF, "gpt2": flaxlazy.GPT2_HF}
    rename = named[args.rename] if args.rename in named else cli_target.resolve(
        args.rename, "--rename", target_module)
    try:
        return {"**": flaxlazy.from_safetensors(args.weights, rename=rename)}
    except (TypeError, ValueError) as e:
        raise UsageError(f"--weights/--rename: {e}") from None


def _weights_text(summary: dict[str, Any]) -> str:
    from flaxlazy._src import summary as summary_lib

    size = summary_lib.format_bytes
    return (f"weights          {summary['path']}: {summary['tensors']} tensors, "
            f"{size(summary['bytes'])} in {summary['files']} file(s); headers checked, no tensor "
            f"read. The load maps at most {size(summary['mapped_at_once'])} of them on the "
            "host at once, besides the parameters' own buffers")


def run(args: argparse.Namespace) -> int:
    """Runs ``inspect`` for parsed ``args``; returns the exit status."""
    from flaxlazy._src import inspect_render

    # What loading the target adds to sys.path and sys.modules lasts while its code runs.
    with cli_target.loading(), _stdout_to_stderr() if args.json else contextlib.nullcontext():
        report = _report(args)
    weights = None
    if args.weights is not None:
        from flaxlazy._src.sources.from_safetensors import shards as safetensors_shards

        weights = safetensors_shards.load_summary(args.weights)
    if args.json:
        print(json.dumps(report.to_dict() | ({"weights": weights} if weights else {}),
                         indent=2))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(report.render(color=color))
        if weights:
            print(_weights_text(weights))
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
    obj = cli_target.resolve(args.target, "TARGET")
    where = args.target.rpartition(":")[0]
    target_module = cli_target.load_module(where, "TARGET") if where else None
    model = cli_target.build_model(obj, args.target, inputs, kwargs, bool(args.input),
                                   arguments, bool(args.arg or args.kwarg))
    refs = {}
    for flag, value in (("--rules", args.rules), ("--logical-axis-rules",
                                                  args.logical_axis_rules)):
        refs[flag] = cli_target.resolve(value, flag, target_module) if value is not None else None
    if mesh is None and (args.rules or args.logical_axis_rules or args.require_rules is not None):
        raise UsageError("--rules, --logical-axis-rules and --require-rules need a --mesh.")
    optimizer = _optimizer(args.optimizer, target_module)
    initializers = _weights(args, target_module)
    names = [n.strip() for n in (args.rngs or "params").split(",") if n.strip()]
    if model.nnx:
        call_args = model.args
        call_kwargs = cli_target.with_rngs(model.module, model.args, model.kwargs,
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
            method=args.method, top=top, depth=args.depth, initializers=initializers,
            **call_kwargs,
        )
    except SystemExit as e:  # the model's own code: its constructor, its __call__
        raise UsageError(f"inspecting {args.target} failed: the model's code exited "
                         f"({cli_target.exited(e)}); build the model rather than exiting.") from e
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        raise UsageError(f"inspecting {args.target} failed: {cli_target.one_line(e)}{hint}") from e
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
        print(f"{PROG}: error: {e if isinstance(e, UsageError) else cli_target.one_line(e)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
