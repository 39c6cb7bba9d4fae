"""`flaxlazy.inspect` and the `flaxlazy inspect` command: exact bytes, exact compile counts,
the messages materialize would give, nothing allocated, one-line errors."""

import collections
import gc
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src import cli
from flaxlazy._src import inspect_report
from flaxlazy._src.compiles import count_compiles

ROOT = pathlib.Path(__file__).resolve().parent.parent
FACTORIES = "examples/factories.py"
KEY = jax.eval_shape(jax.random.key, 0)  # abstract: inspect needs no real key
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def factories():
    return cli.load_module(str(ROOT / FACTORIES), "TARGET")


@pytest.fixture(scope="module")
def warm():
    """The first materialize in a process also runs flaxlazy's one-time self-check (and
    JAX compiles its own eager helpers): do that on another model before counting."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    flaxlazy.init_train_state(nn.Dense(3), optax.adam(1e-3), jax.random.key(1),
                              flaxlazy.spec("f32[1,2]"), mesh=mesh)


def per_device(tree):
    """Bytes each device holds, from the shards of every array in `tree`."""
    out = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def command(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-m", "flaxlazy", "inspect", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


TINY = [f"{FACTORIES}:llama_tiny", "--mesh", "data=2,model=4", "--rules", "LLAMA_RULES",
        "--optimizer", "adamw", "--depth", "1", "--device-memory", "100KiB"]


@needs_8
def test_command_report_is_what_init_train_state_creates(factories, warm):
    text, as_json = command(*TINY), command(*TINY, "--json", "--strict")
    assert text.returncode == 0, text.stderr
    assert as_json.returncode == 1  # --strict: it does not fit in 100 KiB
    report = json.loads(as_json.stdout)
    assert as_json.stderr.startswith("flaxlazy inspect: --strict: does not fit: each device "
                                     "needs 159.8 KiB but has 100.0 KiB (short by 59.8 KiB)")

    module, inputs = factories.llama_tiny()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    flaxlazy.clear_caches()
    with count_compiles() as compiles:
        state = flaxlazy.init_train_state(module, optax.adamw(1e-3), jax.random.key(0), *inputs,
                                          mesh=mesh, partition_rules=factories.LLAMA_RULES)
    held = per_device(state)
    assert set(held.values()) == {report["per_device"]} and len(held) == 8
    assert report["total_bytes"] == sum(x.nbytes for x in jax.tree.leaves(state))
    assert report["compiles"]["total"] == compiles.count
    assert len(report["leaves"]) == len(jax.tree.leaves(state))
    assert report["fits"] is False and report["short_by"] == report["per_device"] - 100 * 1024
    assert [p["kind"] for p in report["problems"]] == ["does_not_fit"]
    assert report["mesh"] == {"data": 2, "model": 4} and report["optimizer"] == "adamw"
    assert report["modules"]["layers_0"]["opt_state_bytes"] == 2 * report["modules"][
        "layers_0"]["bytes"]
    leaves = {leaf["path"]: leaf for leaf in report["leaves"]}
    kernel = leaves["params/layers_0/self_attn/q_proj/kernel"]
    assert kernel["spec"] == ["data", "model", None] and kernel["init"] == "lecun_normal"
    assert kernel["per_device"] == kernel["bytes"] // 8
    assert leaves["opt_state/0/mu/lm_head/kernel"]["spec"] == ["data", "model"]

    lines = text.stdout.splitlines()
    assert lines[0] == f"Llama ({FACTORIES}:llama_tiny)" and "\033[" not in text.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("path "))
    table = lines[header:header + 12]  # header, rule, the 10 largest leaves
    assert all(len(line) == len(table[0]) for line in table)  # aligned columns
    assert table[2].startswith("opt_state/0/mu/embed_tokens/embedding")
    assert "device memory    100.0 KiB: does not fit, short by 59.8 KiB" in lines
    assert "per module (depth 1)" in lines
    assert any(line.startswith("compiles") and f"compile {compiles.count} " in line
               for line in lines)


@needs_8
@pytest.mark.parametrize("case", ["mlp", "convnet-adam", "scanned-bf16-sgd", "llama-overrides"])
def test_bytes_and_compile_count_exact(factories, warm, case):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    tx, kw, dtype = None, {}, None
    if case == "mlp":
        module, inputs, mesh = factories.mlp(), (flaxlazy.spec("f32[4,784]"),), None
    elif case == "convnet-adam":
        (module, inputs), tx = factories.convnet(), optax.adam(1e-3)
    elif case == "scanned-bf16-sgd":
        (module, inputs), tx, dtype = factories.scanned(), optax.sgd(0.1, momentum=0.9), "bf16"
        kw = {"partition_rules": [("head/**", P()), ("**/kernel", P(None, "model")),
                                  ("**", P())]}
    else:
        module, inputs = factories.llama_tiny()
        kw = {"partition_rules": factories.LLAMA_RULES, "initializers": {
            "lm_head/kernel": nn.initializers.zeros,
            "norm/scale": np.full((64,), 2.0, np.float32),
            "**/down/kernel": nn.initializers.normal(0.02),
        }}
    mesh_kw = {} if mesh is None else {"mesh": mesh}
    report = flaxlazy.inspect(module, KEY, *inputs, optimizer=tx, dtype=dtype, **mesh_kw, **kw)
    assert report.problems == ()

    flaxlazy.clear_caches()
    with count_compiles() as compiles:
        if tx is None:
            made = flaxlazy.materialize(module, jax.random.key(0), *inputs, **mesh_kw, **kw)
        else:
            made = flaxlazy.init_train_state(module, tx, jax.random.key(0), *inputs, **mesh_kw,
                                             **kw)
    assert report.compiles_total == compiles.count
    sources = collections.Counter(leaf.source for leaf in report.leaves)
    if dtype is None:
        assert set(per_device(made).values()) == {report.per_device}
        assert report.total_bytes == sum(x.nbytes for x in jax.tree.leaves(made))
    else:  # the what-if: floating params (and the momentum that follows them) in bf16
        params = sum(x.nbytes for x in jax.tree.leaves(made.params))
        assert report.collections()["params"][2] == params // 2
        assert report.optimizer_bytes == params // 2
        assert "floating parameters cast to bfloat16" in str(report)
    if case == "scanned-bf16-sgd":
        # the scan stack: a key per layer, no traced run
        assert sources["traced"] == 0 and report.compiles["traced_run"] == 0
        inits = {leaf.path: leaf.init for leaf in report.leaves}
        assert inits["params/layers/Dense_0/kernel"] == "lecun_normal"
    if case == "llama-overrides":
        assert sources["initializer"] == 3 and sources["array"] == 1
        inits = {leaf.path: leaf.init for leaf in report.leaves}
        assert inits["params/lm_head/kernel"] == "override zeros"
        assert inits["params/layers_1/mlp/down/kernel"] == "override normal(stddev=0.02)"
    if case == "convnet-adam":
        assert report.collections()["batch_stats"][0] == 2
        assert {leaf.mark for leaf in report.leaves} == {"", "*"}  # replicated by default


@needs_8
def test_allocates_nothing(factories):
    module, inputs = factories.llama_tiny()
    gc.collect()
    before = len(jax.live_arrays())
    report = flaxlazy.inspect(module, KEY, *inputs, mesh={"data": 2, "model": 4},
                              partition_rules=factories.LLAMA_RULES, optimizer="adamw")
    gc.collect()
    assert len(jax.live_arrays()) == before
    assert report.devices == 8 and report.fits is None


def _unused(rules):
    return rules + [("layers_*/mlp/nothere/kernel", P())]


@needs_8
@pytest.mark.parametrize("problem", ["unused_rule", "bad_spec", "uncovered"])
@pytest.mark.parametrize("optimizer", [None, "adamw"])
def test_problems_carry_the_message_materialize_raises(factories, problem, optimizer):
    module, inputs = factories.llama_tiny()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rules = {"unused_rule": _unused(factories.LLAMA_RULES), "bad_spec": factories.LLAMA_RULES,
             "uncovered": factories.LLAMA_RULES[:3]}[problem]
    if problem == "bad_spec":
        mesh = Mesh(np.array(jax.devices()[:6]).reshape(3, 2), ("data", "model"))
    with pytest.raises(ValueError) as raised:
        if optimizer is None:
            flaxlazy.materialize(module, jax.random.key(0), *inputs, mesh=mesh,
                                 partition_rules=rules)
        else:
            flaxlazy.init_train_state(module, optax.adamw(1e-3), jax.random.key(0), *inputs,
                                      mesh=mesh, partition_rules=rules)
    report = flaxlazy.inspect(module, KEY, *inputs, mesh=mesh.abstract_mesh,
                              partition_rules=rules, optimizer=optimizer)
    assert report.problems[0] == (problem, str(raised.value))
    text = str(report)
    assert f"problem: {report.problems[0].message}" in text
    if problem != "unused_rule":
        marked = [leaf for leaf in report.leaves if leaf.mark == "!"]
        assert marked and all(leaf.per_device == leaf.nbytes for leaf in marked)
        assert "! materialize would stop on it" in text
    allowed = flaxlazy.inspect(module, KEY, *inputs, mesh=mesh.abstract_mesh,
                               partition_rules=rules, optimizer=optimizer,
                               allow_unused_rules=True)
    assert (allowed.problems == ()) == (problem == "unused_rule")


@pytest.mark.parametrize("argv, message", [
    ([f"{FACTORIES}:llama7bb"], "has no 'llama7bb'. Did you mean 'llama7b'"),
    (["no_such_package.models:make"], "cannot import 'no_such_package.models'"),
    (["examples/missing.py:make"], "'examples/missing.py': no such file"),
    ([f"{FACTORIES}:LLAMA_RULES"], "is a list, not a Linen module"),
    ([f"{FACTORIES}:mlp"], "missing 1 required positional argument: 'inputs' (no inputs"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,7x]"], "--input 'f32[4,7x]': Malformed spec"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--mesh", "data=2,model"],
     "--mesh 'data=2,model': 'model' is not NAME=SIZE"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--mesh", "data=0"], "has size 0"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--optimizer", "adamx"],
     "--optimizer 'adamx': expected one of adamw"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--device-memory", "80Gx"],
     "--device-memory: `device_memory` '80Gx' is not a size"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--dtype", "i8"], "is not a floating dtype"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--rules", "LLAMA_RULES"], "need a --mesh"),
    ([f"{FACTORIES}:mlp", "--input", "f32[4,8]", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["inspect", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flaxlazy: error: ") and err.count("\n") == 1, err
    assert message in err


def test_factory_that_raises_one_line_and_traceback_only_with_debug(tmp_path):
    (tmp_path / "broken.py").write_text(
        "def make():\n    raise RuntimeError('no config file found\\nsecond line')\n")
    target = f"{tmp_path / 'broken.py'}:make"
    plain, debug = command(target), command(target, "--debug")
    assert plain.returncode == debug.returncode == 2
    assert plain.stdout == "" and plain.stderr == (
        f"flaxlazy: error: TARGET {target!r}: the factory raised RuntimeError: no config "
        "file found\n")
    assert "Traceback" in debug.stderr and "raise RuntimeError" in debug.stderr


def test_nnx_target_is_constructed_with_rngs(tmp_path, capsys):
    (tmp_path / "nnx_model.py").write_text(
        "from flax import nnx\nclass Model(nnx.Module):\n"
        "    def __init__(self, d, *, rngs):\n        self.w = nnx.Linear(d, d, rngs=rngs)\n"
        "def two(d, rngs=None):\n    return nnx.Linear(d, 2 * d, rngs=rngs)\n")
    assert cli.main(["inspect", f"{tmp_path / 'nnx_model.py'}:Model", "--arg", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "Model" and report["collections"]["params"]["params"] == 72
    assert report["framework"] == "nnx"
    # A function taking `rngs` is a constructor, not a factory; --rngs names its streams.
    argv = ["inspect", f"{tmp_path / 'nnx_model.py'}:two", "--kwarg", "d=4", "--rngs", "params"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("two (") and "truncated_normal (params stream)" in text


def test_optimizer_and_rules_by_reference(tmp_path, capsys, monkeypatch):
    (tmp_path / "setup.py").write_text(
        "import optax\nfrom jax.sharding import PartitionSpec as P\n"
        "RULES = [('**/kernel', P(None, 'model')), ('**', P())]\n"
        "def tx():\n    return optax.lion(1e-4)\n")
    monkeypatch.chdir(ROOT)
    ref = tmp_path / "setup.py"
    argv = ["inspect", f"{FACTORIES}:mlp", "--input", "f32[4,784]", "--mesh", "model=2",
            "--rules", f"{ref}:RULES", "--optimizer", f"{ref}:tx", "--json", "--top", "all"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["optimizer"] == "optax transformation"
    assert report["collections"]["opt_state"]["leaves"] == 5  # lion: count and mu
    kernel = next(x for x in report["leaves"] if x["path"] == "opt_state/0/mu/layers_0/kernel")
    assert kernel["spec"] == [None, "model"] and kernel["per_device"] == kernel["bytes"] // 2


def test_report_text_color_and_defaults(factories):
    report = flaxlazy.inspect(factories.mlp(), KEY, flaxlazy.spec("f32[2,784]"),
                              device_memory="1MiB")
    text = str(report)
    assert text.splitlines()[:2] == ["Sequential", "  inputs  float32[2,784]"]
    header = text.splitlines()[text.splitlines().index("leaves (4)") + 1]
    assert header.split() == ["path", "shape", "dtype", "init", "params", "bytes"]  # no mesh
    assert report.fits is True and "1.0 MiB: fits, 229.0 KiB free" in text
    assert "\033[32mfits\033[0m" in report.render(color=True) and "\033[" not in text
    assert json.loads(report.to_json())["leaves"][0]["init"] == "zeros"  # layers_0/bias
    with pytest.raises(TypeError, match=r"`partition_rules` need a `mesh=`"):
        flaxlazy.inspect(factories.mlp(), KEY, flaxlazy.spec("f32[2,784]"),
                         partition_rules=[("**", P())])
    with pytest.raises(ValueError, match=r"expected an optax.GradientTransformation or one of"):
        flaxlazy.inspect(factories.mlp(), KEY, flaxlazy.spec("f32[2,784]"), optimizer="adm")
    with pytest.raises(ValueError, match=r"`mesh` \{'data': 65536, 'model': 32768\} has "
                                         r"2,147,483,648 devices; JAX counts at most"):
        flaxlazy.inspect(factories.mlp(), KEY, flaxlazy.spec("f32[2,784]"),
                         mesh={"data": 2**16, "model": 2**15})
    by_keyword = flaxlazy.inspect(factories.mlp(), flaxlazy.spec("f32[2,784]"), rngs=KEY)
    assert by_keyword.leaves == report.leaves and by_keyword.framework == "linen"
    with pytest.raises(TypeError, match=r"inspect: missing `rngs`: for a Linen module pass a "
                                        r"PRNG key after it"):
        flaxlazy.inspect(factories.mlp())


def test_console_script_and_module_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"flaxlazy": "flaxlazy._src.cli:main"}
    assert inspect_report.parse_bytes("80GiB") == 80 << 30
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
