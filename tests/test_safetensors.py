"""from_safetensors: Hugging Face checkpoints read into Linen and NNX models, into shards."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import pathlib
import re
import struct
import sys
import time
import warnings

import chex
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import flaxlazy
from flaxlazy._src import paths
from flaxlazy._src import rules as rules_lib
from flaxlazy._src.sources.from_safetensors import files
from flaxlazy._src.sources.from_safetensors import shards

ROOT = pathlib.Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flax dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


example = _load("examples/load_pretrained.py", "examples_load_pretrained")
factories = _load("examples/factories.py", "examples_factories")

CFG = example.Config(vocab=64, d_model=64, layers=2, heads=8, kv_heads=4, hidden=48)
HD = CFG.d_model // CFG.heads
KEY = jax.random.key(0)
TOKENS = flaxlazy.spec("i32[2,8]")


class ScanBlock(factories.Block):
    def __call__(self, x, _):
        return super().__call__(x), None


class ScannedLlama(nn.Module):
    """factories.Llama with its blocks stacked by ``nn.scan`` (``layers/...``)."""

    cfg: example.Config

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        x = nn.Embed(c.vocab, c.d_model, name="embed_tokens")(tokens)
        stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=c.layers)
        x, _ = stack(c.heads, c.kv_heads, c.hidden, name="layers")(x, None)
        x = nn.RMSNorm(name="norm")(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)


def linen_llama(cfg=CFG):
    return factories.Llama(cfg.vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.kv_heads,
                           cfg.hidden)


def expected(tensors, cfg, dtype, *, stacked=False, nnx_names=False):
    """The parameters a Llama-layout checkpoint should give, by path inside params,
    computed here from the stored tensors with NumPy (independently of flaxlazy)."""
    d, h, kv = cfg.d_model, cfg.heads, cfg.kv_heads
    layer = {
        "self_attn/q_proj/kernel": ("self_attn.q_proj.weight", lambda x: x.T.reshape(d, h, HD)),
        "self_attn/k_proj/kernel": ("self_attn.k_proj.weight", lambda x: x.T.reshape(d, kv, HD)),
        "self_attn/v_proj/kernel": ("self_attn.v_proj.weight", lambda x: x.T.reshape(d, kv, HD)),
        "self_attn/o_proj/kernel": ("self_attn.o_proj.weight", lambda x: x.T.reshape(h, HD, d)),
        "mlp/gate/kernel": ("mlp.gate_proj.weight", lambda x: x.T),
        "mlp/up/kernel": ("mlp.up_proj.weight", lambda x: x.T),
        "mlp/down/kernel": ("mlp.down_proj.weight", lambda x: x.T),
        "input_norm/scale": ("input_layernorm.weight", lambda x: x),
        "post_attention_norm/scale": ("post_attention_layernorm.weight", lambda x: x),
    }
    out = {"embed_tokens/embedding": tensors["model.embed_tokens.weight"],
           "norm/scale": tensors["model.norm.weight"]}
    if not (cfg.tied and nnx_names):
        out["lm_head/kernel"] = tensors.get("lm_head.weight",
                                            tensors["model.embed_tokens.weight"]).T
    for name, (key, fn) in layer.items():
        values = [fn(tensors[f"model.layers.{i}.{key}"]) for i in range(cfg.layers)]
        if stacked:
            out[f"layers/{name}"] = np.stack(values)
        else:
            for i, v in enumerate(values):
                out[f"layers/{i}/{name}" if nnx_names else f"layers_{i}/{name}"] = v
    return {k: np.asarray(v).astype(dtype) for k, v in out.items()}


def params_of(result):
    """``{path inside params: numpy array}`` of a Linen variables dict or an NNX module."""
    if isinstance(result, nnx.Module):
        return {"/".join(map(str, p)): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(nnx.state(result, nnx.Param))}
    return {k: np.asarray(v) for k, v in paths.flatten(result["params"])[0]}


def shardings_of(result):
    if isinstance(result, nnx.Module):
        return {"/".join(map(str, p)): v.get_value().sharding
                for p, v in nnx.to_flat_state(nnx.state(result, nnx.Param))}
    return {k: v.sharding for k, v in paths.flatten(result["params"])[0]}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Hugging Face-layout Llama checkpoints: f32 untied over 3 shards with an index,
    bf16 tied in one file."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, cfg, dtype, n_files in [("f32", CFG, np.float32, 3),
                                     ("bf16_tied", CFG._replace(tied=True), BF16, 1)]:
        tensors = example.hf_llama_tensors(cfg, dtype, seed=len(out))
        example.write_hf(root / name, tensors, n_files, cfg.to_hf())
        out[name] = (root / name, tensors, cfg)
    return out


def mesh24():
    return jax.make_mesh((2, 4), ("data", "model"))


# Rules of every shape: FSDP x tensor parallel, a split head_dim (boxes that cut the
# reshaped axis), a split layer axis, and replication.
LINEN_RULES = factories.LLAMA_RULES
ODD_RULES = [
    ("layers_*/self_attn/q_proj/kernel", P(None, None, "model")),  # head_dim 8 over 4
    ("layers_*/self_attn/o_proj/kernel", P("data", "model", None)),
    ("layers_*/mlp/*/kernel", P("model", "data")),
    ("lm_head/kernel", P(None, ("data", "model"))),
    ("**", P()),
]
SCANNED_RULES = [
    ("layers/self_attn/q_proj/kernel", P("data", None, "model", None)),  # the layer axis
    ("layers/self_attn/o_proj/kernel", P(None, "model", None, "data")),
    ("layers/mlp/up/kernel", P(None, "data", "model")),
    ("embed_tokens/embedding", P("model", "data")),
    ("**", P()),
]


def _check(result, want, mesh=None, rules=None):
    chex.assert_trees_all_equal(params_of(result), want)  # bit for bit, dtypes included
    if mesh is not None:
        normalized = rules_lib.normalize(rules, what="partition_rules")
        for path, sharding in shardings_of(result).items():
            rule = rules_lib.first_match(normalized, path, "params/" + path)
            assert sharding.mesh.shape == mesh.shape, path
            assert sharding.spec == rule.value, (path, sharding.spec, rule.value)


@pytest.mark.parametrize("name", ["f32", "bf16_tied"])
@pytest.mark.parametrize("layout", ["one_device", "fsdp_tp", "odd"])
def test_linen_llama_values_and_shardings(ckpts, name, layout):
    path, tensors, cfg = ckpts[name]
    if layout != "one_device" and jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    rules = {"one_device": None, "fsdp_tp": LINEN_RULES, "odd": ODD_RULES}[layout]
    mesh = mesh24() if rules else None
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    got = flaxlazy.materialize(linen_llama(cfg), KEY, TOKENS, initializers={"**": src},
                               **({"mesh": mesh, "partition_rules": rules} if mesh else {}))
    _check(got, expected(tensors, cfg, np.float32), mesh, rules)


@needs_8
def test_linen_scanned_layers_stack_from_layer_keys(ckpts):
    path, tensors, cfg = ckpts["f32"]
    mesh = mesh24()
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    got = flaxlazy.materialize(ScannedLlama(cfg), KEY, TOKENS, initializers={"**": src},
                               mesh=mesh, partition_rules=SCANNED_RULES)
    _check(got, expected(tensors, cfg, np.float32, stacked=True), mesh, SCANNED_RULES)


@needs_8
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name, dtype", [("bf16_tied", BF16), ("f32", BF16)],
                         ids=["bf16", "f32_cast_to_bf16"])
def test_nnx_llama_values_and_shardings(ckpts, scan, name, dtype):
    path, tensors, cfg = ckpts[name]
    mesh = mesh24()
    rules = example.partition_rules(scan, cfg.tied)
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    model = flaxlazy.materialize(example.Llama, cfg, param_dtype=dtype, scan=scan,
                                 rngs=nnx.Rngs(0), mesh=mesh, partition_rules=rules,
                                 initializers={"**": src})
    want = expected(tensors, cfg, dtype, stacked=scan, nnx_names=True)
    _check(model, want, mesh, rules)


def test_nnx_on_one_device_and_a_new_head(ckpts):
    path, tensors, cfg = ckpts["f32"]
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True,
                                    unused=[r"lm_head\.weight"])
    model = flaxlazy.materialize(example.Llama, cfg, rngs=nnx.Rngs(0), initializers={
        "lm_head/**": nnx.initializers.zeros, "**": src})
    want = expected(tensors, cfg, np.float32, nnx_names=True)
    want["lm_head/kernel"] = np.zeros_like(want["lm_head/kernel"])
    _check(model, want)


def test_leaves_not_matched_keep_their_own_initializer(ckpts):
    path, tensors, cfg = ckpts["f32"]
    model = linen_llama(cfg)
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=False)
    got = flaxlazy.materialize(model, KEY, TOKENS, initializers={"layers_*/mlp/**": src})
    own = jax.jit(model.init)(KEY, np.zeros((2, 8), np.int32))
    want = expected(tensors, cfg, np.float32)
    for path_, value in params_of(got).items():
        if "/mlp/" in path_:
            np.testing.assert_array_equal(value, want[path_])
        else:
            node = own["params"]
            for part in path_.split("/"):
                node = node[part]
            np.testing.assert_array_equal(value, np.asarray(node), err_msg=path_)


def _gpt2_tensors(layers, d, vocab, context, seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, np.float32)

    t = {"wte.weight": w(vocab, d), "wpe.weight": w(context, d), "ln_f.weight": w(d),
         "ln_f.bias": w(d)}
    for i in range(layers):
        p = f"h.{i}."
        t |= {p + "ln_1.weight": w(d), p + "ln_1.bias": w(d), p + "ln_2.weight": w(d),
              p + "ln_2.bias": w(d), p + "attn.c_attn.weight": w(d, 3 * d),
              p + "attn.c_attn.bias": w(3 * d), p + "attn.c_proj.weight": w(d, d),
              p + "attn.c_proj.bias": w(d), p + "mlp.c_fc.weight": w(d, 4 * d),
              p + "mlp.c_fc.bias": w(4 * d), p + "mlp.c_proj.weight": w(4 * d, d),
              p + "mlp.c_proj.bias": w(d), p + "attn.bias": np.tril(np.ones((1, 1, 4, 4),
                                                                              np.float32))}
    return t


def test_gpt2_layout_into_the_nnx_gpt(tmp_path):
    layers, d, vocab, heads, context = 2, 32, 64, 4, 16
    t = _gpt2_tensors(layers, d, vocab, context)
    save_file({("transformer." + k): v for k, v in t.items()},
              str(tmp_path / "model.safetensors"))
    src = flaxlazy.from_safetensors(tmp_path, rename=flaxlazy.GPT2_HF, strict=True,
                                    unused=[r".*attn\.(masked_)?bias"])
    model = flaxlazy.materialize(factories.GPT, layers, d, vocab, heads=heads,
                                 context=context, rngs=nnx.Rngs(0), initializers={"**": src})
    hd = d // heads
    want = {"embed/embedding": t["wte.weight"], "pos/embedding": t["wpe.weight"],
            "ln/scale": t["ln_f.weight"], "ln/bias": t["ln_f.bias"],
            "head/kernel": t["wte.weight"].T}
    for i in range(layers):
        p, b = f"h.{i}.", f"blocks/{i}/"
        qkv, qkv_b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]
        for j, name in enumerate(["query", "key", "value"]):
            want[b + f"attn/{name}/kernel"] = qkv[:, j * d:(j + 1) * d].reshape(d, heads, hd)
            want[b + f"attn/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
        want |= {b + "attn/out/kernel": t[p + "attn.c_proj.weight"].reshape(heads, hd, d),
                 b + "attn/out/bias": t[p + "attn.c_proj.bias"],
                 b + "up/kernel": t[p + "mlp.c_fc.weight"], b + "up/bias": t[p + "mlp.c_fc.bias"],
                 b + "down/kernel": t[p + "mlp.c_proj.weight"],
                 b + "down/bias": t[p + "mlp.c_proj.bias"]}
        for n in (1, 2):
            want[b + f"ln{n}/scale"] = t[p + f"ln_{n}.weight"]
            want[b + f"ln{n}/bias"] = t[p + f"ln_{n}.bias"]
    chex.assert_trees_all_equal(params_of(model), want)


@needs_8
def test_a_sharded_tensor_is_never_read_whole(ckpts, monkeypatch):
    path, tensors, cfg = ckpts["f32"]
    reads = []
    read = shards._read

    def counting(opened, tensor, steps, shape, box):
        out = read(opened, tensor, steps, shape, box)
        reads.append((tensor.key, out.size))
        return out

    monkeypatch.setattr(shards, "_read", counting)
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    flaxlazy.materialize(linen_llama(cfg), KEY, TOKENS, initializers={"**": src},
                         mesh=mesh24(), partition_rules=LINEN_RULES)
    by_key: dict[str, list[int]] = {}
    for key, size in reads:
        by_key.setdefault(key, []).append(size)
    assert set(by_key) == set(tensors)
    for key, sizes in by_key.items():
        size = tensors[key].size
        if key.endswith("norm.weight") or "layernorm" in key:  # replicated: read once
            assert sizes == [size], key
        else:  # sharded 8 ways (embedding, kernels): 8 reads of an eighth each
            assert sizes == [size // 8] * 8, (key, sizes)


def test_inspect_shows_each_key_and_transform(ckpts):
    path, _, cfg = ckpts["bf16_tied"]
    src = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    report = flaxlazy.inspect(example.Llama, cfg, scan=True, rngs=nnx.Rngs(0),
                              initializers={"**": src})
    init = {leaf.path: leaf.init for leaf in report.leaves}
    assert init["params/layers/self_attn/q_proj/kernel"] == (
        "safetensors model.layers.{0..1}.self_attn.q_proj.weight T,reshape bf16->f32")
    assert init["params/embed_tokens/embedding"] == (
        "safetensors model.embed_tokens.weight bf16->f32")
    assert "safetensors model.layers.{0..1}.mlp.up_proj.weight T" in str(report)


# Unused tensors.


@pytest.fixture
def extra(tmp_path, ckpts):
    """The f32 checkpoint and one tensor more, in a shard of its own (and the index)."""
    path, tensors, cfg = ckpts["f32"]
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)},
              str(tmp_path / "extra.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, cfg


def _llama_with(src, cfg=CFG, model=None):
    return flaxlazy.materialize(model or linen_llama(cfg), KEY, TOKENS,
                                initializers={"**": src})


def test_unused_tensors_warn_raise_or_are_expected(extra):
    path, cfg = extra
    unused = r"1 checkpoint tensor not used by the model: 'model\.layers\.0\.self_attn\." \
             r"rotary_emb\.inv_freq'\. .* name them in `unused=`"
    with pytest.warns(UserWarning, match=unused):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF), cfg)
    with pytest.raises(ValueError, match=unused):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True,
                                              unused=[r".*rotary_emb\.inv_freq"]), cfg)
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=False),
                    cfg)


# Errors, each before any tensor data is read.


@pytest.fixture
def no_reads(monkeypatch):
    def fail(*args):
        raise AssertionError("tensor data was read before the checks")

    monkeypatch.setattr(shards, "_read", fail)


def test_missing_key_names_path_key_and_closest(ckpts, no_reads):
    path, _, cfg = ckpts["f32"]
    rename = [(r"layers_(\d+)/mlp/gate/kernel", r"model.layers.\1.mlp.gate.weight", "T"),
              *flaxlazy.LLAMA_HF]
    with pytest.raises(ValueError, match=(
            r"'params/layers_0/mlp/gate/kernel' \(float32\[64,48\]\) maps to "
            r"'model\.layers\.0\.mlp\.gate\.weight', which the checkpoint does not have\. "
            r"Closest keys: 'model\.layers\.0\.mlp\.gate_proj\.weight'.* Check `rename\[0\]`")):
        _llama_with(flaxlazy.from_safetensors(path, rename=rename), cfg)


def test_no_rule_looks_up_the_path_itself(ckpts, no_reads):
    path, _, cfg = ckpts["f32"]
    with pytest.raises(ValueError, match=(
            r"'params/embed_tokens/embedding' \(float32\[64,64\]\) maps to "
            r"'embed_tokens\.embedding', which .* Closest keys: 'model\.embed_tokens\.weight'"
            r".*No `rename` rule matches 'embed_tokens/embedding'")):
        _llama_with(flaxlazy.from_safetensors(path), cfg)


def test_wrong_shape_after_the_transform_is_named(ckpts, no_reads):
    path, _, cfg = ckpts["f32"]
    rename = [(r"layers_(\d+)/mlp/up/kernel", r"model.layers.\1.mlp.up_proj.weight"),
              *flaxlazy.LLAMA_HF]
    with pytest.raises(ValueError, match=(
            r"'params/layers_0/mlp/up/kernel' is float32\[64,48\] in the model, but checkpoint "
            r"key 'model\.layers\.0\.mlp\.up_proj\.weight' is F32\[48, 64\]\. Check the "
            r"transform of `rename\[0\]` .* \(the reverse: add 'T'\?\)")):
        _llama_with(flaxlazy.from_safetensors(path, rename=rename), cfg)
    rename = [(r"layers_(\d+)/self_attn/k_proj/kernel", r"model.layers.\1.self_attn.k_proj.weight",
               "T")]
    with pytest.raises(ValueError, match=r"is F32\[32, 64\]; after 'T' it is \[64, 32\]"):
        _llama_with(flaxlazy.from_safetensors(path, rename=rename + list(flaxlazy.LLAMA_HF)),
                    cfg)


def test_stack_deeper_than_the_checkpoint(ckpts, no_reads):
    path, _, cfg = ckpts["f32"]
    with pytest.raises(ValueError, match=(
            r"'params/layers/input_norm/scale' \(float32\[3,64\]\) stacks 3 layers on axis 0 "
            r"from 'model\.layers\.\{layer\}\.input_layernorm\.weight', but the checkpoint has "
            r"no 'model\.layers\.2\.input_layernorm\.weight' \(layer 2\); it has layers 0 to 1")):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF),
                    model=ScannedLlama(cfg._replace(layers=3)))


def _copy_ckpt(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_shard_is_one_error_naming_the_file(ckpts, tmp_path, no_reads):
    path = _copy_ckpt(ckpts["f32"][0], tmp_path)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ValueError, match=(
            rf"from_safetensors: '{re.escape(str(shard))}' is damaged: it is truncated: its "
            r"header indexes [\d,]+ bytes of tensor data, and [\d,]+ follow the header")):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF))


def _write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12),
     r"its header says 'w' is F32\[4\], 16 bytes, but gives it the 12 bytes \[0, 12\)"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12),
     r"its header places 'v' at bytes \[4, 12\), which overlaps the tensor before it"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12),
     r"4 bytes after its last tensor are indexed by no header entry"),
    ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), r"header entry 'w' is"),
    (["w"], b"", r"its header is a JSON list, not an object"),
])
def test_lying_header_is_one_error_naming_the_file(tmp_path, header, data, match):
    file = _write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(file))}' is damaged: {match}"):
        files.read_header(str(file))


def test_header_length_and_json_damage(tmp_path):
    file = tmp_path / "a.safetensors"
    file.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match=r"is damaged: its first 8 bytes give a header of "
                                         r"1,000 bytes, but only 2 bytes follow them"):
        files.read_header(str(file))
    file.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(ValueError, match=r"is damaged: its header is not JSON"):
        files.read_header(str(file))
    file.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"is damaged: it has 3 bytes, fewer than the 8"):
        files.read_header(str(file))


def test_missing_shard_is_one_error_naming_it(ckpts, tmp_path, no_reads):
    path = _copy_ckpt(ckpts["f32"][0], tmp_path)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=(
            r"the shard '.*model-00003-of-00003\.safetensors', which "
            r"'.*model\.safetensors\.index\.json' names for \d+ tensor\(s\), is missing")):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF))


def test_index_naming_a_tensor_its_shard_lacks(ckpts, tmp_path, no_reads):
    path = _copy_ckpt(ckpts["f32"][0], tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=(
            r"index\.json' is damaged: it maps 'model\.norm\.weight' to "
            r"'model-00001-of-00003\.safetensors', whose header has no such tensor")):
        _llama_with(flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF))


def test_paths_that_hold_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nowhere' does not exist\. Pass a \.safetensors"):
        files.open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"holds no \.safetensors file and no"):
        files.open_checkpoint(str(tmp_path))


def test_a_dtype_it_cannot_read_is_named(tmp_path, no_reads):
    _write_raw(tmp_path / "model.safetensors",
               {"kernel": {"dtype": "F4", "shape": [6, 2], "data_offsets": [0, 6]},
                "bias": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}, bytes(14))
    with pytest.raises(ValueError, match=r"'kernel' in '.*model\.safetensors' has dtype 'F4', "
                                         r"which flaxlazy does not read"):
        flaxlazy.materialize(nn.Dense(2), KEY, flaxlazy.spec("f32[1,6]"),
                             initializers={"**": flaxlazy.from_safetensors(tmp_path)})


def test_a_checkpoint_of_this_model_needs_no_rules(tmp_path):
    model = nn.Sequential([nn.Dense(3), nn.Dense(2)])
    x = flaxlazy.spec("f32[1,4]")
    values = jax.jit(model.init)(jax.random.key(3), np.zeros((1, 4), np.float32))
    flat = {k.replace("/", "."): np.asarray(v).astype(BF16)
            for k, v in paths.flatten(values["params"])[0]}
    save_file(flat, str(tmp_path / "model.safetensors"))
    got = flaxlazy.materialize(model, KEY, x, initializers={
        "**": flaxlazy.from_safetensors(tmp_path / "model.safetensors", strict=True)})
    chex.assert_trees_all_equal(
        params_of(got), {k.replace(".", "/"): v.astype(np.float32) for k, v in flat.items()})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"path": 3}, TypeError, r"`path` must be a \.safetensors file"),
    ({"strict": "yes"}, TypeError, r"`strict` must be None"),
    ({"rename": "a"}, TypeError, r"`rename` must be a list of \(regex, key\)"),
    ({"rename": {"a": "b"}}, TypeError, r"for a dict, pass list\(rename\.items\(\)\)"),
    ({"rename": ("a", "b")}, TypeError, r"Maybe you wrote rename=\(regex, key\)"),
    ({"rename": [("a(", "b")]}, ValueError, r"`rename\[0\]`: the regex 'a\(' does not compile"),
    ({"rename": [("a", r"\2")]}, ValueError, r"the key '\\\\2' does not fit the regex 'a'"),
    ({"rename": [("a", "b", "T,squash")]}, ValueError,
     r"'squash' in the transform 'T,squash' is not a step\. Steps: T, transpose"),
    ({"rename": [("a", "b", "split(1,3)")]}, ValueError, r"step 'split\(1,3\)' needs \(axis"),
    ({"rename": [("a", "b", "stack(0)")]}, ValueError, r"'stack\(axis\)' places the layer axis"),
    ({"rename": [("a", ("b.{layer}", "c"))]}, ValueError, r"either every key alternative"),
    ({"unused": "lm_head"}, TypeError, r"for one, write \['lm_head'\]"),
    ({"unused": ["a("]}, ValueError, r"`unused\[0\]`: the regex 'a\(' does not compile"),
])
def test_argument_errors_name_the_argument(kwargs, error, match):
    kwargs = {"path": "ckpt", **kwargs}
    with pytest.raises(error, match=match):
        flaxlazy.from_safetensors(kwargs.pop("path"), **kwargs)


class Odd(nn.Module):
    """Parameters laid out as no Hugging Face model is: a layer axis in the middle."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.zeros, (4, 3, 5))  # (in, layer, out)
        v = self.param("v", nn.initializers.zeros, (2, 8))
        return x @ w.reshape(4, 15) + v.sum()


def test_explicit_steps_and_a_layer_axis_in_the_middle(tmp_path):
    rng = np.random.default_rng(1)
    t = {f"w.{i}": rng.standard_normal((5, 4), np.float32) for i in range(3)}
    t["v"] = rng.standard_normal((2, 4, 2), np.float32)  # (a, b, c) -> v = (c, a*b)
    save_file(t, str(tmp_path / "model.safetensors"))
    src = flaxlazy.from_safetensors(tmp_path, strict=True, rename=[
        ("w", "w.{layer}", "stack(1), transpose(1,0)"),
        ("v", "v", "transpose(2,0,1), reshape(2,-1)"),
    ])
    got = flaxlazy.materialize(Odd(), KEY, flaxlazy.spec("f32[1,4]"), initializers={"**": src})
    chex.assert_trees_all_equal(params_of(got), {
        "w": np.stack([t[f"w.{i}"].T for i in range(3)], axis=1),
        "v": t["v"].transpose(2, 0, 1).reshape(2, 8)})
    if jax.device_count() >= 8:  # the layer axis (3) replicated, its other axes split
        mesh = jax.make_mesh((2, 4), ("a", "b"))
        got = flaxlazy.materialize(Odd(), KEY, flaxlazy.spec("f32[1,4]"), initializers={
            "**": src}, mesh=mesh, partition_rules=[("w", P("a", None, None)),
                                                    ("v", P("a", "b"))])
        chex.assert_trees_all_equal(params_of(got)["v"],
                                    t["v"].transpose(2, 0, 1).reshape(2, 8))
        chex.assert_trees_all_equal(params_of(got)["w"],
                                    np.stack([t[f"w.{i}"].T for i in range(3)], axis=1))


def test_a_reshape_that_would_copy_the_tensor_is_refused(tmp_path, no_reads):
    save_file({"v": np.zeros((2, 4, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    src = flaxlazy.from_safetensors(tmp_path, rename=[("v", "v", "transpose(1,0,2),reshape")])
    with pytest.raises(ValueError, match=r"after 'transpose\(1,0,2\),reshape' it fails: "
                                         r"reshape of \[4, 2, 2\] merges axes"):
        flaxlazy.materialize(Odd(), KEY, flaxlazy.spec("f32[1,4]"), initializers={
            "v": src, "w": nn.initializers.zeros})


@needs_8
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_example_quick_loads_what_the_naive_loop_loads(tmp_path, scan, capsys):
    results = example.main(["--quick", "--path", str(tmp_path / "{config}"),
                            *(["--scan"] if scan else [])])
    assert results["max_logit_diff"] == 0.0
    assert results["params"] == 106_816
    out = capsys.readouterr().out
    assert "wrote a Hugging Face-layout checkpoint" in out
    assert "model.safetensors.index.json" in out


def test_inspect_command_checks_weights_from_headers_alone(tmp_path, capsys, no_reads):
    from flaxlazy._src import cli

    tiny = example.Config(256, 64, 2, 8, 4, 128)  # factories.llama_tiny's sizes
    example.write_hf(tmp_path, example.hf_llama_tensors(tiny, BF16), 2)
    target = str(ROOT / "examples" / "factories.py") + ":llama_tiny"
    assert cli.main(["inspect", target, "--weights", str(tmp_path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "safetensors lm_head.weight T bf16->f32" in out
    assert re.search(r"weights +.*: 21 tensors, 208\.6 KiB in 2 file\(s\); headers checked, no "
                     r"tensor read\. The load maps at most 64\.0 KiB", out), out
    assert cli.main(["inspect", target, "--weights", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"]["tensors"] == 21
    # A layout that does not fit: one line naming the leaf, the key and both shapes.
    assert cli.main(["inspect", target, "--weights", str(tmp_path), "--rename", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert "'params/embed_tokens/embedding' (float32[256,64]) maps to 'embed_tokens." in err
    assert len(err.strip().splitlines()) == 1, err
    assert cli.main(["inspect", target, "--rename", "gpt2"]) == 2
    assert "--rename needs --weights" in capsys.readouterr().err


def test_two_sources_on_one_checkpoint_share_what_they_use(ckpts):
    path, tensors, cfg = ckpts["f32"]
    mlp = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF, strict=True)
    rest = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # together they read every tensor: nothing to report
        got = flaxlazy.materialize(linen_llama(cfg), KEY, TOKENS,
                                   initializers={"layers_*/mlp/**": mlp, "**": rest})
    _check(got, expected(tensors, cfg, np.float32))
    with pytest.raises(ValueError, match=r"1 checkpoint tensor not used by the model: "
                                         r"'lm_head\.weight'"):  # the strictest decides
        flaxlazy.materialize(linen_llama(cfg), KEY, TOKENS, initializers={
            "lm_head/**": nn.initializers.zeros, "layers_*/mlp/**": mlp, "**": rest})


def test_no_parameter_lives_in_the_file_mapping(tmp_path):
    """jax.device_put aliases an aligned, contiguous host array rather than copying it:
    a box handed over as a view of the mapped file would make the parameter live in the
    file's pages (and change with the file). After a load nothing of the file is mapped."""
    kernel = np.arange(4096, dtype=np.float32).reshape(64, 64)
    header = {"kernel": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]},
              "bias": {"dtype": "F32", "shape": [64], "data_offsets": [16384, 16640]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 4096)  # the tensors start page-aligned in the file
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + kernel.tobytes()
                     + np.ones(64, np.float32).tobytes())
    got = flaxlazy.materialize(nn.Dense(64), KEY, flaxlazy.spec("f32[1,64]"),
                               initializers={"**": flaxlazy.from_safetensors(file)})
    jax.block_until_ready(got)
    for _ in range(100):  # a copy in flight holds its view a moment after it lands
        gc.collect()
        with open("/proc/self/maps") as f:
            mapped = [line for line in f if str(file) in line]
        if not mapped:
            break
        time.sleep(0.02)
    assert not mapped, mapped
    chex.assert_trees_all_equal(params_of(got), {"kernel": kernel, "bias": np.ones(64, np.float32)})
