"""NNX models for the tests: a GPT-style stack, vmapped stacks, a Linen part via ToNNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """Attention, LayerNorm, Dropout, BatchNorm and an MLP."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.bn = nnx.BatchNorm(d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class GPT(nnx.Module):
    """Embedding, an ``nnx.List`` of blocks, a head."""

    def __init__(self, layers: int, d: int, vocab: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Layer(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


class Stacked(nnx.Module):
    """Layers built under ``nnx.vmap`` with split keys (one array per parameter)."""

    def __init__(self, layers: int, d: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Layer(d, rngs=rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)


class MLPLayer(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class TwoStacks(nnx.Module):
    """Two ``nnx.vmap`` stacks after a plain layer, as the scan-over-layers guide builds
    them: the second stack splits a key other than the stream's first, and each layer's
    second kernel folds a count other than 0 into its layer key."""

    def __init__(self, layers: int, d: int, *, rngs: nnx.Rngs):
        def stack(n):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return MLPLayer(d, rngs=rngs)

            return make(rngs)

        self.first = nnx.Linear(d, d, rngs=rngs)
        self.a = stack(layers)
        self.b = stack(layers + 1)


class Bridged(nnx.Module):
    """A Linen MLP inside NNX (``nnx.bridge.ToNNX``), shaped by a sample input."""

    def __init__(self, sample, *, rngs: nnx.Rngs):
        self.body = nnx.bridge.ToNNX(nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)]),
                                     rngs=rngs)
        nnx.bridge.lazy_init(self.body, sample)
        self.head = nnx.Linear(8, 2, rngs=rngs)


class Sharded(nnx.Module):
    """NNX sharding annotations (``nnx.with_partitioning``)."""

    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
        self.up = nnx.Linear(16, 64, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)


class Counter(nnx.Variable):
    """A custom variable type."""


class WithState(nnx.Module):
    """A parameter changed after creation, a counter, and a value from an input."""

    def __init__(self, table, *, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (4, 4)))
        self.w[...] = self.w[...] * 2.0 + 1.0
        self.calls = Counter(jnp.zeros((), jnp.int32))
        self.table = nnx.Param(jnp.asarray(table) * 3.0)


def values(module):
    """``{path: numpy array}`` of a module's state, keys as their raw data."""
    import numpy as np

    out = {}
    for path, v in nnx.to_flat_state(nnx.state(module)):
        x = v.get_value() if isinstance(v, nnx.Variable) else v
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out["/".join(map(str, path))] = np.asarray(x)
    return out


class KeepsRngs(nnx.Module):
    """Holds the caller's Rngs itself (its root keys are part of the state)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.rngs = rngs
        self.linear = nnx.Linear(3, 3, rngs=rngs)


class TwoRngs(nnx.Module):
    """Two nnx.Rngs arguments."""

    def __init__(self, first: nnx.Rngs, second: nnx.Rngs):
        self.a = nnx.Linear(2, 2, rngs=first)
        self.b = nnx.Linear(2, 2, rngs=second)
