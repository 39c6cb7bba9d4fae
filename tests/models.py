"""A zoo of small but real Flax Linen models for end-to-end tests.

Every model here is something people write in practice (compact and
``setup`` modules, ``nn.Sequential``, BatchNorm, Dropout, attention with a
tied embedding head, recurrent cells, ``nn.scan`` / ``nn.vmap`` / ``nn.remat``
stacks, partitioned parameters, extra collections, ...), shrunk so that
``module.init`` compiles in a second or two on one CPU core.

Each factory returns a :class:`Case`: the module, concrete example inputs and
everything needed to call ``module.init`` / ``module.apply`` on it. The test
files derive input specs from the concrete inputs, so the models themselves
never mention ``flaxlazy``.

Most inputs and hidden layers are 8 wide with 4 outputs, so that the same
parameter shapes recur across models and compiled per-shape initializers are
reused between cases; a few cases keep odd, non-square shapes on purpose.

Examples:
  >>> case = mlp_compact()
  >>> case.name, case.args[0].shape, case.rngs
  ('mlp_compact', (2, 5), ('params',))
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Case(NamedTuple):
    """One model with example inputs.

    Attributes:
      name: test id.
      module: the (unbound) Linen module.
      args: concrete positional inputs for ``init`` (pytrees mixing arrays and
        Python values).
      kwargs: keyword inputs for ``init`` and ``apply``.
      rngs: names of the rng streams ``init`` needs (see :func:`make_rngs`).
      method: ``method=`` for ``init`` and ``apply`` (a name or a function), or
        ``None`` for ``__call__``.
      apply_args: positional inputs for ``apply``; ``None`` reuses ``args``.
      apply_rngs: names of the rng streams ``apply`` needs.
      mutable: ``mutable=`` for ``apply``.
      data_dependent: whether the initial variables depend on input *values*
        (not only shapes), so that only concrete inputs reproduce them.
    """

    name: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rngs: tuple[str, ...] = ("params",)
    method: str | Callable[..., Any] | None = None
    apply_args: tuple[Any, ...] | None = None
    apply_rngs: tuple[str, ...] = ()
    mutable: bool | str | tuple[str, ...] = False
    data_dependent: bool = False


def make_rngs(streams: tuple[str, ...], seed: int = 0) -> dict[str, jax.Array]:
    """A dict of distinct typed keys, one per rng stream name."""
    keys = jax.random.split(jax.random.key(seed), len(streams))
    return dict(zip(streams, keys, strict=True))


# Example inputs come from NumPy: building them runs no jax computation (nothing to compile).


def _normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _tokens(seed: int, shape: tuple[int, ...], vocab: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int32))


# --------------------------------------------------------------------------
# Plain feed-forward modules.


class CompactMLP(nn.Module):
    """``@nn.compact`` MLP with no input size; sows an intermediate."""

    features: tuple[int, ...] = (8, 3)

    @nn.compact
    def __call__(self, x):
        for width in self.features[:-1]:
            x = nn.relu(nn.Dense(width)(x))
            self.sow("intermediates", "hidden", x)
        return nn.Dense(self.features[-1])(x)


def mlp_compact() -> Case:
    return Case("mlp_compact", CompactMLP(), (_normal(0, (2, 5)),), {})


class Residual(nn.Module):
    """Applies a submodule it is given (not one it owns) with a skip connection."""

    inner: nn.Module

    def __call__(self, x):
        return x + nn.tanh(self.inner(x))


class SetupMLP(nn.Module):
    """``setup()``-style: a list of layers, a raw param and a submodule shared by two parents."""

    width: int = 8
    out: int = 4

    def setup(self):
        self.stem = nn.Dense(self.width)
        self.shared = nn.Dense(self.width)
        self.blocks = [Residual(self.shared), Residual(self.shared)]
        self.head = nn.Dense(self.out)
        self.temperature = self.param("temperature", nn.initializers.ones_init(), (self.out,))

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) / self.temperature


def mlp_setup() -> Case:
    return Case("mlp_setup", SetupMLP(), (_normal(1, (2, 8)),), {})


def sequential() -> Case:
    """``nn.Sequential`` with bf16 layers next to f32 ones."""
    module = nn.Sequential(
        [
            nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
            nn.LayerNorm(param_dtype=jnp.bfloat16),
            nn.relu,
            nn.Dense(8),
            nn.gelu,
            nn.Dense(4),
        ]
    )
    return Case("sequential", module, (_normal(2, (3, 8), jnp.bfloat16),), {})


class TwoTower(nn.Module):
    """Takes a dict of inputs and a tuple, i.e. arbitrary pytrees."""

    @nn.compact
    def __call__(self, batch, pair):
        image = batch["image"]
        img = nn.Dense(8, name="image_tower")(image.reshape(image.shape[0], -1))
        txt = nn.Embed(10, 8, name="text_embed")(batch["ids"]).mean(axis=1)
        gate, shift = pair
        return nn.Dense(4)(nn.tanh(img + txt) * gate + shift)


def pytree_inputs() -> Case:
    batch = {"image": _normal(4, (2, 2, 4)), "ids": _tokens(4, (2, 5), 10)}
    pair = (_normal(5, (2, 1)), _normal(6, (2, 8)))
    return Case("pytree_inputs", TwoTower(), (batch, pair), {})


# --------------------------------------------------------------------------
# BatchNorm, Dropout, keyword-only signatures, flags and keys as inputs.


class SmallCNN(nn.Module):
    """Conv + BatchNorm + pooling + Dropout, driven by a keyword-only ``train`` flag.

    ``__call__(self, x, *, train)``: ``train`` selects batch vs running statistics
    and turns dropout on. One small convolution only: XLA:CPU compile time grows
    quickly with conv channels.
    """

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


def cnn_batchnorm() -> Case:
    return Case("cnn_batchnorm", SmallCNN(), (_normal(7, (2, 8, 8, 1)),), {"train": False})


class NoiseInjection(nn.Module):
    """A PRNG key and Python flags passed as ordinary arguments.

    ``key`` is used with ``jax.random`` inside the module, ``add_noise`` is a
    Python bool in an ``if`` and ``n_steps`` a Python int in a ``for`` loop
    (both must stay static), and one Dense layer is reused ``n_steps`` times.
    """

    @nn.compact
    def __call__(self, x, key, add_noise: bool = True, n_steps: int = 2):
        if add_noise:
            x = x + 0.1 * jax.random.normal(key, x.shape, x.dtype)
        step = nn.Dense(x.shape[-1], name="step")
        for _ in range(n_steps):
            x = nn.tanh(step(x))
        return nn.Dense(4)(x)


def key_and_flags() -> Case:
    args = (_normal(11, (2, 8)), jax.random.key(42), True, 3)
    return Case("key_and_flags", NoiseInjection(), args, {})


class MultiStream(nn.Module):
    """Three rng streams: 'params', 'dropout' and a custom 'noise'.

    'noise' is used both to initialize a non-param variable (so the init result
    depends on it) and to add noise in the forward pass when training.
    """

    @nn.compact
    def __call__(self, x, *, train: bool):
        proj = self.variable(
            "state",
            "projection",
            lambda: 0.3 * jax.random.normal(self.make_rng("noise"), (x.shape[-1], 8)),
        )
        x = x @ proj.value
        if train:
            x = x + 0.05 * jax.random.normal(self.make_rng("noise"), x.shape)
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(4)(x)


def multi_rng() -> Case:
    return Case(
        "multi_rng",
        MultiStream(),
        (_normal(13, (2, 8)),),
        {"train": True},
        rngs=("params", "dropout", "noise"),
        apply_rngs=("dropout", "noise"),
    )


# --------------------------------------------------------------------------
# Attention, embeddings, tied weights.


class TinyTransformer(nn.Module):
    """Decoder-only transformer block with token and position embeddings and a tied head."""

    vocab: int = 32
    dim: int = 8
    heads: int = 2
    max_len: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool, pad_mask=None):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.dim))
        x = embed(tokens) + pos[: tokens.shape[-1]]
        mask = nn.make_causal_mask(tokens)
        if pad_mask is not None:
            mask = nn.combine_masks(mask, nn.make_attention_mask(pad_mask, pad_mask))
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, dropout_rate=self.dropout, deterministic=deterministic
        )(h, mask=mask)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.dim)(h)
        h = nn.Dense(self.dim)(nn.gelu(h))
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        x = nn.LayerNorm()(x)
        return embed.attend(x)


def transformer() -> Case:
    tokens = _tokens(14, (2, 8), 32)
    pad_mask = jnp.asarray(np.arange(8)[None, :] < np.array([[8], [5]]))
    return Case(
        "transformer",
        TinyTransformer(),
        (tokens,),
        {"deterministic": False, "pad_mask": pad_mask},
        rngs=("params", "dropout"),
        apply_rngs=("dropout",),
    )


# --------------------------------------------------------------------------
# Recurrent cells.


class LSTMClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, seq_lengths=None):
        h = nn.RNN(nn.LSTMCell(8), name="lstm")(x, seq_lengths=seq_lengths)
        return nn.Dense(4)(h[:, -1])


def lstm() -> Case:
    x = _normal(17, (2, 5, 8))
    return Case(
        "lstm", LSTMClassifier(), (x,), {"seq_lengths": jnp.asarray(np.array([5, 3], np.int32))}
    )


class GRUEncoder(nn.Module):
    """``nn.RNN(nn.GRUCell)`` returning its final carry, then a head on it."""

    @nn.compact
    def __call__(self, x):
        carry, _ = nn.RNN(nn.GRUCell(8), return_carry=True, name="gru")(x)
        return nn.Dense(4)(carry)


def gru() -> Case:
    return Case("gru", GRUEncoder(), (_normal(18, (2, 4, 8)),), {})


# --------------------------------------------------------------------------
# Lifted transforms: scan, remat, vmap.


class DropBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, carry, deterministic: bool):
        kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        h = nn.Dense(self.dim, kernel_init=kernel_init)(nn.LayerNorm()(carry))
        h = nn.Dropout(0.1)(nn.relu(h), deterministic=deterministic)
        return carry + h, None


class ScannedRematStack(nn.Module):
    """``nn.scan(nn.remat(Block))`` with dropout: the usual memory-saving layer stack.

    The blocks' kernels are boxed by ``nn.with_partitioning``; scan inserts a
    'layers' axis name into each box.
    """

    num_layers: int = 2
    dim: int = 8

    @nn.compact
    def __call__(self, x, deterministic: bool):
        x = nn.Dense(self.dim)(x)
        block = nn.remat(DropBlock, static_argnums=(2,), prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.dim, name="layers")(x, deterministic)
        return nn.Dense(4)(x)


def scan_remat() -> Case:
    return Case(
        "scan_remat",
        ScannedRematStack(),
        (_normal(20, (2, 8)),),
        {"deterministic": False},
        rngs=("params", "dropout"),
        apply_rngs=("dropout",),
    )


class ResidualBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x, deterministic: bool):
        h = nn.Dense(self.dim)(nn.LayerNorm()(x))
        h = nn.Dropout(0.1)(nn.gelu(h), deterministic=deterministic)
        return x + h


class RematMLP(nn.Module):
    """Unrolled ``nn.remat`` layers with a static Python flag."""

    dim: int = 8

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Dense(self.dim)(x)
        block = nn.remat(ResidualBlock, static_argnums=(2,))
        for i in range(2):
            x = block(self.dim, name=f"block_{i}")(x, deterministic)
        return nn.Dense(4)(x)


def remat_layers() -> Case:
    return Case("remat_layers", RematMLP(), (_normal(21, (2, 8)),), {"deterministic": True})


class Member(nn.Module):
    """One linear head (vmapped random init is slow to compile: keep members small)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(x)


class Ensemble(nn.Module):
    """``nn.vmap``-stacked ensemble: every member sees the same input."""

    members: int = 3

    @nn.compact
    def __call__(self, x):
        stacked = nn.vmap(
            Member,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.members,
        )
        return stacked(name="members")(x)


def vmap_ensemble() -> Case:
    return Case("vmap_ensemble", Ensemble(), (_normal(22, (2, 8)),), {})


# --------------------------------------------------------------------------
# method=, extra collections, partitioning, data-dependent init.


class AutoEncoder(nn.Module):
    latent: int = 3
    out: int = 8

    def setup(self):
        self.encoder = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(self.latent)])
        self.decoder = nn.Dense(self.out)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


def method_encode() -> Case:
    return Case(
        "method_encode", AutoEncoder(), (_normal(23, (2, 8)),), {}, method=AutoEncoder.encode
    )


class CachedDecoder(nn.Module):
    """Two non-param collections: an attention 'cache' and a call 'counter'.

    ``decode=True`` attention creates its key/value cache at init; the counter is
    a ``self.variable`` that every call (init included) increments.
    """

    @nn.compact
    def __call__(self, x):
        calls = self.variable("counter", "calls", lambda: jnp.zeros((), jnp.int32))
        calls.value += 1
        x = nn.Dense(8)(x)
        return nn.MultiHeadDotProductAttention(num_heads=2, decode=True)(x)


def stateful() -> Case:
    x = _normal(26, (2, 4, 8))
    first_token = jnp.asarray(np.asarray(x)[:, :1])  # decode steps take one position at a time
    return Case(
        "stateful",
        CachedDecoder(),
        (x,),
        {},
        apply_args=(first_token,),
        mutable=("cache", "counter"),
    )


class ShardedMLP(nn.Module):
    """Params boxed by ``nn.with_partitioning`` and ``nn.with_logical_partitioning``."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            8,
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
            bias_init=nn.with_partitioning(nn.initializers.zeros_init(), ("model",)),
        )(x)
        x = nn.Dense(
            4,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")
            ),
        )(nn.relu(x))
        scale = self.param(
            "scale", nn.with_partitioning(nn.initializers.ones_init(), (None,)), (4,)
        )
        return x * scale


def partitioned() -> Case:
    return Case("partitioned", ShardedMLP(), (_normal(27, (2, 8)),), {})


class DataInitDense(nn.Module):
    """Weight-norm style data-dependent init plus a running input sum.

    ``scale`` starts at 1/std of the first batch's pre-activations and the
    'stats' collection accumulates inputs, so both depend on input values.
    """

    features: int = 4

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = x @ kernel
        scale = self.param("scale", lambda _: 1.0 / (jnp.std(y, axis=0) + 1e-6))
        total = self.variable("stats", "input_sum", lambda: jnp.zeros(x.shape[-1], x.dtype))
        total.value += x.sum(axis=0)
        return y * scale


def data_dependent() -> Case:
    return Case(
        "data_dependent",
        DataInitDense(),
        (_normal(29, (6, 3)),),
        {},
        mutable=("stats",),
        data_dependent=True,
    )


CASES: tuple[Callable[[], Case], ...] = (
    mlp_compact,
    mlp_setup,
    sequential,
    pytree_inputs,
    cnn_batchnorm,
    key_and_flags,
    multi_rng,
    transformer,
    lstm,
    gru,
    scan_remat,
    remat_layers,
    vmap_ensemble,
    method_encode,
    stateful,
    partitioned,
    data_dependent,
)
"""Factories for every model in the zoo, in a stable order."""


def all_cases() -> list[Case]:
    """Builds every :class:`Case` (inputs included)."""
    return [factory() for factory in CASES]


class DenseStack(nn.Module):
    """``depth`` identical Dense layers: one compile signature however deep."""

    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.Dense(16)(x)
        return x


class RematStack(nn.Module):
    """``depth`` unrolled ``nn.remat`` blocks (one with a boxed kernel, one nested)."""

    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.remat(RematBlock)()(x)
        return nn.Dense(3)(x)


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        h = nn.Dense(16, kernel_init=kernel_init)(nn.LayerNorm()(x))
        return x + nn.remat(nn.Dense)(x.shape[-1])(nn.gelu(h))  # remat inside remat
