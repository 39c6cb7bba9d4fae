"""Smoke test for `examples/shard_gpt.py`: a GPT materialized in shards on 8 devices."""

import importlib.util
import math
import pathlib
import sys

import jax
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "shard_gpt.py"


def load_example():
    """Imports `examples/shard_gpt.py` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("examples_shard_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_shard_gpt_quick_holds_a_quarter_per_device_and_starts_at_log_vocab(capsys):
    shard_gpt = load_example()
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
