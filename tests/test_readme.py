"""Every ```python block of the README runs as written, each in a fresh process.

A block runs in a new Python process with this test run's environment minus
``XLA_FLAGS``, so a block that needs several devices has to ask for them itself, as a
reader's script would. A block that is not meant to run says so with an HTML comment
(invisible on GitHub) on the line right above its fence::

    <!-- readme-test: skip (why it does not run) -->
    ```python

Blocks under some headings are followed by checks (``CHECKS``), run in the same process.

A ``print(...)`` line with a comment after it says what it prints: where the call prints
one line, the comment must be exactly that line (``print(n)  # 203530``); a call that
prints several lines (a table) is described by its comment instead. The ``$ flaxlazy
inspect`` transcript is run too and compared line by line, all but its timing line.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")


@dataclasses.dataclass(frozen=True)
class Block:
    heading: str  # the heading the block sits under
    line: int  # 1-based line of its first line of code
    code: str
    skip: str | None  # why it is not run, or None


def python_blocks(markdown: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with their heading and skip marker."""
    blocks, heading, fence, previous = [], "", None, ""
    for number, line in enumerate(markdown.splitlines(), 1):
        if fence is not None:  # inside a fenced block
            if line.strip() == "```":
                if fence["python"]:
                    blocks.append(
                        Block(
                            heading, fence["line"], "\n".join(fence["code"]) + "\n", fence["skip"]
                        )
                    )
                fence = None
            else:
                fence["code"].append(line)
            continue
        if line.startswith("```"):
            skip = SKIP.fullmatch(previous.strip())
            fence = {
                "python": line.strip() == "```python",
                "line": number + 1,
                "code": [],
                "skip": skip["why"] if skip else None,
            }
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip():
            previous = line
    assert fence is None, "unclosed ``` fence"
    return blocks


BLOCKS = python_blocks(README.read_text())

# Checks appended to the blocks under a heading, and what their output must contain.
CHECKS = {
    "Quick start": (
        """
import jax.numpy as jnp
params = variables["params"]
assert (params["layers_2"]["kernel"] == 0).all()
assert float(jnp.abs(params["layers_0"]["kernel"]).max()) <= (6 / (784 + 256)) ** 0.5
""",
        ["params/layers_0/kernel"],
    ),
    "Sharded, on 8 simulated CPU devices": (
        """
assert jax.device_count() == 8, jax.devices()
kernel, head = variables["params"]["layers_0"]["kernel"], variables["params"]["layers_2"]["kernel"]
assert kernel.sharding.spec == P(None, "model"), kernel.sharding
assert {s.data.shape for s in kernel.addressable_shards} == {(784, 64)}
assert head.sharding.is_fully_replicated and len(head.sharding.device_set) == 8
assert bool(jnp.isfinite(loss)), loss
assert not (params["layers_0"]["kernel"] == kernel).all()  # the step trained
assert opt_state[0].mu["layers_0"]["kernel"].sharding.spec == P(None, "model")
""",
        ["largest per-device load", "on each of 8 devices"],
    ),
}


# Defined before a block runs: a commented print line calls this instead of print.
_PRINT_CHECK = """
def __readme_print(__line, __comment, *args, **kwargs):
    import contextlib as _c, io as _io
    out = _io.StringIO()
    with _c.redirect_stdout(out):
        print(*args, **kwargs)
    text = out.getvalue()
    print(text, end="")
    lines = text.splitlines()
    if len(lines) == 1 and lines[0].strip() != __comment:
        raise AssertionError(
            f"README.md line {__line} prints {lines[0].strip()!r}; its comment says {__comment!r}")
"""


def checked_prints(block: Block) -> str:
    """The block's code with each commented ``print(`` line checking its comment."""
    lines = block.code.splitlines(keepends=True)
    tokens = tokenize.generate_tokens(io.StringIO(block.code).readline)
    comments = {t.start[0]: t.string[1:].strip() for t in tokens if t.type == tokenize.COMMENT}
    for row, comment in comments.items():
        code = lines[row - 1]
        if code.lstrip().startswith("print("):
            lines[row - 1] = code.replace(
                "print(", f"__readme_print({block.line + row - 1}, {comment!r}, ", 1)
    return _PRINT_CHECK + "".join(lines)


def _id(block: Block) -> str:
    return f"{re.sub(r'[^a-z0-9]+', '-', block.heading.lower()).strip('-')}-line{block.line}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skip], ids=_id)
def test_readme_block_runs_as_written(block, tmp_path):
    checks, expected = CHECKS.get(block.heading, ("", []))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", checked_prints(block) + checks],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"README.md line {block.line} (under {block.heading!r}) failed:\n{proc.stderr[-3000:]}"
    )
    for text in expected:
        assert text in proc.stdout, (text, proc.stdout)


def test_readme_runs_its_quick_start_and_sharding_blocks():
    runnable = {b.heading for b in BLOCKS if not b.skip}
    assert set(CHECKS) <= runnable, (set(CHECKS), runnable)
    for block in BLOCKS:
        assert block.skip is None or block.skip.strip(), block


def test_python_blocks_finds_blocks_headings_and_skip_markers():
    text = "\n".join(
        [
            "# Title",
            "```bash",
            "# not a heading",
            "```",
            "## Part",
            "```python",
            "x = 1",
            "```",
            "<!-- readme-test: skip (a fragment) -->",
            "",
            "```python",
            "y = x",
            "```",
        ]
    )
    blocks = python_blocks(text)
    assert blocks == [Block("Part", 7, "x = 1\n", None), Block("Part", 12, "y = x\n", "a fragment")]


def test_readme_says_how_to_get_devices_and_what_the_benchmarks_need():
    text = README.read_text()
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in text
    benchmarks = text[text.index("## Benchmarks") :]
    benchmarks = benchmarks[: benchmarks.index("\n## ", 1)]
    assert 'pip install -e ".[benchmarks]"' in benchmarks


def test_checked_prints_compares_one_line_outputs_with_their_comments():
    ok = Block("x", 10, "print(1 + 2)  # 3\nprint('a\\nb')  # two lines\n", None)
    wrong = Block("x", 20, "n = 5\nprint(n)  # 6\n", None)
    assert subprocess.run([sys.executable, "-c", checked_prints(ok)]).returncode == 0
    proc = subprocess.run([sys.executable, "-c", checked_prints(wrong)], capture_output=True,
                          text=True)
    assert "README.md line 21 prints '5'; its comment says '6'" in proc.stderr


def _transcript() -> tuple[list[str], list[str]]:
    """The README's ``$ flaxlazy inspect`` command (as arguments) and what it prints."""
    text = README.read_text()
    start = text.index("$ flaxlazy inspect ")
    block = text[start:text.index("```", start)].splitlines()
    command, rest = [], iter(block)
    for line in rest:
        command.append(line.strip().lstrip("$").strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(command).split()[1:], list(rest)


def test_readme_inspect_transcript_is_what_the_command_prints(monkeypatch):
    from flaxlazy._src import cli

    args, want = _transcript()
    assert args[:2] == ["inspect", "examples/factories.py:llama7b"], args
    monkeypatch.chdir(README.parent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(args) == 0
    got = out.getvalue().splitlines()
    timing = re.compile(r"inspected in +[0-9.]+ s")
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        if timing.match(w):
            assert timing.match(g), g
        else:
            assert g.rstrip() == w.rstrip()


def test_readme_lists_every_example_with_how_long_it_takes():
    # The durations have one source: docs/examples.json, which benchmarks/examples.py
    # writes; the README quotes it as that script prints it.
    spec = importlib.util.spec_from_file_location(
        "examples_timing", README.parent / "benchmarks" / "examples.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    results = json.loads((README.parent / "docs" / "examples.json").read_text())["results"]
    cells = timing.readme_cells(results)
    text = README.read_text()
    listed = text[text.index("## Examples"):text.index("## Tests")]
    rows = {line.split("`")[1]: line for line in listed.splitlines()
            if line.startswith("| `examples/")}
    scripts = sorted((README.parent / "examples").glob("*.py"))
    assert sorted(rows) == [f"examples/{s.name}" for s in scripts]
    assert sorted(cells) == sorted(timing.scripts()) == [s.stem for s in scripts]
    for name, cell in cells.items():
        default, quick = cell.removesuffix(")").split(" (`--quick`: ")
        assert rows[f"examples/{name}.py"].endswith(f"| {default} ({quick}) |"), name


def test_readme_pipeline_table_names_every_field_of_the_interfaces():
    # "How it works" describes the stages by their interfaces; a field added, renamed or
    # removed must show there too.
    from flaxlazy._src import entrances
    from flaxlazy._src import placement
    from flaxlazy._src import traced_call
    from flaxlazy._src.sources import kinds
    from flaxlazy._src.sources import registry

    text = README.read_text()
    section = text[text.index("## How it works"):text.index("While tracing abstractly")]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines()
            if line.startswith("| `")}
    expected = {
        "`Entrance` (`entrances.py`)": set(entrances.Entrance._fields) - {"name", "describes"},
        "`TracedCall` (`traced_call.py`)": set(traced_call.TracedCall._fields),
        "`Placement` (`placement.py`)": {"device", "shardings", "mesh"},
        "`Source` (`sources/kinds.py`)": set(kinds.Source._fields) - {"kind"},
    }
    assert set(rows) == set(expected), sorted(rows)
    for name, fields in expected.items():
        assert all(f"`{f}`" in rows[name] for f in fields), (name, fields, rows[name])
    for entrance in entrances.ENTRANCES:
        assert f"`{entrance.name}/`" in section, entrance.name
    assert {s.kind for s in registry.SOURCES} == {
        "flax", "initializer", "array", "checkpoint", "safetensors", "traced"}, (
        "a new source: name it in the README's Source row")
    assert set(placement.Placement._fields) >= {"device", "shardings", "mesh"}
