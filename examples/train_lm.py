"""Train a character-level GPT on the Python Language Reference, on a (data, model) mesh.

The corpus is the text of the Python Language Reference that ships with every
CPython as ``pydoc_data.topics`` (what ``help("assert")`` prints): 79 topics,
about 465,000 characters of English prose and grammar, so nothing is
downloaded and the data is the same on every run of a given Python version.
The last 10% is held out for validation.

One call, ``flaxlazy.init_train_state``, creates the parameters and the AdamW
state directly in their shards on a 2-D device mesh: Megatron-style tensor
parallelism over ``model`` from a short list of partition rules keyed by
parameter path, and the optimizer moments placed like the parameters they
mirror. A jit-compiled train step takes the train state (donated, so it is
updated in place) and a token batch split over ``data``. Every
``--ckpt-every`` steps the whole train state is saved with ``flaxlazy.save``
to ``<ckpt-dir>/step_<n>`` (the last ``--keep`` are kept), and ``--resume``
continues from the latest one: ``flaxlazy.restore`` reads it straight into the
shardings that ``flaxlazy.abstract_train_state`` computes without allocating
anything. At the end the model writes some text, one jitted sampling step per
character.

On a CPU-only machine the script simulates 8 devices by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported;
on a host with 8 or more accelerators it runs on them unchanged.

Run it from the repository root::

    pip install -e ".[examples]"
    python examples/train_lm.py                # loss 4.9 -> ~1.5 (how long: README)
    python examples/train_lm.py --resume       # 500 more steps from the latest checkpoint
    python examples/train_lm.py --quick        # a tiny model, 60 steps (CI smoke test)
    python examples/train_lm.py --help         # sizes, steps, mesh, checkpoints, sampling
    python examples/train_lm.py --quick --help # the same with --quick's defaults

``--steps`` counts the steps of this run: a resumed run continues the step
count (and the learning-rate schedule) where the checkpoint left off.
Batches are drawn from a generator seeded with ``(seed, step)``, so a resumed
run sees exactly the batches an uninterrupted one would have. A run without
``--resume`` starts from scratch and first removes the old ``step_<n>``
checkpoints in ``--ckpt-dir``.

Checkpoints go to ``checkpoints/train_lm/<model sizes>`` under the current
directory (printed at the start), one folder per model configuration, so a
``--quick`` run never touches the default run's checkpoints. Each folder
records the sizes it was written with (``config.json``); ``--resume`` with
other sizes stops with a message naming the flags to use instead.
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
import functools
import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import flaxlazy

# Megatron-style tensor parallelism over "model"; parameters are replicated over "data".
# Patterns match paths inside `params` (`*`: within a segment, `**`: any segments); the
# first rule that matches wins. The AdamW moments need no rules: each is placed like the
# parameter it mirrors. Shapes in the comments: d = d_model, h = heads.
PARTITION_RULES = [
    ("wte/embedding", P("model", None)),  # (vocab, d): vocab-parallel
    ("wpe/embedding", P(None, "model")),  # (seq, d): split on the embedding dim
    ("block_*/attn/qkv/kernel", P(None, None, "model", None)),  # (d, 3, h, d/h)
    ("block_*/attn/qkv/bias", P(None, "model", None)),  # (3, h, d/h)
    ("block_*/attn/out/kernel", P("model", None, None)),  # (h, d/h, d)
    ("block_*/mlp/up/kernel", P(None, "model")),  # (d, 4d)
    ("block_*/mlp/up/bias", P("model")),  # (4d,)
    ("block_*/mlp/down/kernel", P("model", None)),  # (4d, d)
    ("head/kernel", P(None, "model")),  # (d, vocab): vocab-parallel logits
    ("head/bias", P("model")),  # (vocab,)
    ("**", P()),  # the rest replicated: LayerNorms, biases of the row-parallel layers
]

# GPT-2's initialization, chosen by path.
INITIALIZERS = {
    "**/embedding": nn.initializers.normal(stddev=0.02),
    "**/kernel": nn.initializers.normal(stddev=0.02),
    "**/bias": nn.initializers.zeros,
}

SIZES = {  # layers, d_model, heads, seq, batch, steps, lr, warmup, ckpt_every, sample_chars
    "default": (4, 128, 4, 128, 32, 500, 3e-3, 100, 100, 400),
    "quick": (2, 64, 4, 64, 16, 60, 5e-3, 10, 20, 120),
}
SIZE_FLAGS = (
    "layers",
    "d_model",
    "heads",
    "seq",
    "batch",
    "steps",
    "lr",
    "warmup",
    "ckpt_every",
    "sample_chars",
)
SIZE_HELP = {
    "layers": "transformer blocks",
    "d_model": "model width",
    "heads": "attention heads",
    "seq": "context length in characters",
    "batch": "global batch (split over the data axis)",
    "steps": "steps in this run",
    "lr": "peak AdamW learning rate",
    "warmup": "linear learning-rate warmup steps",
    "ckpt_every": "save a checkpoint every this many steps",
    "sample_chars": "characters to sample at the end",
}
# What a checkpoint's shapes depend on: resuming needs the same values.
MODEL_FLAGS = ("layers", "d_model", "heads", "seq")
CKPT_DIR = os.path.join("checkpoints", "train_lm", "{config}")
CONFIG_FILE = "config.json"
CKPT_NAME = re.compile(r"step_(\d+)")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask; the width comes from the input."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        qkv = nn.DenseGeneral((3, self.num_heads, d_model // self.num_heads), name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # b t h dh
        mask = nn.make_causal_mask(x[..., 0], dtype=bool)  # b 1 t t
        y = nn.dot_product_attention(q, k, v, mask=mask)
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
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


class CharCorpus:
    """The Python Language Reference as integer character ids, split train/validation.

    The vocabulary is the sorted set of characters, padded to a multiple of 64 so that
    the embedding and the logits split evenly over the ``model`` axis.
    """

    def __init__(self, val_fraction: float = 0.1):
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = "\n\n".join(topics[name] for name in sorted(topics))
        self.chars = sorted(set(text))
        self.vocab = -(-len(self.chars) // 64) * 64
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = np.array([self.index[c] for c in text], dtype=np.int32)
        split = int(len(ids) * (1 - val_fraction))
        self.num_chars = len(text)
        self.train, self.val = ids[:split], ids[split:]

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in ids)

    def batch(self, split: str, seed: Sequence[int], batch: int, seq: int) -> np.ndarray:
        """``batch`` random windows of ``seq + 1`` characters (inputs and next-char targets)."""
        ids = self.train if split == "train" else self.val
        starts = np.random.default_rng(seed).integers(0, len(ids) - seq - 1, size=batch)
        return np.stack([ids[s : s + seq + 1] for s in starts])


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
        flag = "--" + name.replace("_", "-")
        other = "with --quick" if quick else f"--quick: {quick_sizes[name]}"
        help_ = f"{SIZE_HELP[name]} (default: %(default)s; {other})"
        parser.add_argument(flag, type=type(value), default=value, help=help_)
    parser.add_argument("--mesh", default="4,2", help="mesh shape 'data,model' (8 devices)")
    parser.add_argument(
        "--ckpt-dir",
        default=CKPT_DIR,
        help="where step_<n> checkpoints go; {config} stands for the model sizes, e.g. "
        + model_config_name(dict(zip(SIZE_FLAGS, SIZES["default"], strict=True))),
    )
    parser.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir"
    )
    parser.add_argument(
        "--prompt", default="The ", help="start of the sampled text (default: %(default)r)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument("--seed", type=int, default=0, help="model, data and sampling seed")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and 60 steps (CI smoke test)"
    )
    args = parser.parse_args(argv)
    try:
        args.mesh = tuple(int(n) for n in args.mesh.split(","))
    except ValueError:
        parser.error(f"--mesh must look like '4,2' (data,model), got {args.mesh!r}")
    if len(args.mesh) != 2 or min(args.mesh) < 1:
        parser.error(f"--mesh must be two positive sizes 'data,model', got {args.mesh}")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if args.batch % args.mesh[0]:
        parser.error(f"--batch {args.batch} is not divisible by the data axis ({args.mesh[0]})")
    if args.keep < 1 or args.ckpt_every < 1 or args.steps < 1:
        parser.error("--steps, --keep and --ckpt-every must be positive")
    args.ckpt_dir = args.ckpt_dir.replace("{config}", model_config_name(vars(args)))
    return args


def model_config(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """What the checkpoint's shapes depend on: the model flags and the vocabulary size."""
    return {**{name: getattr(args, name) for name in MODEL_FLAGS}, "vocab": vocab}


def model_config_name(config: dict[str, Any]) -> str:
    """A folder name for a model configuration, e.g. ``layers4-d128-heads4-seq128``."""
    return "layers{layers}-d{d_model}-heads{heads}-seq{seq}".format(**config)


def config_mismatch(saved: dict[str, Any], wanted: dict[str, Any], ckpt_dir: str) -> str | None:
    """Why checkpoints written with config ``saved`` cannot resume ``wanted``, else None.

    The message names the flags that resume them, and the other way out.
    """
    differ = [name for name in wanted if saved.get(name) != wanted[name]]
    if not differ:
        return None
    if "vocab" in differ:
        return (
            f"--resume: the checkpoints in {ckpt_dir} have a {saved.get('vocab')}-character "
            f"vocabulary but this Python's reference gives {wanted['vocab']}: they were "
            "written with another Python version. Drop --resume to start afresh, or give "
            "another --ckpt-dir."
        )
    got = ", ".join(
        f"--{name.replace('_', '-')} {saved[name]} (this run: {wanted[name]})" for name in differ
    )
    flags = " ".join(f"--{name.replace('_', '-')} {saved[name]}" for name in MODEL_FLAGS)
    use = f"resume them with {flags}"
    for preset, sizes in SIZES.items():
        preset_sizes = dict(zip(SIZE_FLAGS, sizes, strict=True))
        if all(saved[name] == preset_sizes[name] for name in MODEL_FLAGS):
            use = (
                "they are --quick's sizes: resume them with --quick --resume"
                if preset == "quick"
                else "they are the default sizes: resume them with --resume and without "
                "--quick or size flags"
            )
    return (
        f"--resume: the checkpoints in {ckpt_dir} hold a model of other sizes: {got}; "
        f"{use}. Or drop --resume to start afresh, or give another --ckpt-dir."
    )


def read_config(ckpt_dir: str) -> dict[str, Any] | None:
    """The model config the checkpoints in ``ckpt_dir`` were written with, if recorded."""
    try:
        with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_config(ckpt_dir: str, config: dict[str, Any]) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1)


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


def checkpoints(ckpt_dir: str) -> dict[int, str]:
    """The finished ``step_<n>`` checkpoints in ``ckpt_dir``, by step, oldest first.

    Orbax writes into a temporary directory and renames it when done, so an interrupted
    save never looks like ``step_<n>``.
    """
    if not os.path.isdir(ckpt_dir):
        return {}
    found = {}
    for name in os.listdir(ckpt_dir):
        match = CKPT_NAME.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(ckpt_dir, name)
    return dict(sorted(found.items()))


def save_checkpoint(ckpt_dir: str, state: flaxlazy.TrainState, keep: int) -> str:
    """Saves the whole train state to ``<ckpt_dir>/step_<n>``; keeps the last ``keep``."""
    path = os.path.join(ckpt_dir, f"step_{int(state.step)}")
    flaxlazy.save(path, state)  # params, optimizer state and step
    for old in list(checkpoints(ckpt_dir).values())[:-keep]:
        shutil.rmtree(old)
    return path


def make_sampler(model: GPT, temperature: float):
    """A jitted step: the next character after ``window[0, :pos + 1]``."""

    @jax.jit
    def next_token(params, window, pos, key):
        logits = model.apply({"params": params}, window)[0, pos]  # causal: padding unseen
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    return next_token


def sample(next_token, params, corpus: CharCorpus, prompt: str, length: int, seq: int, key):
    """``prompt`` followed by ``length`` sampled characters (a sliding window of ``seq``)."""
    ids = corpus.encode(prompt) or [corpus.index["\n"]]
    for i in range(length):
        context = ids[-seq:]
        window = np.zeros((1, seq), np.int32)
        window[0, : len(context)] = context
        ids.append(int(next_token(params, window, len(context) - 1, jax.random.fold_in(key, i))))
    return corpus.decode(ids)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (or resumes training) the model, checkpoints it, and samples some text.

    Args:
      argv: command-line arguments (without the program name); `None` reads `sys.argv`.

    Returns:
      `first_loss` and `last_loss` (training loss of this run's first step and mean of
      its last 10), `val_loss` (held-out, at the end), `steps` (the global step reached),
      `resumed_from` (the checkpoint step this run started from, None for a fresh start),
      `checkpoints` (the steps kept on disk), `sample` (generated text), `num_params`,
      `tokens_per_second` (excluding the first, compiling step) and `seconds`.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    corpus = CharCorpus()
    config = model_config(args, corpus.vocab)
    saved = checkpoints(args.ckpt_dir)
    if args.resume and saved:  # before anything slow: do these checkpoints fit this model?
        mismatch = config_mismatch(read_config(args.ckpt_dir) or config, config, args.ckpt_dir)
        if mismatch:
            raise SystemExit(mismatch)
    mesh = make_mesh(args.mesh)
    platform = mesh.devices.flat[0].platform.upper()
    print(
        f"corpus: the Python Language Reference (pydoc_data.topics), {corpus.num_chars:,} "
        f"characters, {len(corpus.chars)} distinct (vocab padded to {corpus.vocab})\n"
        f"mesh {dict(mesh.shape)} on {mesh.size} {platform} devices\n"
        f"checkpoints: {os.path.abspath(args.ckpt_dir)} (--ckpt-dir)"
    )

    model = GPT(corpus.vocab, args.seq, args.d_model, args.layers, args.heads)
    schedule = optax.warmup_constant_schedule(0.0, args.lr, warmup_steps=args.warmup)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    key = jax.random.key(args.seed)
    tokens_spec = flaxlazy.spec(f"i32[{args.batch},{args.seq}]")
    layout = dict(mesh=mesh, partition_rules=PARTITION_RULES)

    # 1. The whole train state as sharded shapes: free. It is the restore target below,
    # and it tells us the jitted step's in/out shardings.
    abstract = flaxlazy.abstract_train_state(model, tx, key, tokens_spec, **layout)
    param_bytes = flaxlazy.nbytes(abstract.params)
    print(
        f"GPT: {args.layers} layers, width {args.d_model}, {args.heads} heads, context "
        f"{args.seq}: {flaxlazy.num_params(abstract.params):,} parameters "
        f"({param_bytes / 2**20:.1f} MiB), AdamW state "
        f"{flaxlazy.nbytes(abstract.opt_state) / 2**20:.1f} MiB"
    )

    # 2. The train state: restored from the latest checkpoint, or created in one step.
    resumed_from = None
    if args.resume and saved:
        resumed_from, path = list(saved.items())[-1]
        # Each array is read straight into the sharding `abstract` gives it (each device
        # reads its slice only); `apply_fn` and `tx`, not saved, come from `abstract`.
        try:
            state = flaxlazy.restore(path, abstract)
        except ValueError as e:  # e.g. checkpoints older than config.json, of other sizes
            first, *more = str(e).splitlines()
            raise SystemExit(
                f"--resume: {path} does not fit this model: {first}"
                + (f" (and {len(more)} more like it)" if more else "")
                + "\nResume with the size flags (or --quick) it was written with, drop "
                "--resume to start afresh, or give another --ckpt-dir."
            ) from e
        print(f"resumed from {path} (step {int(state.step)})")
    else:
        if args.resume:
            print(f"--resume: no checkpoint in {args.ckpt_dir}, starting from scratch")
        elif saved:
            print(f"starting from scratch: removing the old checkpoints in {args.ckpt_dir}")
            for old in saved.values():
                shutil.rmtree(old)
        write_config(args.ckpt_dir, config)  # what --resume checks against
        residual = nn.initializers.normal(stddev=0.02 / math.sqrt(2 * args.layers))
        initializers = {"block_*/attn/out/kernel": residual, "block_*/mlp/down/kernel": residual}
        state = flaxlazy.init_train_state(
            model, tx, key, tokens_spec, initializers={**initializers, **INITIALIZERS}, **layout
        )
    kernel = state.params["block_0"]["mlp"]["up"]["kernel"]
    moment = state.opt_state[1][0].mu["block_0"]["mlp"]["up"]["kernel"]
    print(
        f"block_0/mlp/up/kernel {kernel.shape}: spec {tuple(kernel.sharding.spec)}, its Adam "
        f"moment {tuple(moment.sharding.spec)}"
    )

    # 3. A compiled train step: the state stays in its shardings and is donated (updated
    # in place); the batch is split over "data", and XLA inserts the collectives.
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = NamedSharding(mesh, P("data", None))

    @functools.partial(
        jax.jit,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    def train_step(state, batch):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @functools.partial(jax.jit, in_shardings=(state_shardings.params, batch_sharding))
    def eval_loss(params, batch):
        logits = model.apply({"params": params}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def val_loss(params) -> float:
        batches = [corpus.batch("val", (args.seed, 1, i), args.batch, args.seq) for i in range(4)]
        return float(np.mean([eval_loss(params, b) for b in batches]))

    # 4. The loop. Batches depend on (seed, step) only, so resuming replays them exactly.
    first_step = int(state.step)
    last_step = first_step + args.steps - 1
    tokens_per_step = args.batch * args.seq
    losses, timed_from = [], None
    bar = tqdm(range(first_step, last_step + 1), desc="train", unit="step")
    for step in bar:
        batch = corpus.batch("train", (args.seed, 0, step), args.batch, args.seq)
        state, loss = train_step(state, batch)
        losses.append(float(loss))
        if timed_from is None:  # the first step compiles: time from the end of it
            timed_from = (time.perf_counter(), step + 1)
        if step % 10 == 0 or step == last_step:
            elapsed = time.perf_counter() - timed_from[0]
            speed = (step + 1 - timed_from[1]) * tokens_per_step / elapsed if elapsed else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{speed:,.0f}")
        if (step + 1) % args.ckpt_every == 0 or step == last_step:
            save_checkpoint(args.ckpt_dir, state, args.keep)
    bar.close()
    timed_steps = int(state.step) - timed_from[1]
    train_seconds = time.perf_counter() - timed_from[0]
    tokens_per_second = timed_steps * tokens_per_step / train_seconds if timed_steps else 0.0

    first_loss, last_loss = losses[0], float(np.mean(losses[-10:]))
    final_val = val_loss(state.params)
    print(
        f"steps {first_step} -> {int(state.step)}: training loss {first_loss:.3f} -> "
        f"{last_loss:.3f} (mean of the last {min(10, len(losses))}), validation loss "
        f"{final_val:.3f}; log(vocab) = {math.log(corpus.vocab):.3f}, "
        f"{tokens_per_second:,.0f} tokens/s"
    )
    kept = list(checkpoints(args.ckpt_dir))
    print(f"checkpoints kept in {os.path.abspath(args.ckpt_dir)}: steps {kept}")

    # 5. Some text from the model, one jitted step per character.
    next_token = make_sampler(model, args.temperature)
    text = sample(
        next_token,
        state.params,
        corpus,
        args.prompt,
        args.sample_chars,
        args.seq,
        jax.random.key(args.seed + 1),
    )
    print(f"\nsample (temperature {args.temperature}):\n{text}\n")

    results = {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss": final_val,
        "steps": int(state.step),
        "resumed_from": resumed_from,
        "checkpoints": kept,
        "sample": text,
        "num_params": int(flaxlazy.num_params(state.params)),
        "tokens_per_second": tokens_per_second,
        "seconds": time.perf_counter() - start,
    }
    print(f"done in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
