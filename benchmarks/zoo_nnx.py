"""The NNX half of the benchmark zoo: Flax NNX models, built by their constructors.

An NNX model has no ``init``: its constructor draws the parameters. Each factory returns
an :class:`NnxModel`, the constructor and its arguments without ``rngs``;
:meth:`NnxModel.call` adds a fresh ``nnx.Rngs`` so that every method starts from the
same stream state, as ``nnx.jit(lambda: GPT(..., rngs=nnx.Rngs(0)))()`` does.

Models (``zoo.MODELS`` holds them too, under the same names):

* ``nnx_gpt12`` / ``nnx_gpt48``: the narrow GPT of the Linen zoo (vocab 1000, d 256,
  4 heads, 128 positions, Flax default initializers) as an NNX module: blocks in an
  ``nnx.List``, ``nnx.MultiHeadAttention(decode=False)``, LayerNorms, a GELU MLP,
  ``nnx.Embed`` for tokens and positions and an untied ``nnx.Linear`` head.
* ``nnx_gpt_scan48``: the same 48 layers as one stacked ``Block``, built under
  ``nnx.vmap`` over ``nnx.split_rngs`` and run by ``nnx.scan`` (Flax's scan-over-layers
  guide): each parameter has a leading layer axis, each layer its own split key.
* ``nnx_gpt2_medium``: GPT-2 medium sized: 24 layers, d 1024, 16 heads, vocab 50257,
  1024 positions, N(0, 0.02) weights, head tied to the token embedding (355M
  parameters, as the Linen ``gpt2_medium``).
* ``nnx_llama7b``: Llama-2-7B sized (32 layers, d 4096, SwiGLU 11008, 32 heads,
  RMSNorm, vocab 32000, untied head, no biases): for ``abstract_init`` only.

No sharding annotations anywhere, so neither the eager nor the ``nnx.jit`` reference
needs Flax's ``always_shard_variable`` flag.

Examples:
  >>> import flaxlazy
  >>> from flax import nnx
  >>> m = MODELS["nnx_gpt12"]()
  >>> args, kwargs = m.call()
  >>> abstract = flaxlazy.abstract_init(m.ctor, *args, **kwargs)
  >>> flaxlazy.num_params(nnx.state(abstract, nnx.Param))
  10022400
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_embed_init
from flax.nnx.nn.linear import default_kernel_init


class NnxModel(NamedTuple):
    """One NNX benchmark model.

    Attributes:
      ctor: the NNX module class.
      args: its positional arguments (Python values).
      kwargs: its keyword arguments, without ``rngs``.
      note: a one-line description for tables.
    """

    ctor: Callable[..., nnx.Module]
    args: tuple
    kwargs: dict[str, Any]
    note: str

    def call(self, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of one constructor call, with a fresh ``nnx.Rngs(seed)``."""
        return self.args, {**self.kwargs, "rngs": nnx.Rngs(seed)}

    def build(self, seed: int = 0) -> nnx.Module:
        """The constructor called eagerly (or under a transform, when called in one)."""
        args, kwargs = self.call(seed)
        return self.ctor(*args, **kwargs)


# --------------------------------------------------------------------------
# GPT (GPT-2 style: pre-LayerNorm blocks)


class Block(nnx.Module):
    """Pre-LayerNorm block: causal self-attention, then a GELU MLP of width 4 x d."""

    def __init__(self, d_model: int, n_heads: int, *, kernel_init: Callable, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            n_heads, d_model, kernel_init=kernel_init, decode=False, rngs=rngs
        )
        self.ln_2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.c_fc = nnx.Linear(d_model, 4 * d_model, kernel_init=kernel_init, rngs=rngs)
        self.mlp_proj = nnx.Linear(4 * d_model, d_model, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)))
        return x + self.mlp_proj(nnx.gelu(self.c_fc(self.ln_2(x))))


class GPT(nnx.Module):
    """GPT-2 style transformer: ``n_layers`` blocks in an ``nnx.List``, or one stacked
    block (``scan=True``).

    With ``tied=True`` the head is the token embedding (``wte.attend``), as in GPT-2;
    otherwise an ``nnx.Linear`` without bias. With ``scan=True`` the blocks are one
    stacked ``Block`` instead, built under ``nnx.vmap`` with the keys split per layer
    (``nnx.split_rngs``) and run by ``nnx.scan``, as Flax's scan-over-layers guide does.
    """

    def __init__(
        self, n_layers: int, d_model: int, vocab: int, *, n_heads: int, max_len: int,
        tied: bool = False, kernel_init: Callable = default_kernel_init,
        embed_init: Callable = default_embed_init, scan: bool = False, rngs: nnx.Rngs,
    ):
        self.wte = nnx.Embed(vocab, d_model, embedding_init=embed_init, rngs=rngs)
        self.wpe = nnx.Embed(max_len, d_model, embedding_init=embed_init, rngs=rngs)
        self.scan = scan
        if scan:
            @nnx.split_rngs(splits=n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(rngs):
                return Block(d_model, n_heads, kernel_init=kernel_init, rngs=rngs)

            self.h = stack(rngs)
        else:
            self.h = nnx.List([
                Block(d_model, n_heads, kernel_init=kernel_init, rngs=rngs)
                for _ in range(n_layers)
            ])
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = None if tied else nnx.Linear(
            d_model, vocab, use_bias=False, kernel_init=kernel_init, rngs=rngs
        )

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def forward(x, block):
                return block(x)

            x = forward(x, self.h)
        else:
            for block in self.h:
                x = block(x)
        x = self.ln_f(x)
        return self.wte.attend(x) if self.head is None else self.head(x)


def narrow_gpt(n_layers: int, scan: bool = False) -> NnxModel:
    """The Linen zoo's narrow GPT as an NNX module (untied head)."""
    how = "stacked by nnx.vmap (split keys), run by nnx.scan" if scan else "in an nnx.List"
    return NnxModel(
        GPT, (n_layers, 256, 1000), {"n_heads": 4, "max_len": 128, "scan": scan},
        f"NNX narrow GPT: {n_layers} layers {how}, d 256, 4 heads, vocab 1000",
    )


def gpt2_medium() -> NnxModel:
    init = nnx.initializers.normal(0.02)
    return NnxModel(
        GPT, (24, 1024, 50257),
        {"n_heads": 16, "max_len": 1024, "tied": True, "kernel_init": init, "embed_init": init},
        "NNX GPT-2 medium: 24 layers, d 1024, 16 heads, vocab 50257, tied head",
    )


# --------------------------------------------------------------------------
# Llama-2 sized (abstract init only)


def rope(x, base: float = 10000.0):
    """Rotary position embedding over axis -3 (time) of ``[..., t, heads, d]`` (also
    used by zoo.py's Linen Llama)."""
    t, d = x.shape[-3], x.shape[-1]
    freqs = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


class LlamaAttention(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        hd = d_model // n_heads
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.q_proj = linear(d_model, n_heads * hd)
        self.k_proj = linear(d_model, n_kv_heads * hd)
        self.v_proj = linear(d_model, n_kv_heads * hd)
        self.o_proj = linear(n_heads * hd, d_model)

    def __call__(self, x):
        b, t, c = x.shape
        hd = c // self.n_heads
        q = rope(self.q_proj(x).reshape(b, t, self.n_heads, hd))
        k = rope(self.k_proj(x).reshape(b, t, self.n_kv_heads, hd))
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, hd)
        rep = self.n_heads // self.n_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        mask = nnx.make_causal_mask(jnp.ones((b, t), jnp.int32))
        y = nnx.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(y.reshape(b, t, c))


class LlamaBlock(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, mlp_dim: int, *,
                 rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.input_layernorm = nnx.RMSNorm(d_model, rngs=rngs)
        self.self_attn = LlamaAttention(d_model, n_heads, n_kv_heads, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(d_model, rngs=rngs)
        self.gate_proj = linear(d_model, mlp_dim)
        self.up_proj = linear(d_model, mlp_dim)
        self.down_proj = linear(mlp_dim, d_model)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(nnx.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nnx.Module):
    def __init__(self, n_layers: int, d_model: int, vocab: int, *, n_heads: int,
                 n_kv_heads: int, mlp_dim: int, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(vocab, d_model, rngs=rngs)
        self.layers = nnx.List([
            LlamaBlock(d_model, n_heads, n_kv_heads, mlp_dim, rngs=rngs) for _ in range(n_layers)
        ])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.lm_head = nnx.Linear(d_model, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama7b() -> NnxModel:
    return NnxModel(
        Llama, (32, 4096, 32000), {"n_heads": 32, "n_kv_heads": 32, "mlp_dim": 11008},
        "NNX Llama-2-7B sized: 32 layers, d 4096, MLP 11008, 32 heads, vocab 32000",
    )


MODELS: dict[str, Callable[[], NnxModel]] = {
    "nnx_gpt12": functools.partial(narrow_gpt, 12),
    "nnx_gpt48": functools.partial(narrow_gpt, 48),
    "nnx_gpt_scan48": functools.partial(narrow_gpt, 48, True),
    "nnx_gpt2_medium": gpt2_medium,
    "nnx_llama7b": llama7b,
}

