"""Fine-tune a pretrained CNN backbone with a new head, loaded through the initializer tree.

Transfer learning in three steps on scikit-learn's handwritten digits (8x8
images, ten classes, nothing downloaded; a fixed, stratified 20% is held out):

1. Pretrain a small CNN (a convolutional ``backbone`` and a Dense ``head``) on
   the digits 0-4 only, with a 5-way head, and save its backbone with
   ``flaxlazy.save``.
2. Build a new model with a 10-way head. One initializer tree says where every
   parameter comes from: the backbone is read from the checkpoint
   (``flaxlazy.from_checkpoint``), the head starts at zero. No random values
   are drawn for the backbone, and ``init_train_state`` creates the Adam state
   alongside. The loaded backbone is checked to equal the pretrained one, and
   with a zero head the new model is at chance on all ten classes.
3. Fine-tune the whole model on all ten digits and report the accuracy again.

Run it from the repository root::

    pip install -e ".[examples]"
    python examples/finetune_digits.py          # ~99% on digits 0-4, then ~98% on 0-9
    python examples/finetune_digits.py --quick  # fewer epochs (CI smoke test)
    python examples/finetune_digits.py --help   # epochs, batch size, learning rates, seed
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import flaxlazy

PRETRAIN_CLASSES = 5  # pretraining sees the digits 0-4 only
NUM_CLASSES = 10
EPOCHS = {"--pretrain-epochs": (30, 10), "--finetune-epochs": (20, 15)}  # default, --quick

# Initializers for pretraining, by parameter path (the first pattern that matches wins).
INITIALIZERS = {
    "backbone/Conv_*/kernel": nn.initializers.he_normal(),
    "head/kernel": nn.initializers.normal(stddev=1e-2),
    "**/kernel": nn.initializers.xavier_uniform(),
    "**/bias": nn.initializers.zeros,
}


class Backbone(nn.Module):
    """LeNet-style features: two conv/pool stages and a Dense layer, 128 features out."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3))(x))  # 8x8
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 4x4
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 2x2
        return nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))


class Classifier(nn.Module):
    """``backbone`` features and a linear ``head`` with ``num_classes`` outputs."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, name="head")(Backbone(name="backbone")(x))


def load_data(seed: int) -> tuple[np.ndarray, ...]:
    """Returns ``(x_train, x_test, y_train, y_test)``, images NHWC in [0, 1]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(
        images,
        digits.target.astype(np.int32),
        test_size=0.2,
        random_state=seed,
        stratify=digits.target,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # --quick changes the default epochs, so look for it first: `--help` then shows the
    # defaults that apply.
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # `--quick` is looked for by its full name above
    )
    for flag, what in (("--pretrain-epochs", "on digits 0-4"), ("--finetune-epochs", "on 0-9")):
        full, fast = EPOCHS[flag]
        parser.add_argument(
            flag,
            type=int,
            default=fast if quick else full,
            help=f"passes over the training split {what} (default: %(default)s; "
            + ("with --quick)" if quick else f"--quick: {fast})"),
        )
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining Adam learning rate")
    parser.add_argument(
        "--finetune-lr", type=float, default=2e-3, help="fine-tuning Adam learning rate"
    )
    parser.add_argument(
        "--ckpt-dir",
        default=os.path.join("checkpoints", "finetune_digits"),
        help="where the pretrained backbone is saved (as <ckpt-dir>/backbone)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model, shuffling and split seed")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (CI smoke test)")
    return parser.parse_args(argv)


def make_train_step():
    """A compiled step on a ``TrainState``, shared by pretraining and fine-tuning."""

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return train_step


@jax.jit
def _accuracy(state: flaxlazy.TrainState, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def accuracy(state: flaxlazy.TrainState, images: np.ndarray, labels: np.ndarray) -> float:
    return float(_accuracy(state, images, labels))


def fit(
    state: flaxlazy.TrainState,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    desc: str,
) -> tuple[flaxlazy.TrainState, float]:
    """Trains ``epochs`` passes over ``(x, y)`` in shuffled batches; returns the last loss."""
    train_step = make_train_step()
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x) // batch_size  # drop the ragged last batch
    loss = jnp.nan
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            for i in range(steps_per_epoch):
                batch = order[i * batch_size : (i + 1) * batch_size]
                state, loss = train_step(state, x[batch], y[batch])
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
    return state, float(loss)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Pretrains on digits 0-4, reloads the backbone under a 10-way head and fine-tunes.

    Args:
      argv: command-line arguments (without the program name); `None` reads `sys.argv`.

    Returns:
      `pretrain_accuracy` (held-out digits 0-4, 5-way head), `accuracy_before` (all ten
      classes, loaded backbone and zero head: chance), `accuracy_after` (all ten classes
      after fine-tuning) and its split `accuracy_after_old` (digits 0-4) /
      `accuracy_after_new` (digits 5-9), `backbone_equal` (the loaded backbone equals the
      pretrained one exactly), `checkpoint` (its path), `num_params` and `seconds`.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    input_spec = flaxlazy.spec(f"f32[{args.batch_size},8,8,1]")
    key = jax.random.key(args.seed)

    # 1. Pretrain on the digits 0-4 with a 5-way head.
    old_train, old_test = y_train < PRETRAIN_CLASSES, y_test < PRETRAIN_CLASSES
    pretrain_model = Classifier(PRETRAIN_CLASSES)
    state = flaxlazy.init_train_state(
        pretrain_model,
        optax.adam(args.lr),
        key,
        input_spec,
        initializers=INITIALIZERS,
    )
    state, _ = fit(
        state,
        x_train[old_train],
        y_train[old_train],
        epochs=args.pretrain_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        desc="pretrain (0-4)",
    )
    pretrain_accuracy = accuracy(state, x_test[old_test], y_test[old_test])
    print(f"pretrained on digits 0-4: {pretrain_accuracy:.2%} held-out accuracy (5 classes)")

    # Save the part meant for reuse, the backbone, under the same "params/..." layout as a
    # variables dict (so from_checkpoint's default subtree="params" applies). Why not the
    # whole model? Its 5-way head would sit in the checkpoint with nothing to read it:
    # the new head has another shape and starts from zero. from_checkpoint reports such
    # leftover entries (a UserWarning; an error with strict=True) because they usually
    # mean a pattern or a `rename` rule that does not match. Saving only what is reused
    # lets us load with strict=True: every checkpoint entry must find its parameter.
    # (From a whole-model checkpoint, read only its backbone with
    # `from_checkpoint(path, subtree="params/backbone", rename=[(r"backbone/(.*)", r"\1")])`:
    # model path `backbone/Conv_0/kernel` -> `Conv_0/kernel` -> entry
    # `params/backbone/Conv_0/kernel`, and the head's entries lie outside the subtree.)
    checkpoint = os.path.abspath(os.path.join(args.ckpt_dir, "backbone"))
    if os.path.exists(checkpoint):
        shutil.rmtree(checkpoint)  # from an earlier run
    pretrained = jax.device_get(state.params["backbone"])
    flaxlazy.save(checkpoint, {"params": {"backbone": state.params["backbone"]}})
    print(f"saved the backbone ({flaxlazy.num_params(pretrained):,} parameters) to {checkpoint}")

    # 2. A new model with a 10-way head. Its initializer tree says where each parameter
    # comes from: `backbone/...` is read from checkpoint entry `params/backbone/...` (no
    # random draws for it), the head starts at zero.
    model = Classifier(NUM_CLASSES)
    initializers = {
        "backbone/**": flaxlazy.from_checkpoint(checkpoint, subtree="params", strict=True),
        "head/**": nn.initializers.zeros,
    }
    tx = optax.adam(args.finetune_lr)
    state = flaxlazy.init_train_state(model, tx, key, input_spec, initializers=initializers)
    backbone_equal = jax.tree.all(
        jax.tree.map(np.array_equal, jax.device_get(state.params["backbone"]), pretrained)
    )
    print(f"loaded backbone equals the pretrained one: {backbone_equal}")
    # A zero head gives equal logits for every class, so argmax always says 0: chance level.
    accuracy_before = accuracy(state, x_test, y_test)
    print(f"before fine-tuning (zero 10-way head): {accuracy_before:.2%} on all 10 digits")

    # 3. Fine-tune everything on all ten digits.
    state, train_loss = fit(
        state,
        x_train,
        y_train,
        epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        seed=args.seed + 1,
        desc="fine-tune (0-9)",
    )
    new_test = ~old_test
    results = {
        "pretrain_accuracy": pretrain_accuracy,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy(state, x_test, y_test),
        "accuracy_after_old": accuracy(state, x_test[old_test], y_test[old_test]),
        "accuracy_after_new": accuracy(state, x_test[new_test], y_test[new_test]),
        "train_loss": train_loss,
        "backbone_equal": bool(backbone_equal),
        "checkpoint": checkpoint,
        "num_params": int(flaxlazy.num_params(state.params)),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"after fine-tuning: {results['accuracy_after']:.2%} on all 10 digits "
        f"({results['accuracy_after_old']:.2%} on 0-4, {results['accuracy_after_new']:.2%} "
        f"on 5-9; {len(x_test)} held-out images) in {results['seconds']:.1f} s"
    )
    return results


if __name__ == "__main__":
    main()
