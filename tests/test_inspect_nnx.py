"""`flaxlazy.inspect` and `flaxlazy inspect` for NNX constructors: the same leaves, paths,
specs, per-device bytes, compile count and problems as `materialize` / `init_train_state`."""

import collections
import functools
import gc
import json
import pathlib

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from nnx_models import GPT
from nnx_models import Stacked

import flaxlazy
from flaxlazy._src import cli
from flaxlazy._src import paths
from flaxlazy._src import summary
from flaxlazy._src.compiles import count_compiles

ROOT = pathlib.Path(__file__).resolve().parent.parent
FACTORIES = "examples/factories.py"
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

# GPT(2, 16, 64): every parameter placed over model=8; batch_stats and the Dropout's
# stream state (RngKey/RngCount) by their collection.
RULES = [
    ("embed/embedding", P("model", None)),  # (vocab, d)
    ("blocks/*/attn/out/kernel", P(None, None, "model")),  # (h, d/h, d)
    ("blocks/*/attn/*/kernel", P("model", None, None)),  # query, key, value: (d, h, d/h)
    ("blocks/*/up/kernel", P(None, "model")),  # (d, 4d)
    ("blocks/*/down/kernel", P("model", None)),  # (4d, d)
    ("head/kernel", P(None, "model")),  # (d, vocab)
    ("**/bias", P()),
    ("**/scale", P()),
    ("batch_stats/**", P()),
    ("Rng*/**", P()),
]
ARGS = (2, 16, 64)


@pytest.fixture(scope="module")
def warm():
    """The first materialize in a process runs flaxlazy's one-time self-check (and JAX
    compiles its eager helpers): do that on another model before counting."""
    mesh = jax.make_mesh((8,), ("model",))
    flaxlazy.init_train_state(nnx.Linear, optax.adam(1e-3), 3, 8, rngs=nnx.Rngs(1), mesh=mesh)


def per_device(tree):
    """Bytes each device holds, from the shards of every array in `tree`."""
    out = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def arrays(model, optimizer=None):
    """``{report path: array}`` of an NNX model (``params/<path>``, ``<collection>/<path>``)
    and its optimizer (``opt_state/<path>``, ``step``)."""
    out = {path: paths.unbox(x) for path, x in paths.flatten(summary.as_tree(model))[0]}
    if optimizer is not None:
        for state_path, leaf in nnx.to_flat_state(nnx.state(optimizer)):
            out[paths.SEP.join(map(str, state_path))] = leaf.get_value()
    return out


@needs_8
@pytest.mark.parametrize("optimizer", [None, "adamw"])
def test_report_is_what_materialize_creates(warm, optimizer):
    report = flaxlazy.inspect(GPT, *ARGS, rngs=nnx.Rngs(0), mesh={"model": 8},
                              partition_rules=RULES, optimizer=optimizer)
    assert report.problems == () and report.model == "GPT" and report.framework == "nnx"

    mesh, rngs = jax.make_mesh((8,), ("model",)), nnx.Rngs(0)
    flaxlazy.clear_caches()
    with count_compiles() as compiles:
        if optimizer is None:
            made = (flaxlazy.materialize(GPT, *ARGS, rngs=rngs, mesh=mesh, partition_rules=RULES),)
        else:
            made = flaxlazy.init_train_state(GPT, optax.adamw(1e-3), *ARGS, rngs=rngs, mesh=mesh,
                                             partition_rules=RULES)
        jax.block_until_ready([nnx.state(m) for m in made])
    assert report.compiles_total == compiles.count
    held = per_device([nnx.state(m) for m in made])
    assert set(held.values()) == {report.per_device} and len(held) == 8
    assert report.total_bytes == sum(
        x.nbytes for x in jax.tree.leaves([nnx.state(m) for m in made]))
    made = arrays(*made)
    leaves = {leaf.path: leaf for leaf in report.leaves}
    assert list(leaves) == list(made)  # same paths, in the same order
    for path, leaf in leaves.items():  # the spec and dtype each array was created with
        assert (leaf.spec, leaf.shape, leaf.dtype) == (
            made[path].sharding.spec, made[path].shape, str(made[path].dtype)), path
    up = leaves["params/blocks/0/up/kernel"]
    assert up.spec == P(None, "model") and up.per_device == up.nbytes // 8
    assert up.init == "truncated_normal (default stream)"
    assert leaves["params/blocks/1/down/kernel"].init == "normal (default stream)"
    assert leaves["params/blocks/0/up/bias"].init == "zeros"
    assert leaves["params/blocks/0/ln1/scale"].init == "ones"
    assert leaves["batch_stats/blocks/0/bn/var"].init == "ones"
    assert leaves["RngKey/blocks/0/drop/rngs/key"].init == "key (default stream)"
    if optimizer:
        mu = leaves["opt_state/0/mu/blocks/1/up/kernel"]
        assert mu.spec == up.spec and mu.per_device == up.per_device
        assert leaves["step"].dtype == "uint32" and report.compiles["optimizer_init"] == 1
        params = sum(x.nbytes for p, x in leaves.items() if p.startswith("params/blocks/"))
        assert report.modules(1)["blocks"][2] == 2 * params  # mu and nu, attributed


@needs_8
@pytest.mark.parametrize("problem", ["uncovered", "unused_rule", "bad_spec"])
@pytest.mark.parametrize("optimizer", [None, "adamw"])
def test_problems_carry_the_message_materialize_raises(problem, optimizer):
    rules = {"uncovered": [r for r in RULES if r[0] != "batch_stats/**"],
             "unused_rule": RULES + [("blocks/*/nothere/kernel", P())],
             "bad_spec": [("head/kernel", P("model", None))] + RULES}[problem]
    mesh = jax.make_mesh((8,), ("model",))
    args = (*ARGS[:2], 60) if problem == "bad_spec" else ARGS  # vocab 60: 8 does not divide
    with pytest.raises(ValueError) as raised:
        if optimizer is None:
            flaxlazy.materialize(GPT, *args, rngs=nnx.Rngs(0), mesh=mesh, partition_rules=rules)
        else:
            flaxlazy.init_train_state(GPT, optax.adamw(1e-3), *args, rngs=nnx.Rngs(0),
                                      mesh=mesh, partition_rules=rules)
    report = flaxlazy.inspect(GPT, *args, rngs=nnx.Rngs(0), mesh=mesh.abstract_mesh,
                              partition_rules=rules, optimizer=optimizer)
    assert report.problems[0] == (problem, str(raised.value))
    if problem == "uncovered":
        assert "'batch_stats/blocks/0/bn/mean'" in raised.value.args[0]
        marked = [leaf for leaf in report.leaves if leaf.mark == "!"]
        assert {leaf.path.split("/")[0] for leaf in marked} == {"batch_stats"}
        assert all(leaf.per_device == leaf.nbytes for leaf in marked)


def test_without_a_mesh_dtype_what_if_and_arguments():
    report = flaxlazy.inspect(Stacked, 3, 16, rngs=nnx.Rngs(0), optimizer="sgd", dtype="bf16")
    leaves = {leaf.path: leaf for leaf in report.leaves}
    assert leaves["params/layers/linear/kernel"].shape == (3, 16, 16)
    assert leaves["params/layers/linear/kernel"].dtype == "bfloat16"
    assert leaves["RngCount/layers/drop/rngs/count"].dtype == "uint32"  # not cast
    assert report.mesh is None and report.inputs == () and report.optimizer == "sgd"
    assert report.compiles["optimizer_init"] == 1
    made = flaxlazy.abstract_init(Stacked, 3, 16, rngs=nnx.Rngs(0))
    assert report.collections()["params"][1] == sum(
        x.size for x in jax.tree.leaves(nnx.state(made, nnx.Param)))
    partial = flaxlazy.inspect(functools.partial(Stacked, 3), 16, rngs=nnx.Rngs(0))
    assert partial.model == "Stacked" and len(partial.leaves) == 6


class Reseeding(nnx.Module):
    """Leaves the caller's stream with a key computed from its root: materialize compiles
    one function to update the caller's nnx.Rngs."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        rngs.default.key.set_value(jax.random.split(rngs.default.key.get_value())[0])


@pytest.mark.parametrize("ctor", [Reseeding, Stacked])
def test_compile_count_with_the_rngs_update(warm, ctor):
    args = (3, 16) if ctor is Stacked else ()
    report = flaxlazy.inspect(ctor, *args, rngs=nnx.Rngs(0))
    assert report.compiles.get("rngs_update", 0) == (ctor is Reseeding)
    rngs = nnx.Rngs(0)
    flaxlazy.clear_caches()
    with count_compiles() as compiles:
        jax.block_until_ready(nnx.state(flaxlazy.materialize(ctor, *args, rngs=rngs)))
    assert report.compiles_total == compiles.count
    if ctor is Reseeding:
        assert "compile 2 (1 initializers, 1 nnx.Rngs update)" in str(report)


def test_errors():
    with pytest.raises(TypeError, match=r"inspect: `method` is an option of Linen's "
                                        r"Module.init and means nothing for an NNX constructor"):
        flaxlazy.inspect(GPT, *ARGS, rngs=nnx.Rngs(0), method="encode")
    with pytest.raises(TypeError, match=r"inspect: `module` must be .* got an already "
                                        r"constructed NNX module \(Linear\)"):
        flaxlazy.inspect(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"inspect: `partition_rules` need a `mesh=`"):
        flaxlazy.inspect(GPT, *ARGS, rngs=nnx.Rngs(0), partition_rules=RULES)
    with pytest.raises(TypeError, match=r"inspect: .*returned an array of shape \(2,\), not an "
                                        r"nnx.Module"):
        flaxlazy.inspect(lambda rngs: jax.numpy.zeros(2), rngs=nnx.Rngs(0))


@needs_8
def test_command_inspects_an_nnx_class_and_a_factory(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["inspect", f"{FACTORIES}:GPT", "--arg", "2", "--arg", "64", "--arg", "256",
            "--kwarg", "heads=4", "--kwarg", "context=64", "--mesh", "data=2,model=4",
            "--rules", "GPT_RULES",
            "--optimizer", "adamw", "--json"]
    assert cli.main(argv) == 0
    by_class = json.loads(capsys.readouterr().out)
    assert by_class["model"] == "GPT" and by_class["problems"] == []

    factories = cli.load_module(str(ROOT / FACTORIES), "TARGET")  # the same, through Python
    report = flaxlazy.inspect(factories.GPT, 2, 64, 256, heads=4, context=64, rngs=nnx.Rngs(0),
                              mesh={"data": 2, "model": 4}, partition_rules=factories.GPT_RULES,
                              optimizer="adamw")
    assert by_class["per_device"] == report.per_device
    assert by_class["leaves"] == json.loads(report.to_json())["leaves"]

    assert cli.main(["inspect", f"{FACTORIES}:gpt_tiny", "--mesh", "data=2,model=4",
                     "--rules", "GPT_RULES", "--optimizer", "adamw", "--json"]) == 0
    by_factory = json.loads(capsys.readouterr().out)
    assert by_factory["leaves"] == by_class["leaves"]
    assert by_factory["target"] == f"{FACTORIES}:gpt_tiny"

    # --arg/--kwarg replace and update what the factory gives; --rngs names streams.
    assert cli.main(["inspect", f"{FACTORIES}:gpt_tiny", "--arg", "1", "--arg", "64",
                     "--arg", "256", "--kwarg", "heads=2", "--rngs", "params,dropout"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"GPT ({FACTORIES}:gpt_tiny)\n") and "blocks/1/" not in text
    assert "truncated_normal (params stream)" in text


@pytest.mark.parametrize("argv, message", [
    ([f"{FACTORIES}:GPT", "--arg", "2"],
     "missing 2 required positional arguments: 'd' and 'vocab'"),
    ([f"{FACTORIES}:GPT", "--input", "f32[2,8]"],
     "--input gives a Linen module its inputs; pass an NNX constructor its arguments with "
     "--arg/--kwarg"),
    ([f"{FACTORIES}:llama_tiny", "--arg", "2"],
     "--arg/--kwarg pass an NNX constructor its arguments; TARGET "),
    ([f"{FACTORIES}:GPT", "--kwarg", "heads"], "--kwarg 'heads': expected NAME=VALUE"),
    ([f"{FACTORIES}:GPT", "--kwarg", "2x=4"], "--kwarg '2x=4': '2x' is not a keyword name"),
    ([f"{FACTORIES}:GPT", "--arg", "2", "--arg", "64", "--arg", "256", "--method", "f"],
     "`method` is an option of Linen's Module.init"),
    (["{built}:model"], "gives an NNX module already constructed (Linear): its arrays are "
                        "allocated. Name its class"),
    (["{built}:Linear"], "missing 2 required positional arguments: 'in_features' and "
                         "'out_features' (no arguments were given: pass --arg VALUE"),
    (["{built}:not_nnx", "--arg", "2"], "gives a int; expected a flax.linen.Module"),
])
def test_nnx_usage_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    (tmp_path / "built.py").write_text(
        "from flax import nnx\nfrom flax.nnx import Linear\n"
        "def model():\n    return nnx.Linear(2, 3, rngs=nnx.Rngs(0))\n"
        "def not_nnx():\n    return 3\n")
    argv = [a.format(built=tmp_path / "built.py") for a in argv]
    monkeypatch.chdir(ROOT)
    assert cli.main(["inspect", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flaxlazy: error: ") and err.count("\n") == 1, err
    assert message in err


@needs_8
def test_allocates_nothing():
    rngs = nnx.Rngs(0)
    flaxlazy.inspect(Stacked, 2, 8, rngs=rngs)  # a process's first NNX trace keeps a constant
    gc.collect()
    before = len(jax.live_arrays())
    report = flaxlazy.inspect(GPT, *ARGS, rngs=rngs, mesh={"model": 8}, partition_rules=RULES,
                              optimizer="adamw", dtype="bf16")
    gc.collect()
    assert len(jax.live_arrays()) == before
    assert report.devices == 8 and report.dtype == "bfloat16"
    assert int(rngs.default.count.get_value()) == 0  # the caller's nnx.Rngs is untouched
