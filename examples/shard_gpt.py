"""Create a GPT's parameters directly in their shards on a (data, model) device mesh.

A GPT-style language model (token and position embeddings, pre-LayerNorm blocks
of causal multi-head self-attention and an MLP, a final LayerNorm and an output
head) is laid out on a 2-D mesh with Megatron-style tensor parallelism over the
``model`` axis and data parallelism over ``data``. The layout is a short list of
partition rules keyed by parameter path; no layer is told its input size.

flaxlazy first prints the whole layout with the bytes each device will hold,
without allocating anything, then creates every parameter directly in its
shards (no device ever holds a full copy of a split parameter), checks a few
shards, and runs one jitted forward pass on a token batch split over ``data``:
at initialization the loss is close to log(vocab), as it should be.

On a CPU-only machine the script simulates 8 devices by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported.
On a host with real accelerators (8 GPUs, a TPU slice) it runs unchanged on
them: the flag only affects the CPU backend, and the accelerators are used
whenever there are enough of them for the mesh.

Run it from the repository root::

    pip install -e .
    python examples/shard_gpt.py             # GPT-2 small sizes (how long: README)
    python examples/shard_gpt.py --quick     # a tiny model (CI smoke test)
    python examples/shard_gpt.py --mesh 4,2  # 4-way data x 2-way model parallelism
    python examples/shard_gpt.py --help      # layers, width, heads, vocab, sequence, batch

The default model has GPT-2 small's sizes (12 layers, width 768, 12 heads, a
50,304-token vocabulary) with an untied output head: 162M parameters, 620 MiB
in float32, of which each device of the default 2x4 mesh holds 155 MiB.
"""

# ruff: noqa: E402
# (imports below the XLA_FLAGS set-up: jax reads the flag once, when imported)

from __future__ import annotations

import os
import sys

NUM_DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"

# Must happen before jax is imported: simulate 8 CPU devices unless told otherwise.
# Harmless on GPU/TPU hosts, where it only affects the (unused) CPU backend.
if "jax" not in sys.modules and _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={NUM_DEVICES}".strip()

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy

# Megatron-style tensor parallelism over "model"; parameters are replicated over "data".
# Patterns match paths inside `params` (`*`: within a segment, `**`: any segments); the
# first rule that matches wins. Shapes in the comments: d = d_model, h = heads.
PARTITION_RULES = [
    ("wte/embedding", P("model", None)),  # (vocab, d): vocab-parallel
    ("wpe/embedding", P(None, "model")),  # (seq, d): split on the embedding dim
    # Attention: q, k, v column-parallel (whole heads per device), output row-parallel.
    ("block_*/attn/qkv/kernel", P(None, None, "model", None)),  # (d, 3, h, d/h)
    ("block_*/attn/qkv/bias", P(None, "model", None)),  # (3, h, d/h)
    ("block_*/attn/out/kernel", P("model", None, None)),  # (h, d/h, d)
    # MLP: up column-parallel, down row-parallel.
    ("block_*/mlp/up/kernel", P(None, "model")),  # (d, 4d)
    ("block_*/mlp/up/bias", P("model")),  # (4d,)
    ("block_*/mlp/down/kernel", P("model", None)),  # (4d, d)
    ("head/kernel", P(None, "model")),  # (d, vocab): vocab-parallel logits
    ("head/bias", P("model")),  # (vocab,)
    ("**", P()),  # the rest replicated: LayerNorms, biases of the row-parallel layers
]

# GPT-2's initialization, chosen by path: N(0, 0.02) weights, zero biases. (The residual
# projections' extra 1/sqrt(2 * layers) scale is applied in `materialize` below.)
INITIALIZERS = {
    "**/embedding": nn.initializers.normal(stddev=0.02),
    "**/kernel": nn.initializers.normal(stddev=0.02),
    "**/bias": nn.initializers.zeros,
}

SIZES = {  # (layers, d_model, heads, vocab, seq, batch)
    "default": (12, 768, 12, 50304, 128, 8),  # GPT-2 small, vocab padded to a multiple of 64
    "quick": (2, 64, 8, 512, 32, 8),
}
SIZE_FLAGS = ("layers", "d_model", "heads", "vocab", "seq", "batch")
SIZE_HELP = {
    "layers": "transformer blocks",
    "d_model": "model width",
    "heads": "attention heads",
    "vocab": "vocabulary size",
    "seq": "sequence length",
    "batch": "global batch (split over the data axis)",
}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask; the width comes from the input."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv")(x)  # b t 3 h dh
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        mask = nn.make_causal_mask(x[..., 0], dtype=bool)  # b 1 t t
        y = nn.dot_product_attention(q, k, v, mask=mask)  # b t h dh
        return nn.DenseGeneral(d_model, axis=(-2, -1), name="out")(y)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(4 * x.shape[-1], name="up")(x))
        return nn.Dense(x.shape[-1], name="down")(h)


class Block(nn.Module):
    """A pre-LayerNorm transformer block."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + MLP(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: tokens ``int[batch, seq]`` to logits ``[batch, seq, vocab]``."""

    vocab: int
    max_len: int
    d_model: int
    num_layers: int
    num_heads: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])
        x = nn.Embed(self.vocab, self.d_model, name="wte")(tokens)
        x = x + nn.Embed(self.max_len, self.d_model, name="wpe")(positions)
        for i in range(self.num_layers):
            x = Block(self.num_heads, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(self.vocab, name="head")(x)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # --quick changes the defaults of the size flags, so look for it first: `--help`
    # then shows the defaults that apply (try `--quick --help`).
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # `--quick` is looked for by its full name above
    )
    quick_sizes = dict(zip(SIZE_FLAGS, SIZES["quick"], strict=True))
    for name, value in zip(SIZE_FLAGS, SIZES["quick" if quick else "default"], strict=True):
        other = "with --quick" if quick else f"--quick: {quick_sizes[name]}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=value,
            help=f"{SIZE_HELP[name]} (default: %(default)s; {other})",
        )
    parser.add_argument("--mesh", default="2,4", help="mesh shape 'data,model' (8 devices)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch seed")
    parser.add_argument("--quick", action="store_true", help="a tiny model (CI smoke test)")
    args = parser.parse_args(argv)
    try:
        args.mesh = tuple(int(n) for n in args.mesh.split(","))
    except ValueError:
        parser.error(f"--mesh must look like '2,4' (data,model), got {args.mesh!r}")
    if len(args.mesh) != 2 or min(args.mesh) < 1:
        parser.error(f"--mesh must be two positive sizes 'data,model', got {args.mesh}")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.batch % args.mesh[0]:
        parser.error(f"--batch {args.batch} is not divisible by the data axis ({args.mesh[0]})")
    return args


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh on the default devices, else on (simulated) CPU devices."""
    n = math.prod(shape)
    devices = jax.devices()
    if len(devices) < n:
        devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(
            f"--mesh {shape} needs {n} devices but only {len(devices)} are available. On a "
            f"CPU, set XLA_FLAGS={_FLAG}={n} before jax is imported (this script does so "
            "when it imports jax itself), or pick a smaller --mesh."
        )
    return jax.make_mesh(
        shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices[:n]
    )


def planned_bytes(shapes: Any, device: jax.Device) -> int:
    """The bytes ``device`` will hold for a tree of sharded ``ShapeDtypeStruct``s."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(shapes)
        if device in x.sharding.device_set
    )


def addressable_bytes(tree: Any, device: jax.Device) -> int:
    """The bytes of the shards of ``tree`` that live on ``device`` (measured, not planned)."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Lays the model out on the mesh, materializes it in shards and runs a forward pass.

    Args:
      argv: command-line arguments (without the program name); `None` reads `sys.argv`.

    Returns:
      `num_params`, `total_bytes`, `per_device_bytes` (the plan's largest per-device
      load), `measured_device_bytes` (bytes of parameter shards on one local device),
      `loss` (mean next-token cross-entropy at initialization), `log_vocab`,
      `logits_shape`, `mesh` and the wall times `materialize_seconds`, `seconds`.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    mesh = make_mesh(args.mesh)
    model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads)
    key = jax.random.key(args.seed)
    tokens_spec = flaxlazy.spec(f"i32[{args.batch},{args.seq}]")
    platform = mesh.devices.flat[0].platform.upper()
    print(f"mesh {dict(mesh.shape)} on {mesh.size} {platform} devices")

    # 1. The layout, free: shapes and shardings only, nothing computed or allocated.
    shapes = flaxlazy.abstract_init(
        model, key, tokens_spec, mesh=mesh, partition_rules=PARTITION_RULES
    )
    print(flaxlazy.summary(shapes))
    total_bytes = flaxlazy.nbytes(shapes)
    per_device_bytes = max(planned_bytes(shapes, device) for device in mesh.devices.flat)

    # 2. Real parameters, created directly in their shards. GPT-2 scales the residual
    # projections by 1/sqrt(2 * layers); an initializer keyed by path does it.
    residual = nn.initializers.normal(stddev=0.02 / math.sqrt(2 * args.layers))
    initializers = {"block_*/attn/out/kernel": residual, "block_*/mlp/down/kernel": residual}
    initializers.update(INITIALIZERS)
    t0 = time.perf_counter()
    variables = flaxlazy.materialize(
        model,
        key,
        tokens_spec,
        mesh=mesh,
        partition_rules=PARTITION_RULES,
        initializers=initializers,
    )
    params = jax.block_until_ready(variables["params"])
    materialize_seconds = time.perf_counter() - t0
    print(
        f"\nmaterialized {flaxlazy.num_params(params):,} parameters in "
        f"{materialize_seconds:.1f} s; a few of them:"
    )

    # 3. Each leaf has the planned sharding, and each device holds a shard, not a copy.
    planned = flaxlazy.shardings(shapes, mesh, partition_rules=PARTITION_RULES)
    for path in (
        "wte/embedding",
        "block_0/attn/qkv/kernel",
        "block_0/attn/out/kernel",
        "block_0/mlp/down/kernel",
        "block_0/ln_1/scale",
        "head/kernel",
    ):
        node, expected = params, planned["params"]
        for part in path.split("/"):
            node, expected = node[part], expected[part]
        assert node.sharding.is_equivalent_to(expected, node.ndim), (path, node.sharding)
        shard_shapes = {tuple(s.data.shape) for s in node.addressable_shards}
        assert shard_shapes == {expected.shard_shape(node.shape)}, (path, shard_shapes)
        print(
            f"  {path:26} {str(node.shape):18} spec {str(tuple(node.sharding.spec)):28} "
            f"shard {shard_shapes.pop()} on each of {len(node.addressable_shards)} devices"
        )
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    measured = addressable_bytes(params, device)
    print(
        f"parameter bytes on {device}: {measured / 2**20:.1f} MiB of {total_bytes / 2**20:.1f} MiB"
    )

    # 4. The parameters are ordinary sharded jax.Arrays: a jitted forward pass on a
    # token batch split over "data" (tensor-parallel collectives are inserted by XLA).
    tokens = jax.random.randint(jax.random.key(args.seed + 1), tokens_spec.shape, 0, args.vocab)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))

    @jax.jit
    def forward(params, tokens):
        logits = model.apply({"params": params}, tokens)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return logits, loss.mean()

    logits, loss = forward(params, tokens)
    loss = float(loss)
    print(
        f"logits {logits.dtype}{list(logits.shape)}, spec {tuple(logits.sharding.spec)}; "
        f"next-token loss at init {loss:.4f} (log(vocab) = {math.log(args.vocab):.4f})"
    )

    results = {
        "num_params": int(flaxlazy.num_params(params)),
        "total_bytes": int(total_bytes),
        "per_device_bytes": int(per_device_bytes),
        "measured_device_bytes": int(measured),
        "loss": loss,
        "log_vocab": math.log(args.vocab),
        "logits_shape": tuple(logits.shape),
        "mesh": dict(mesh.shape),
        "materialize_seconds": materialize_seconds,
        "seconds": time.perf_counter() - start,
    }
    print(f"done in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
