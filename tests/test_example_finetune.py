"""Smoke test for `examples/finetune_digits.py`: a pretrained backbone via from_checkpoint."""

import importlib.util
import pathlib
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "finetune_digits.py"


def load_example():
    """Imports `examples/finetune_digits.py` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("examples_finetune_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


def test_finetune_digits_quick_loads_backbone_and_learns_all_digits(tmp_path, capsys):
    finetune = load_example()
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
