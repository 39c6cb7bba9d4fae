"""Smoke tests for the scripts in `examples/`: each runs end to end in quick mode."""

import importlib.util
import math
import pathlib
import sys

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """Imports `examples/<name>.py` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


def test_train_digits_quick_reaches_high_test_accuracy(capsys):
    train_digits = load_example("train_digits")
    metrics = train_digits.main(["--quick", "--seed", "0"])
    assert metrics["test_accuracy"] > 0.9, metrics
    assert metrics["num_params"] == 53_002
    out = capsys.readouterr().out
    assert "params/Conv_0/kernel" in out  # the summary table was printed
    assert "test accuracy" in out


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_shard_gpt_quick_holds_a_quarter_per_device_and_starts_at_log_vocab(capsys):
    shard_gpt = load_example("shard_gpt")
    results = shard_gpt.main(["--quick"])  # mesh (data 2, model 4)

    assert results["mesh"] == {"data": 2, "model": 4}
    # Split 4 ways over "model" except LayerNorms and row-parallel biases (replicated).
    assert results["per_device_bytes"] < 0.3 * results["total_bytes"], results
    assert results["per_device_bytes"] > results["total_bytes"] / 8, results
    # What the plan promised is what each device actually holds.
    assert results["measured_device_bytes"] == results["per_device_bytes"]
    assert results["logits_shape"] == (8, 32, 512)
    assert results["log_vocab"] == pytest.approx(math.log(512))
    assert abs(results["loss"] - results["log_vocab"]) < 0.1, results

    out = capsys.readouterr().out
    assert "largest per-device load" in out  # the summary was printed before allocation
    assert out.index("largest per-device load") < out.index("materialized")
    assert "('model', None)" in out


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_train_lm_quick_loss_falls_and_resume_continues_exactly(tmp_path, capsys):
    train_lm = load_example("train_lm")
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


def test_finetune_digits_quick_loads_backbone_and_learns_all_digits(tmp_path, capsys):
    finetune = load_example("finetune_digits")
    results = finetune.main(["--quick", "--ckpt-dir", str(tmp_path)])

    assert results["pretrain_accuracy"] > 0.95, results  # digits 0-4, 5-way head
    assert (tmp_path / "backbone").is_dir()
    assert results["backbone_equal"], results  # read back bit for bit
    # A zero head: every logit equal, argmax says "0" for all images, ~10% correct.
    assert 0.05 < results["accuracy_before"] < 0.15, results
    assert results["accuracy_after"] > 0.9, results
    assert results["accuracy_after_new"] > 0.85, results  # digits never seen in pretraining
    out = capsys.readouterr().out
    assert "loaded backbone equals the pretrained one: True" in out
