"""Ready-made ``rename`` rules for the Hugging Face layouts people load most.

Each is a tuple of ``(regex, key, transform)`` rules (``from_safetensors``), written for
the models in this repository's ``examples/`` and for any model named the same way. A
block's rules come twice: for unrolled layers (Linen ``layers_3/...``, an NNX list
``layers/3/...``) and for a stacked one (``nn.scan``/``nnx.vmap``: ``layers/...``, its
layer ``i`` read from ``model.layers.{i}....``). Extend one by putting your own rules
first: ``[(r"head/kernel", "score.weight", "T"), *flaxlazy.LLAMA_HF]``.
"""

from __future__ import annotations

from collections.abc import Sequence


def _blocks(model: str, key: str, rules: Sequence[tuple]) -> list[tuple]:
    """Each rule of one block, for unrolled layers then for a stacked layer axis."""
    out = []
    for suffix, name, *transform in rules:
        out.append((rf"{model}[_/](?P<layer>\d+)/{suffix}", rf"{key}.\g<layer>.{name}",
                    *transform))
    for suffix, name, *transform in rules:
        out.append((rf"{model}/{suffix}", rf"{key}.{{layer}}.{name}", *transform))
    return out


# Llama 2/3, Mistral, Qwen2/3 (`model.layers.N.self_attn.q_proj.weight`, [out, in]), into
# the Llama of examples/factories.py: `embed_tokens`, `layers_N` (NNX: `layers/N`) with
# `self_attn/{q,k,v}_proj` DenseGeneral kernels (d, heads, head_dim), `o_proj` (heads,
# head_dim, d), `mlp/{gate,up,down}` (or `gate_proj`...) Dense kernels, `input_norm` and
# `post_attention_norm` (or the HF names) RMSNorm scales, `norm`, `lm_head` (a tied
# checkpoint, with no `lm_head.weight`, reads the embedding). Qwen2's q/k/v biases and
# Qwen3's q/k norms are read where the model has them. HF's q/k rows are ordered for its
# rotate-half rotary embedding: a model applying rotary embeddings must use the same
# convention.
LLAMA_HF: tuple[tuple, ...] = (
    ("embed_tokens/embedding", "model.embed_tokens.weight"),
    *_blocks("layers", "model.layers", [
        (r"self_attn/(?P<p>[qkv])_proj/kernel", r"self_attn.\g<p>_proj.weight", "T,reshape"),
        (r"self_attn/(?P<p>[qkv])_proj/bias", r"self_attn.\g<p>_proj.bias", "reshape"),
        (r"self_attn/o_proj/kernel", r"self_attn.o_proj.weight", "T,reshape"),
        (r"self_attn/(?P<p>[qk])_norm/scale", r"self_attn.\g<p>_norm.weight"),
        (r"mlp/(?P<p>gate|up|down)(?:_proj)?/kernel", r"mlp.\g<p>_proj.weight", "T"),
        (r"(?:input_norm|input_layernorm)/scale", "input_layernorm.weight"),
        (r"(?:post_attention_norm|post_attention_layernorm)/scale",
         "post_attention_layernorm.weight"),
    ]),
    ("norm/scale", "model.norm.weight"),
    ("lm_head/kernel", ("lm_head.weight", "model.embed_tokens.weight"), "T"),
)


def _gpt2(rule: tuple) -> tuple:
    """A GPT-2 rule whose keys may also carry ``transformer.`` (a saved GPT2LMHeadModel)."""
    pattern, key, *transform = rule
    keys = (key,) if isinstance(key, str) else key
    return (pattern, tuple(keys) + tuple(f"transformer.{k}" for k in keys), *transform)


# GPT-2 (`h.N.attn.c_attn.weight`: Conv1D, already [in, out]; q, k, v fused), into the
# NNX GPT of examples/factories.py: `embed`, `pos`, `blocks/N` with `ln1`, `attn` (an
# nnx.MultiHeadAttention: `query`/`key`/`value` kernels (d, heads, head_dim), `out`
# (heads, head_dim, d)), `ln2`, `up`, `down`; `ln`; `head` (tied: read from `wte`). Old
# GPT-2 files also hold the attention mask buffers: pass
# ``unused=[r".*attn\\.(masked_)?bias"]``.
GPT2_HF: tuple[tuple, ...] = tuple(_gpt2(rule) for rule in (
    ("embed/embedding", "wte.weight"),
    ("pos/embedding", "wpe.weight"),
    *_blocks("blocks", "h", [
        (r"ln(?P<n>[12])/scale", r"ln_\g<n>.weight"),
        (r"ln(?P<n>[12])/bias", r"ln_\g<n>.bias"),
        ("attn/query/kernel", "attn.c_attn.weight", "split(1,3,0),reshape"),
        ("attn/key/kernel", "attn.c_attn.weight", "split(1,3,1),reshape"),
        ("attn/value/kernel", "attn.c_attn.weight", "split(1,3,2),reshape"),
        ("attn/query/bias", "attn.c_attn.bias", "split(0,3,0),reshape"),
        ("attn/key/bias", "attn.c_attn.bias", "split(0,3,1),reshape"),
        ("attn/value/bias", "attn.c_attn.bias", "split(0,3,2),reshape"),
        ("attn/out/kernel", "attn.c_proj.weight", "reshape"),
        ("attn/out/bias", "attn.c_proj.bias"),
        ("up/kernel", "mlp.c_fc.weight"),
        ("up/bias", "mlp.c_fc.bias"),
        ("down/kernel", "mlp.c_proj.weight"),
        ("down/bias", "mlp.c_proj.bias"),
    ]),
    ("ln/scale", "ln_f.weight"),
    ("ln/bias", "ln_f.bias"),
    ("head/kernel", ("lm_head.weight", "wte.weight"), "T"),
))
