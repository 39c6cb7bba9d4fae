"""Model factories for ``flaxlazy inspect``: will a model fit, and how is it sharded?

Each function here returns a Flax Linen module, or ``(module, inputs)``, or an NNX
constructor with its arguments, ``(GPT, args, kwargs)``, and is what ``flaxlazy inspect``
is pointed at (``FILE.py:FACTORY`` or ``package.module:FACTORY``); an NNX Module class
such as ``GPT`` can be named directly, its arguments given with ``--arg``/``--kwarg``.
Nothing is allocated: the 64-device layout of a Llama-2-7B-sized model with its AdamW
state is checked without allocating it, from the repository root::

    flaxlazy inspect examples/factories.py:llama7b --mesh data=8,model=8 \\
        --rules LLAMA_RULES --optimizer adamw --device-memory 80GiB
    flaxlazy inspect examples/factories.py:mlp --input f32[32,784]    # inputs given here
    flaxlazy inspect examples/factories.py:llama_tiny --mesh data=2,model=4 \\
        --rules LLAMA_RULES --optimizer adamw --depth 1 --json        # machine-readable
    flaxlazy inspect examples/factories.py:gpt2 --mesh data=2,model=4 \
        --rules GPT_RULES --optimizer adamw --device-memory 16GiB     # NNX
    flaxlazy inspect examples/factories.py:GPT --arg 2 --arg 64 --arg 256 \
        --kwarg heads=4 --mesh data=2,model=4 --rules GPT_RULES       # NNX class, arguments

(``--rules LLAMA_RULES`` is a name in the target's module; ``module:NAME`` or
``file.py:NAME`` name one elsewhere.) Run as a script, this file prints the same
report through the Python function, ``flaxlazy.inspect``::

    python examples/factories.py           # llama7b on data=8,model=8 with adamw
    python examples/factories.py --quick   # llama_tiny on data=2,model=4
    python examples/factories.py --help
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import flaxlazy

# FSDP over "data" and Megatron-style tensor parallelism over "model". Patterns match
# paths inside `params`; the first rule that matches wins. d = d_model, h = heads.
LLAMA_RULES = [
    ("embed_tokens/embedding", P("model", "data")),  # (vocab, d)
    ("layers_*/self_attn/q_proj/kernel", P("data", "model", None)),  # (d, h, d/h)
    ("layers_*/self_attn/k_proj/kernel", P("data", "model", None)),  # (d, kv heads, d/h)
    ("layers_*/self_attn/v_proj/kernel", P("data", "model", None)),
    ("layers_*/self_attn/o_proj/kernel", P("model", None, "data")),  # (h, d/h, d)
    ("layers_*/mlp/gate/kernel", P("data", "model")),  # (d, mlp)
    ("layers_*/mlp/up/kernel", P("data", "model")),
    ("layers_*/mlp/down/kernel", P("model", "data")),  # (mlp, d)
    ("lm_head/kernel", P("data", "model")),  # (d, vocab)
    ("**/scale", P()),  # RMSNorm scales: replicated
]

# The NNX GPT below, the same way: state paths inside `params` (`blocks/0/up/kernel`).
GPT_RULES = [
    ("embed/embedding", P("model", "data")),  # (vocab, d)
    ("pos/embedding", P(None, "data")),  # (context, d)
    ("blocks/*/attn/out/kernel", P("model", None, "data")),  # (h, d/h, d)
    ("blocks/*/attn/*/kernel", P("data", "model", None)),  # query, key, value: (d, h, d/h)
    ("blocks/*/attn/out/bias", P()),  # (d,)
    ("blocks/*/attn/*/bias", P("model", None)),  # (h, d/h)
    ("blocks/*/up/kernel", P("data", "model")),  # (d, 4d)
    ("blocks/*/up/bias", P("model")),
    ("blocks/*/down/kernel", P("model", "data")),  # (4d, d)
    ("head/kernel", P("data", "model")),  # (d, vocab)
    ("**/bias", P()),  # LayerNorm biases and scales, the down projection's bias
    ("**/scale", P()),
]


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (no rotary: shapes only matter)."""

    heads: int
    kv_heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dense = functools.partial(nn.DenseGeneral, use_bias=False)
        q = dense((self.heads, d // self.heads), name="q_proj")(x)
        k = dense((self.kv_heads, d // self.heads), name="k_proj")(x)
        v = dense((self.kv_heads, d // self.heads), name="v_proj")(x)
        k, v = (jnp.repeat(z, self.heads // self.kv_heads, axis=2) for z in (k, v))
        mask = nn.make_causal_mask(jnp.ones((b, t), jnp.int32))
        y = nn.dot_product_attention(q, k, v, mask=mask)
        return dense(d, axis=(-2, -1), name="o_proj")(y)


class MLP(nn.Module):
    """The SwiGLU feed-forward block."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.hidden, use_bias=False, name="gate")(x)
        up = nn.Dense(self.hidden, use_bias=False, name="up")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder block."""

    heads: int
    kv_heads: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.heads, self.kv_heads, name="self_attn")(
            nn.RMSNorm(name="input_norm")(x))
        return x + MLP(self.hidden, name="mlp")(nn.RMSNorm(name="post_attention_norm")(x))


class Llama(nn.Module):
    """A Llama-2-style decoder: RMSNorm, grouped-query attention, SwiGLU, untied head."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed_tokens")(tokens)
        for i in range(self.layers):
            x = Block(self.heads, self.kv_heads, self.hidden, name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="norm")(x)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


class ConvNet(nn.Module):
    """A small CNN with BatchNorm (a second collection, ``batch_stats``)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(16, (3, 3))(x)))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Layer(nn.Module):
    """One Dense + relu layer, in the (carry, x) -> (carry, y) form ``nn.scan`` takes."""

    width: int

    @nn.compact
    def __call__(self, carry, _):
        return nn.relu(nn.Dense(self.width)(carry)), None


class ScannedMLP(nn.Module):
    """Four layers stacked with ``nn.scan``: one stacked parameter per weight."""

    width: int = 32

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=4)
        x, _ = stack(self.width, name="layers")(nn.Dense(self.width)(x), None)
        return nn.Dense(10, name="head")(x)


class GPTBlock(nnx.Module):
    """One pre-norm GPT-2 block (NNX): attention, an MLP, LayerNorms, Dropout."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.down(jax.nn.gelu(self.up(self.ln2(x)))))


class GPT(nnx.Module):
    """A GPT-2-style decoder in NNX: token and position embeddings, an ``nnx.List`` of
    blocks, a final LayerNorm and an untied head."""

    def __init__(self, layers: int, d: int, vocab: int, *, heads: int = 12,
                 context: int = 1024, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(context, d, rngs=rngs)
        self.blocks = nnx.List([GPTBlock(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def mlp() -> nn.Module:
    """The quick start's MLP; its input comes from ``--input f32[32,784]``."""
    return nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(10)])


def llama7b():
    """Llama-2-7B sized: 32 layers, d 4096, 32 heads, MLP 11008, vocab 32000 (6.7B params)."""
    return Llama(32000, 4096, 32, 32, 32, 11008), (flaxlazy.spec("i32[1,128]"),)


def llama70b():
    """Llama-2-70B sized: 80 layers, d 8192, 64 heads / 8 kv, MLP 28672 (69B params)."""
    return Llama(32000, 8192, 80, 64, 8, 28672), (flaxlazy.spec("i32[1,128]"),)


def llama_tiny():
    """The 7B's shape in miniature (2 layers, d 64): the same rules fit a (2, 4) mesh."""
    return Llama(256, 64, 2, 8, 4, 128), (flaxlazy.spec("i32[2,16]"),)


def convnet():
    """A CNN with BatchNorm on one 8x8 image."""
    return ConvNet(), (flaxlazy.spec("f32[1,8,8,3]"),)


def scanned():
    """An ``nn.scan`` stack: its layers come from one compiled run of ``module.init``."""
    return ScannedMLP(), (flaxlazy.spec("f32[4,16]"),)


def gpt2():
    """GPT-2 small's shape in NNX (12 layers, d 768, vocab padded to 50304; 163M params
    with its untied head): the class and its arguments, ``flaxlazy inspect`` adds
    ``rngs=nnx.Rngs(0)``."""
    return GPT, (12, 768, 50304), {"heads": 12}


def gpt_tiny():
    """GPT-2's shape in miniature (2 layers, d 64): the same rules fit a (2, 4) mesh."""
    return GPT, (2, 64, 256), {"heads": 4, "context": 64}


MODELS = {"llama7b": llama7b, "llama70b": llama70b, "llama_tiny": llama_tiny}
DEFAULTS = {"model": "llama7b", "mesh": "data=8,model=8", "memory": "80GiB"}
QUICK = {"model": "llama_tiny", "mesh": "data=2,model=4", "memory": "1MiB"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    defaults = QUICK if quick else DEFAULTS
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def other(name):
        return "with --quick" if quick else f"--quick: {QUICK[name]}"

    parser.add_argument("--model", choices=sorted(MODELS), default=defaults["model"],
                        help=f"the factory (default: %(default)s; {other('model')})")
    parser.add_argument("--mesh", default=defaults["mesh"],
                        help=f"mesh axes, NAME=SIZE,... (default: %(default)s; {other('mesh')})")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd",
                        "adafactor", "lion"], help="the optimizer whose state is added")
    parser.add_argument("--device-memory", default=defaults["memory"],
                        help=f"one device's memory (default: %(default)s; {other('memory')})")
    parser.add_argument("--quick", action="store_true", help="the tiny model (CI smoke test)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    module, inputs = MODELS[args.model]()
    mesh = {name: int(size) for name, size in
            (axis.split("=") for axis in args.mesh.split(","))}
    report = flaxlazy.inspect(
        module, jax.eval_shape(jax.random.key, 0), *inputs, mesh=mesh,
        partition_rules=LLAMA_RULES, optimizer=args.optimizer,
        device_memory=args.device_memory,
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
