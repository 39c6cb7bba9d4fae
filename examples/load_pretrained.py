"""Load a Hugging Face Llama checkpoint (safetensors shards) straight into its shards.

Pretrained weights usually come as a Hugging Face directory: ``*.safetensors`` shards with
a ``model.safetensors.index.json``, named and laid out for PyTorch
(``model.layers.3.self_attn.q_proj.weight``, ``[out, in]``). Here one value in
``initializers=``, ``flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF)``, reads
them into an NNX Llama on a ``data`` x ``model`` mesh of 8 devices: each device's shard
of each parameter is copied out of the memory-mapped file, transposed and reshaped on the
way (``q_proj.weight [heads*head_dim, d]`` into a ``(d, heads, head_dim)`` kernel), so no
sharded tensor is ever whole on the host. Every key and shape is checked against the
files' headers before any data is read.

The script writes (once) a small Llama-style checkpoint in that layout with the
``safetensors`` package, sharded over several files with an index, then loads it, checks
every parameter and a forward pass against the same weights loaded naively (the NNX model
zoos' way: each tensor read whole with ``get_tensor``, transposed and reshaped on the
host, then ``device_put``), and prints the load times. ``--scan`` stacks the layers with
``nnx.vmap`` (one parameter per weight, its layer ``i`` read from
``model.layers.{i}...``); ``--path`` loads a real Llama/Qwen directory (its
``config.json`` gives the sizes).

On a CPU-only machine the script simulates 8 devices by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported.

Run it from the repository root::

    pip install -e ".[examples]"
    python examples/load_pretrained.py           # a 34M-parameter checkpoint (how long: README)
    python examples/load_pretrained.py --scan    # the same, layers stacked
    python examples/load_pretrained.py --quick   # a tiny one (CI smoke test)
    python examples/load_pretrained.py --path ~/models/Llama-3.2-1B   # a real one
"""

# ruff: noqa: E402
# (imports below the XLA_FLAGS set-up: jax reads the flag once, when imported)

from __future__ import annotations

import os
import sys

NUM_DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"

# Must happen before jax is imported: simulate 8 CPU devices unless told otherwise.
if "jax" not in sys.modules and _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={NUM_DEVICES}".strip()

import argparse
import json
import math
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy


class Config(NamedTuple):
    """A Llama's sizes, as Hugging Face's ``config.json`` names them in comments."""

    vocab: int  # vocab_size
    d_model: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    hidden: int  # intermediate_size
    tied: bool = False  # tie_word_embeddings
    eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0  # rope_theta

    @classmethod
    def from_hf(cls, path: pathlib.Path) -> Config:
        c = json.loads((path / "config.json").read_text())
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                   c["num_attention_heads"], c.get("num_key_value_heads",
                                                   c["num_attention_heads"]),
                   c["intermediate_size"], bool(c.get("tie_word_embeddings", False)),
                   c.get("rms_norm_eps", 1e-5), c.get("rope_theta", 10000.0))

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": self.vocab, "hidden_size": self.d_model,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "intermediate_size": self.hidden,
                "tie_word_embeddings": self.tied, "rms_norm_eps": self.eps,
                "rope_theta": self.rope_theta}


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embeddings, Hugging Face's rotate-half form: ``x [b, t, heads, hd]``."""
    t, hd = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None].astype(x.dtype)
    half = jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + half * sin


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, cfg: Config, *, dtype: Any, rngs: nnx.Rngs):
        hd = cfg.d_model // cfg.heads
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.q_proj = nnx.LinearGeneral(cfg.d_model, (cfg.heads, hd), **kw)
        self.k_proj = nnx.LinearGeneral(cfg.d_model, (cfg.kv_heads, hd), **kw)
        self.v_proj = nnx.LinearGeneral(cfg.d_model, (cfg.kv_heads, hd), **kw)
        self.o_proj = nnx.LinearGeneral((cfg.heads, hd), cfg.d_model, axis=(-2, -1), **kw)
        self.theta = cfg.rope_theta

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k = rope(self.q_proj(x), self.theta), rope(self.k_proj(x), self.theta)
        y = jax.nn.dot_product_attention(q, k, self.v_proj(x), is_causal=True)
        return self.o_proj(y)


class Block(nnx.Module):
    """One pre-norm decoder block: RMSNorm, attention, RMSNorm, SwiGLU."""

    def __init__(self, cfg: Config, *, dtype: Any, rngs: nnx.Rngs):
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        norm = {"epsilon": cfg.eps, "dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.input_norm = nnx.RMSNorm(cfg.d_model, **norm)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_norm = nnx.RMSNorm(cfg.d_model, **norm)
        self.mlp = nnx.Dict(gate=nnx.Linear(cfg.d_model, cfg.hidden, **kw),
                            up=nnx.Linear(cfg.d_model, cfg.hidden, **kw),
                            down=nnx.Linear(cfg.hidden, cfg.d_model, **kw))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_norm(x))
        h = self.post_attention_norm(x)
        mlp = self.mlp
        return x + mlp["down"](nnx.silu(mlp["gate"](h)) * mlp["up"](h))


class Llama(nnx.Module):
    """A Llama (2/3-style) decoder in NNX, named as the Linen Llama of
    ``examples/factories.py`` (``flaxlazy.LLAMA_HF`` reads Hugging Face weights into
    either). ``scan=True`` stacks the blocks with ``nnx.vmap`` and runs them with
    ``nnx.scan``."""

    def __init__(self, cfg: Config, *, param_dtype: Any = jnp.float32, scan: bool = False,
                 rngs: nnx.Rngs):
        dtype = param_dtype
        self.embed_tokens = nnx.Embed(cfg.vocab, cfg.d_model, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        if scan:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(cfg, dtype=dtype, rngs=rngs)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs)
                                    for _ in range(cfg.layers)])
        self.scan = scan
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.eps, dtype=dtype, param_dtype=dtype,
                                rngs=rngs)
        self.lm_head = None if cfg.tied else nnx.Linear(
            cfg.d_model, cfg.vocab, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x, block):
                return block(x)

            x = run(x, self.layers)
        else:
            for block in self.layers:
                x = block(x)
        x = self.norm(x)
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)


def partition_rules(scan: bool, tied: bool = False) -> list[tuple[str, P]]:
    """FSDP over ``data``, Megatron-style tensor parallelism over ``model`` (paths inside
    ``params``: ``layers/0/self_attn/q_proj/kernel``; stacked: ``layers/self_attn/...``,
    its layer axis first and not split). A tied model has no ``lm_head``."""
    layer = (None,) if scan else ()
    return [
        ("embed_tokens/embedding", P("model", "data")),  # (vocab, d)
        ("**/self_attn/o_proj/kernel", P(*layer, "model", None, "data")),  # (h, hd, d)
        ("**/self_attn/*_proj/kernel", P(*layer, "data", "model", None)),  # (d, h, hd)
        ("**/mlp/down/kernel", P(*layer, "model", "data")),  # (hidden, d)
        ("**/mlp/*/kernel", P(*layer, "data", "model")),  # gate, up: (d, hidden)
        *([] if tied else [("lm_head/kernel", P("data", "model"))]),  # (d, vocab)
        ("**/scale", P()),  # RMSNorm scales: replicated
    ]


def hf_llama_tensors(cfg: Config, dtype: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face's Llama layout: PyTorch names, ``[out, in]``."""
    rng = np.random.default_rng(seed)
    hd = cfg.d_model // cfg.heads

    def weight(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(cfg.d_model, np.float32)).astype(dtype)

    out = {"model.embed_tokens.weight": weight(cfg.vocab, cfg.d_model)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm()
        out[p + "self_attn.q_proj.weight"] = weight(cfg.heads * hd, cfg.d_model)
        out[p + "self_attn.k_proj.weight"] = weight(cfg.kv_heads * hd, cfg.d_model)
        out[p + "self_attn.v_proj.weight"] = weight(cfg.kv_heads * hd, cfg.d_model)
        out[p + "self_attn.o_proj.weight"] = weight(cfg.d_model, cfg.heads * hd)
        out[p + "post_attention_layernorm.weight"] = norm()
        out[p + "mlp.gate_proj.weight"] = weight(cfg.hidden, cfg.d_model)
        out[p + "mlp.up_proj.weight"] = weight(cfg.hidden, cfg.d_model)
        out[p + "mlp.down_proj.weight"] = weight(cfg.d_model, cfg.hidden)
    out["model.norm.weight"] = norm()
    if not cfg.tied:
        out["lm_head.weight"] = weight(cfg.vocab, cfg.d_model)
    return out


def write_hf(path: pathlib.Path, tensors: dict[str, np.ndarray], shards: int,
             config: dict[str, Any] | None = None) -> None:
    """Writes ``tensors`` as Hugging Face does: ``model-0000i-of-0000n.safetensors``
    shards of about equal size and a ``model.safetensors.index.json`` (one shard: a
    plain ``model.safetensors``), plus ``config.json``."""
    from safetensors.numpy import save_file  # the format's reference writer

    path.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    total = sum(t.nbytes for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for key in keys:
        groups[min(shards - 1, done * shards // max(total, 1))].append(key)
        done += tensors[key].nbytes
    groups = [g for g in groups if g]
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        save_file({k: tensors[k] for k in group}, str(path / name), metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, g in zip(names, groups, strict=True) for k in g}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))


# The NNX model zoos' way, for comparison: a hand-written table of regexes over the
# checkpoint's keys, each tensor read whole, transformed on the host, then device_put.
def _naive_transform(path: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if re.search(r"(proj|gate|up|down|lm_head)/kernel$", path):
        x = x.T
    return x.reshape(shape)


def load_naively(path: pathlib.Path, abstract: Any, dtype: Any) -> Any:
    """Every parameter read whole with ``safe_open(...).get_tensor``, transformed on the
    host and placed with ``jax.device_put`` (``abstract``: the module from
    ``flaxlazy.abstract_init``, its leaves carrying their shardings)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    where = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            where.update({k: file for k in f.keys()})  # noqa: SIM118 - not a dict
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    values = {}
    for key_path, var in flat.items():
        name = "/".join(str(k) for k in key_path)
        target = var.get_value() if hasattr(var, "get_value") else var.value
        stacked = name.startswith("layers/") and not name.split("/")[1].isdigit()
        per_layer = target.shape[1:] if stacked else target.shape
        layers = range(target.shape[0]) if stacked else [None]
        parts = []
        for i in layers:
            key = _naive_key(name if i is None else name.replace("layers/", f"layers/{i}/", 1))
            if key not in where:  # a tied checkpoint: the head is the embedding
                key = "model.embed_tokens.weight"
            with safe_open(str(where[key]), framework="numpy") as f:
                parts.append(_naive_transform(name, f.get_tensor(key), per_layer))
        x = np.stack(parts) if stacked else parts[0]
        values[key_path] = jax.device_put(x.astype(dtype), target.sharding)
    for key_path, var in flat.items():
        var.set_value(values[key_path]) if hasattr(var, "set_value") else setattr(
            var, "value", values[key_path])
    return nnx.merge(graphdef, state)


def _naive_key(name: str) -> str:
    name = name.replace("input_norm", "input_layernorm").replace(
        "post_attention_norm", "post_attention_layernorm")
    name = re.sub(r"mlp/(gate|up|down)/", r"mlp/\1_proj/", name)
    name = re.sub(r"/(kernel|scale|embedding)$", "/weight", name)
    name = "model/" + name if not name.startswith("lm_head") else name
    return name.replace("/", ".")


SIZES = {  # vocab, d_model, layers, heads, kv_heads, hidden
    "default": Config(8192, 512, 8, 8, 4, 1536),
    "quick": Config(256, 64, 2, 8, 4, 128),
}
SIZE_HELP = {"vocab": "vocabulary", "d_model": "model width", "layers": "decoder blocks",
             "heads": "attention heads", "kv_heads": "key/value heads",
             "hidden": "MLP width"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # --quick changes the defaults of the size flags, so look for it first: `--help`
    # then shows the defaults that apply (try `--quick --help`).
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sizes, other_sizes = SIZES["quick" if quick else "default"], SIZES["quick"]
    for name in SIZE_HELP:
        other = "with --quick" if quick else f"--quick: {getattr(other_sizes, name)}"
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            default=getattr(sizes, name),
                            help=f"{SIZE_HELP[name]} (default: %(default)s; {other})")
    parser.add_argument("--path", default="checkpoints/load_pretrained/{config}",
                        help="the checkpoint directory: a real one is loaded as it is (its "
                             "config.json gives the sizes); else one is written there "
                             "first ({config}: the sizes) (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the checkpoint's dtype, and the model's (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=3,
                        help="files the written checkpoint is split over (default: "
                             "%(default)s)")
    parser.add_argument("--mesh", default="2,4",
                        help="mesh shape 'data,model' (default: %(default)s)")
    parser.add_argument("--scan", action="store_true",
                        help="stack the layers with nnx.vmap (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model (CI smoke test) (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        args.mesh = tuple(int(n) for n in args.mesh.split(","))
    except ValueError:
        parser.error(f"--mesh must look like '2,4' (data,model), got {args.mesh!r}")
    if len(args.mesh) != 2 or min(args.mesh) < 1:
        parser.error(f"--mesh must be two positive sizes 'data,model', got {args.mesh}")
    return args


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    n = math.prod(shape)
    devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
    if len(devices) < n:
        raise SystemExit(f"--mesh {shape} needs {n} devices, {len(devices)} are available: "
                         f"set XLA_FLAGS={_FLAG}={n} before jax is imported, or a smaller "
                         "--mesh.")
    return jax.make_mesh(shape, ("data", "model"), devices=devices[:n],
                         axis_types=(AxisType.Auto, AxisType.Auto))  # XLA picks layouts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes (once) and loads the checkpoint; returns what it measured and checked:
    ``load_seconds``, ``naive_seconds``, ``max_logit_diff`` (0.0: the same weights),
    ``params``, ``per_device_bytes``, ``seconds``."""
    start = time.perf_counter()
    args = parse_args(argv)
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[args.dtype]
    sizes = Config(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads,
                   args.hidden)
    name = f"d{sizes.d_model}-l{sizes.layers}-v{sizes.vocab}-{args.dtype}"
    path = pathlib.Path(os.path.expanduser(args.path.format(config=name)))
    if (path / "config.json").exists():
        cfg = Config.from_hf(path)
        print(f"loading {path} ({cfg.layers} layers, d {cfg.d_model})")
    else:
        cfg = sizes
        write_hf(path, hf_llama_tensors(cfg, dtype), args.shards, cfg.to_hf())
        print(f"wrote a Hugging Face-layout checkpoint to {path}: "
              f"{', '.join(sorted(p.name for p in path.iterdir()))}")

    mesh = make_mesh(args.mesh)
    rules = partition_rules(args.scan, cfg.tied)
    source = flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF,
                                       unused=[r".*rotary_emb\.inv_freq"])
    kw = {"param_dtype": dtype, "scan": args.scan, "rngs": nnx.Rngs(0), "mesh": mesh,
          "partition_rules": rules}
    report = flaxlazy.inspect(Llama, cfg, **kw, initializers={"**": source})
    for leaf in report.leaves[:4]:  # where each leaf comes from: key and transform
        print(f"  {leaf.path:44s} {leaf.init}")

    t0 = time.perf_counter()
    model = flaxlazy.materialize(Llama, cfg, **kw, initializers={"**": source})
    jax.block_until_ready(nnx.state(model))
    load_seconds = time.perf_counter() - t0
    print(f"flaxlazy.from_safetensors: {load_seconds:.2f} s, "
          f"{flaxlazy.num_params(model):,} parameters")

    t0 = time.perf_counter()  # the naive load needs the shapes and shardings too
    naive = load_naively(path, flaxlazy.abstract_init(Llama, cfg, **kw), dtype)
    jax.block_until_ready(nnx.state(naive))
    naive_seconds = time.perf_counter() - t0
    print(f"naive (read whole, transformed on the host, device_put): {naive_seconds:.2f} s")

    ours, theirs = dict(nnx.to_flat_state(nnx.state(model))), dict(
        nnx.to_flat_state(nnx.state(naive)))
    for key, var in ours.items():  # every parameter: the same values and placement
        a, b = var.get_value(), theirs[key].get_value()
        assert a.sharding == b.sharding and a.dtype == b.dtype, key
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))
    tokens = jax.random.randint(jax.random.key(1), (mesh.shape["data"], 16), 0, cfg.vocab)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
    forward = nnx.jit(lambda m, t: m(t))
    logits, reference = forward(model, tokens), forward(naive, tokens)
    diff = float(jnp.max(jnp.abs(logits.astype(jnp.float32) - reference.astype(jnp.float32))))
    print(f"forward pass: logits {logits.shape}, max difference to the naive load {diff}")
    kernel = model.layers[0].self_attn.q_proj.kernel if not args.scan else \
        model.layers.self_attn.q_proj.kernel
    print(f"a q_proj kernel {kernel.shape}: {kernel.get_value().sharding.spec}")
    results = {
        "load_seconds": load_seconds, "naive_seconds": naive_seconds,
        "max_logit_diff": diff, "params": flaxlazy.num_params(model),
        "per_device_bytes": report.per_device, "path": str(path),
        "seconds": time.perf_counter() - start,
    }
    print(f"done in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
