"""Smoke test for `examples/train_lm.py`: training, checkpoints and resume on 8 devices."""

import importlib.util
import pathlib
import sys

import jax
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"


def load_example():
    """Imports `examples/train_lm.py` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("examples_train_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_train_lm_quick_loss_falls_and_resume_continues_exactly(tmp_path, capsys):
    train_lm = load_example()
    quick = ["--quick", "--ckpt-every", "10", "--keep", "2", "--sample-chars", "40"]
    ckpt = tmp_path / "resumed"

    # 30 steps, then 30 more resumed from the last checkpoint...
    part1 = train_lm.main([*quick, "--steps", "30", "--ckpt-dir", str(ckpt)])
    out = capsys.readouterr().out
    part2 = train_lm.main([*quick, "--steps", "30", "--resume", "--ckpt-dir", str(ckpt)])
    assert "resumed from" in capsys.readouterr().out
    # ... and 60 in one go (the quick default).
    straight = train_lm.main([*quick, "--ckpt-dir", str(tmp_path / "straight")])

    assert "mesh {'data': 4, 'model': 2} on 8" in out
    assert "its Adam moment (None, 'model')" in out  # optimizer state sharded like params
    # The loss starts near log(vocab) = log(128) = 4.85 and visibly falls.
    assert 4.5 < part1["first_loss"] < 5.2, part1
    assert part1["last_loss"] < part1["first_loss"] - 0.8, part1
    assert straight["last_loss"] < straight["first_loss"] - 1.5, straight
    assert straight["val_loss"] < straight["first_loss"] - 1.5, straight
    assert part1["sample"].startswith("The ") and len(part1["sample"]) == 4 + 40

    # Checkpoints every 10 steps, the last 2 kept; the step count continues on resume.
    assert part1["resumed_from"] is None and part1["steps"] == 30
    assert part1["checkpoints"] == [20, 30]
    assert part2["resumed_from"] == 30 and part2["steps"] == 60
    assert part2["checkpoints"] == [50, 60]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_50", "step_60"]
    assert straight["steps"] == 60
    # Training picks up where it stopped rather than starting over near log(vocab)...
    assert part2["first_loss"] < part1["first_loss"] - 0.8, (part1, part2)
    # ... and exactly so: the whole train state is restored and batches depend on the
    # step only, so the resumed run ends where the uninterrupted one does.
    assert part2["last_loss"] == pytest.approx(straight["last_loss"], rel=1e-5)
    assert part2["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
    assert part2["sample"] == straight["sample"]
