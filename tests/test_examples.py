"""Smoke tests for the scripts in `examples/`: each runs end to end in quick mode."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """Imports `examples/<name>.py` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
