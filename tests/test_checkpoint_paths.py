"""Where save writes: refused paths, what force may replace, and writers racing to one path."""

import multiprocessing
import os
import re

import chex
import jax
import numpy as np
import pytest

import flaxlazy
from flaxlazy._src.checkpoint import folders

TREE = {"w": np.arange(6.0, dtype=np.float32)}


def _target(tree):
    return jax.eval_shape(lambda: tree)


# ------------------------------------------------------------------------ refused paths
@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A working directory two levels down, holding a file that must survive."""
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("keep me")
    monkeypatch.chdir(here)
    return here


@pytest.mark.parametrize(
    "where, why",
    [
        ("", "the path is empty"),
        (".", "it is the current working directory"),
        ("cwd", "it is the current working directory"),
        ("..", "it contains the current working directory"),
        ("parent", "it contains the current working directory"),
        ("home", "it is the home directory"),
    ],
)
def test_save_refuses_folders_it_must_not_replace(cwd, monkeypatch, where, why):
    home = cwd.parent.parent / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("keep me too")
    monkeypatch.setenv("HOME", str(home))
    path = {"cwd": str(cwd), "parent": cwd.parent.parent, "home": home}.get(where, where)
    with pytest.raises(ValueError, match=rf"refusing to write a checkpoint at "
                                         rf"{re.escape(repr(os.fspath(path)))}.*: {why}"):
        flaxlazy.save(path, TREE, force=True)
    assert os.listdir(cwd) == ["notes.txt"]
    assert os.listdir(home) == ["thesis.tex"]
    assert sorted(os.listdir(cwd.parent.parent)) == ["a", "home"]


def test_save_refuses_a_filesystem_root():
    root = os.path.abspath(os.sep)
    with pytest.raises(ValueError, match=r"refusing .*: it is a filesystem root"):
        flaxlazy.save(root, TREE)


def test_force_replaces_only_checkpoints(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "results.csv").write_text("1,2,3")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(data))} exists and is a folder, "
                                              r"not a checkpoint .*even with force=True"):
        flaxlazy.save(data, TREE, force=True)
    with pytest.raises(FileExistsError, match="not a checkpoint"):  # without force as well
        flaxlazy.save(data, TREE)
    assert os.listdir(data) == ["results.csv"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is a file, not a checkpoint"):
        flaxlazy.save(tmp_path / "file", TREE, force=True)
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["data", "file"]  # no staging folders left


def test_force_replaces_a_damaged_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"w": np.zeros(2, np.float32)})
    os.remove(path / "_METADATA")  # still a checkpoint by its other Orbax files
    flaxlazy.save(path, TREE, force=True)
    chex.assert_trees_all_equal(flaxlazy.restore(path, _target(TREE)), TREE)


# ------------------------------------------------------------------------ racing writers
TRIALS = 2
# Linux swaps the old checkpoint out in one rename; elsewhere two renames are used.
RENAMES = ["swap", "two-renames"] if folders._renameat2 is not None else ["two-renames"]


def _tree(writer):
    # Several entries, so a checkpoint mixing two writers' files is caught.
    return {"a": np.full((32, 32), writer, np.float32), "b": np.full(5, writer, np.int32),
            "step": writer}


# Writer 1 is this process, writer 2 a spawned one that runs this code with exec (and
# so imports only what it needs): each saves to a new path per trial, at the same moment.
RACE = f"""
import os
import numpy as np
import flaxlazy
from flaxlazy._src.checkpoint import folders

renameat2 = folders._renameat2
try:
    for renames in {RENAMES!r}:
        folders._renameat2 = renameat2 if renames == "swap" else None
        for trial in range({TRIALS}):
            for force in (False, True):
                path = os.path.join(root, f"{{renames}}-{{trial}}-{{force}}", "ckpt")
                tree = {{"a": np.full((32, 32), writer, np.float32),
                         "b": np.full(5, writer, np.int32), "step": writer}}
                barrier.wait()
                try:
                    flaxlazy.save(path, tree, force=force)
                    outcome = "ok"
                except Exception as e:
                    outcome = f"{{type(e).__name__}}: {{e}}"
                results.put((path, force, writer, outcome))
finally:
    folders._renameat2 = renameat2
"""

EXIT = "results.close(); results.join_thread(); os._exit(0)"  # skip JAX's slow shutdown


@pytest.mark.slow
def test_writers_racing_to_one_path(tmp_path):
    """Without force exactly one wins, the other is told; with force the last one wins.

    Two processes save to each new path at once: whatever a save reported as written
    restores exactly, nothing is left beside the checkpoint, and no save deletes what
    another wrote.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2, timeout=120), ctx.Queue()
    scope = {"root": str(tmp_path), "barrier": barrier, "results": results}
    other = ctx.Process(target=exec, args=(RACE + EXIT, {**scope, "writer": 2}))
    other.start()
    try:
        exec(RACE, {**scope, "writer": 1})
        outcomes = [results.get(timeout=60) for _ in range(2 * 2 * TRIALS * len(RENAMES))]
    finally:
        other.join(timeout=30)
        other.kill()
    by_path = {}
    for path, force, writer, outcome in outcomes:
        by_path.setdefault((path, force), {})[writer] = outcome
    for (path, force), got in sorted(by_path.items()):
        assert os.listdir(os.path.dirname(path)) == ["ckpt"], (path, got)  # nothing left over
        restored = flaxlazy.restore(path, _target(_tree(1)))
        winner = int(restored["step"])
        chex.assert_trees_all_equal(restored, _tree(winner))  # one writer's, whole
        assert got[winner] == "ok", (path, got)
        loser = got[3 - winner]
        if force:
            assert loser == "ok", (path, got)
        else:
            assert re.match(r"FileExistsError: .*(already exists|created by another save)",
                            loser), (path, got)
