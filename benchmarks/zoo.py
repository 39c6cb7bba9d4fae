"""The benchmark model zoo: Flax Linen models people actually initialize.

Each factory returns a :class:`Model`: the (unbound) module, the input specs of its
``init`` call and the keyword arguments to pass along. The benchmark builds concrete
zero inputs from the specs where a method needs them (eager and jitted ``module.init``).

Models:

* ``mlp``: the D2L MLP (Dense 256, relu, Dense 10) on a batch of MNIST images.
* ``resnet50``: ResNet-50 (bottleneck blocks, BatchNorm), one 224x224 image.
* ``gpt2_small`` / ``gpt2_medium``: GPT-2 sized transformers (tied embeddings, 1024
  positions, N(0, 0.02) weights as in GPT-2), one sequence of 128 tokens.
* ``gpt12`` / ``gpt24`` / ``gpt48``: the narrow GPT of the fast-materializer issue
  (vocab 1000, d_model 256, 4 heads, seq 128, batch 8, Flax default initializers),
  12/24/48 blocks in a plain Python loop (not ``nn.scan``).
* ``gpt2_2l``: 2 layers at GPT-2's real widths (d 768, vocab 50257): embeddings dominate.
* ``gpt_jit``: the narrow GPT, 12 blocks each an ``nn.jit(GPTBlock)``.
* ``gpt_remat12`` / ``gpt_remat48``: the narrow GPT, 12/48 blocks each an
  ``nn.remat(GPTBlock)``, in a Python loop.
* ``gpt_scan48``: the narrow GPT, 48 blocks stacked by ``nn.scan`` (params on axis 0,
  one params key split per layer).
* ``many_leaves``: 500 x (``Dense(4)``, ``LayerNorm``) in a chain, 2,000 leaves: per-leaf
  overhead.
* ``llama7b`` / ``llama70b``: Llama-2 sized (RMSNorm, SwiGLU MLP, rotary attention with
  grouped KV heads, untied head), meant for abstract init only.
* ``nnx_*``: the NNX models of ``zoo_nnx.py`` (an ``NnxModel``: constructor and
  arguments, no inputs), under the same names here.

Examples:
  >>> import jax, flaxlazy
  >>> m = MODELS["mlp"]()
  >>> shapes = flaxlazy.abstract_init(m.module, jax.random.key(0), *m.inputs, **m.kwargs)
  >>> flaxlazy.num_params(shapes)
  203530
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import zoo_nnx  # the benchmarks folder is on sys.path wherever the zoo is imported


class Model(NamedTuple):
    """One benchmark model.

    Attributes:
      module: the Linen module.
      inputs: the positional inputs of ``init``, as ``jax.ShapeDtypeStruct`` specs.
      kwargs: keyword arguments of ``init`` (static Python values).
      note: a one-line description for tables.
    """

    module: nn.Module
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    kwargs: dict[str, Any]
    note: str


def _spec(shape: Sequence[int], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# --------------------------------------------------------------------------
# MLP


def mlp() -> Model:
    module = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(10)])
    return Model(module, (_spec((64, 784)),), {}, "D2L MLP 784-256-10, f32[64,784]")


# --------------------------------------------------------------------------
# ResNet-50 (as in the Flax ImageNet example)


class Bottleneck(nn.Module):
    filters: int
    strides: tuple[int, int] = (1, 1)
    conv: Callable[..., nn.Module] = nn.Conv
    norm: Callable[..., nn.Module] = nn.BatchNorm

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(x)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 1000
    num_filters: int = 64

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = Bottleneck(self.num_filters * 2**i, strides, conv=conv, norm=norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def resnet50() -> Model:
    return Model(
        ResNet(), (_spec((1, 224, 224, 3)),), {"train": False},
        "ResNet-50 with BatchNorm, f32[1,224,224,3]",
    )


# --------------------------------------------------------------------------
# GPT (GPT-2 style: pre-LayerNorm blocks, fused qkv, tied embedding head)


class CausalSelfAttention(nn.Module):
    n_heads: int
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        qkv = nn.Dense(3 * c, kernel_init=self.kernel_init, name="c_attn")(x)
        q, k, v = (z.reshape(b, t, self.n_heads, c // self.n_heads) for z in jnp.split(qkv, 3, -1))
        mask = nn.make_causal_mask(jnp.ones((b, t), jnp.int32))
        y = nn.dot_product_attention(q, k, v, mask=mask)
        return nn.Dense(c, kernel_init=self.kernel_init, name="c_proj")(y.reshape(b, t, c))


class GPTBlock(nn.Module):
    n_heads: int
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = x + CausalSelfAttention(self.n_heads, self.kernel_init, name="attn")(
            nn.LayerNorm(name="ln_1")(x)
        )
        h = nn.Dense(4 * c, kernel_init=self.kernel_init, name="c_fc")(nn.LayerNorm(name="ln_2")(x))
        return x + nn.Dense(c, kernel_init=self.kernel_init, name="mlp_proj")(nn.gelu(h))


class ScannedBlock(nn.Module):
    """A ``GPTBlock`` as an ``nn.scan`` body: ``(x, None) -> (x, None)``."""

    n_heads: int
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x, _):
        return GPTBlock(self.n_heads, self.kernel_init, name="block")(x), None


class GPT(nn.Module):
    """GPT-2 style transformer.

    ``block`` is the layer class, ``GPTBlock`` or a lifted version of it
    (``nn.jit(GPTBlock)``, ``nn.remat(GPTBlock)``), created ``n_layers`` times in a Python
    loop (``h_0``, ``h_1``, ...). With ``scan=True`` the layers are instead one
    ``nn.scan`` of ``GPTBlock`` named ``h``: each parameter gets a leading layer axis and
    each layer its own split of the params key.
    """

    vocab: int
    d_model: int
    n_heads: int
    n_layers: int
    max_len: int
    kernel_init: Callable = nn.linear.default_kernel_init
    embed_init: Callable = nn.linear.default_embed_init
    block: Callable[..., nn.Module] = GPTBlock
    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(self.vocab, self.d_model, embedding_init=self.embed_init, name="wte")
        wpe = nn.Embed(self.max_len, self.d_model, embedding_init=self.embed_init, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))
        if self.scan:
            stack = nn.scan(
                ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                length=self.n_layers,
            )
            x, _ = stack(self.n_heads, self.kernel_init, name="h")(x, None)
        else:
            for i in range(self.n_layers):
                x = self.block(self.n_heads, self.kernel_init, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


def _gpt2(n_layers: int, d_model: int, n_heads: int, label: str) -> Model:
    init = nn.initializers.normal(0.02)
    module = GPT(50257, d_model, n_heads, n_layers, 1024, kernel_init=init, embed_init=init)
    return Model(
        module, (_spec((1, 128), jnp.int32),), {},
        f"{label}: {n_layers} layers, d {d_model}, {n_heads} heads, vocab 50257, i32[1,128]",
    )


def gpt2_small() -> Model:
    return _gpt2(12, 768, 12, "GPT-2 small")


def gpt2_medium() -> Model:
    return _gpt2(24, 1024, 16, "GPT-2 medium")


def gpt2_2l() -> Model:
    return _gpt2(2, 768, 12, "GPT-2 real widths")


# Lifted versions of the narrow GPT's block ("scan" is handled by GPT itself).
LIFTED = {"jit": nn.jit(GPTBlock), "remat": nn.remat(GPTBlock)}


def narrow_gpt(n_layers: int, lift: str | None = None) -> Model:
    """The narrow GPT; ``lift``: None (plain blocks), "jit", "remat" or "scan"."""
    block = LIFTED.get(lift, GPTBlock)
    module = GPT(1000, 256, 4, n_layers, 128, block=block, scan=lift == "scan")
    how = f", nn.{lift} blocks" if lift else ""
    return Model(
        module, (_spec((8, 128), jnp.int32),), {},
        f"narrow GPT: {n_layers} layers{how}, d 256, 4 heads, vocab 1000, i32[8,128]",
    )


# --------------------------------------------------------------------------
# Many leaves: per-leaf overhead


class ManyLeaves(nn.Module):
    """``n_layers`` x (``Dense(width)``, ``LayerNorm``) in a chain: 4 leaves a layer.

    One leaf in four is random (the kernel), about the mix of a transformer. (With 2,000
    random leaves instead, 1,000 ``Dense`` layers, XLA compiles ``jax.jit(init)`` for 3.5
    minutes: its compile time grows faster than linearly in the number of draws.)
    """

    n_layers: int = 500
    width: int = 4

    @nn.compact
    def __call__(self, x):
        for _ in range(self.n_layers):
            x = nn.LayerNorm()(nn.Dense(self.width)(x))
        return x


def many_leaves() -> Model:
    return Model(
        ManyLeaves(), (_spec((1, 4)),), {},
        "500 x (Dense(4), LayerNorm) in a chain: 2,000 leaves, 500 random, f32[1,4]",
    )


# --------------------------------------------------------------------------
# Llama-2 sized (abstract init only)


class LlamaAttention(nn.Module):
    n_heads: int
    n_kv_heads: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        hd = c // self.n_heads
        dense = functools.partial(nn.DenseGeneral, use_bias=False, param_dtype=self.param_dtype)
        q = zoo_nnx.rope(dense((self.n_heads, hd), name="q_proj")(x))
        k = zoo_nnx.rope(dense((self.n_kv_heads, hd), name="k_proj")(x))
        v = dense((self.n_kv_heads, hd), name="v_proj")(x)
        rep = self.n_heads // self.n_kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        mask = nn.make_causal_mask(jnp.ones((b, t), jnp.int32))
        y = nn.dot_product_attention(q, k, v, mask=mask)
        return dense(c, axis=(-2, -1), name="o_proj")(y)


class LlamaBlock(nn.Module):
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        dense = functools.partial(nn.Dense, use_bias=False, param_dtype=self.param_dtype)
        norm = functools.partial(nn.RMSNorm, param_dtype=self.param_dtype)
        x = x + LlamaAttention(self.n_heads, self.n_kv_heads, self.param_dtype,
                               name="self_attn")(norm(name="input_layernorm")(x))
        h = norm(name="post_attention_layernorm")(x)
        gate = dense(self.mlp_dim, name="gate_proj")(h)
        up = dense(self.mlp_dim, name="up_proj")(h)
        return x + dense(c, name="down_proj")(nn.silu(gate) * up)


class Llama(nn.Module):
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        dtype = self.param_dtype
        x = nn.Embed(self.vocab, self.d_model, param_dtype=dtype, name="embed_tokens")(tokens)
        for i in range(self.n_layers):
            x = LlamaBlock(self.n_heads, self.n_kv_heads, self.mlp_dim, dtype,
                           name=f"layers_{i}")(x)
        x = nn.RMSNorm(param_dtype=dtype, name="norm")(x)
        return nn.Dense(self.vocab, use_bias=False, param_dtype=dtype, name="lm_head")(x)


def llama7b() -> Model:
    return Model(
        Llama(32000, 4096, 32, 32, 32, 11008), (_spec((1, 128), jnp.int32),), {},
        "Llama-2-7B sized: 32 layers, d 4096, MLP 11008, 32 heads, vocab 32000",
    )


def llama70b() -> Model:
    return Model(
        Llama(32000, 8192, 80, 64, 8, 28672), (_spec((1, 128), jnp.int32),), {},
        "Llama-2-70B sized: 80 layers, d 8192, MLP 28672, 64 heads / 8 kv, vocab 32000",
    )


MODELS: dict[str, Callable[[], Model | zoo_nnx.NnxModel]] = {
    "mlp": mlp,
    "resnet50": resnet50,
    "gpt2_small": gpt2_small,
    "gpt2_medium": gpt2_medium,
    "gpt12": functools.partial(narrow_gpt, 12),
    "gpt24": functools.partial(narrow_gpt, 24),
    "gpt48": functools.partial(narrow_gpt, 48),
    "gpt2_2l": gpt2_2l,
    "gpt_jit": functools.partial(narrow_gpt, 12, "jit"),
    "gpt_remat12": functools.partial(narrow_gpt, 12, "remat"),
    "gpt_remat48": functools.partial(narrow_gpt, 48, "remat"),
    "gpt_scan48": functools.partial(narrow_gpt, 48, "scan"),
    "many_leaves": many_leaves,
    "llama7b": llama7b,
    "llama70b": llama70b,
    **zoo_nnx.MODELS,
}
