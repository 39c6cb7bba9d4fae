"""Train a LeNet-style CNN on scikit-learn's handwritten digits with flaxlazy.

The model below names no input size anywhere: flaxlazy resolves every
parameter shape from an input spec without computing anything, creates the
parameters once with jit-compiled code, and picks each layer's initializer by
its path in the parameter tree instead of threading ``kernel_init=`` through
every layer.

The data set (1,797 grey-scale 8x8 images, ten classes) ships with
scikit-learn, so nothing is downloaded. A fixed, stratified 20% split is held
out for testing.

Run it from the repository root::

    pip install -e ".[examples]"
    python examples/train_digits.py            # full run, ~98% test accuracy
    python examples/train_digits.py --quick    # a few hundred steps (CI smoke test)
    python examples/train_digits.py --help     # epochs, batch size, learning rate, seed
"""

from __future__ import annotations

import argparse
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

NUM_CLASSES = 10
EPOCHS, QUICK_EPOCHS = 40, 10

# One initializer per parameter path; the first pattern that matches wins.
# `*` matches within one path segment, `**` any number of whole segments.
INITIALIZERS = {
    "Conv_*/kernel": nn.initializers.he_normal(),  # Kaiming normal, suits ReLU convs
    "head/kernel": nn.initializers.normal(stddev=1e-2),  # small logits at the start
    "**/kernel": nn.initializers.xavier_uniform(),  # every other (Dense) kernel
    "**/bias": nn.initializers.zeros,
}


class LeNet(nn.Module):
    """A LeNet-style CNN. No layer is told the size of its input."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3))(x))  # 8x8
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 4x4
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 2x2
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(NUM_CLASSES, name="head")(x)


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
    # --quick changes the default of --epochs, so look for it first: `--help` then shows
    # the defaults that apply.
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # `--quick` is looked for by its full name above
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=QUICK_EPOCHS if quick else EPOCHS,
        help="passes over the training split (default: %(default)s"
        + ("; with --quick)" if quick else f"; --quick: {QUICK_EPOCHS})"),
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="model, shuffling and split seed")
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred steps only (CI smoke test)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains the model and evaluates it on the held-out split.

    Args:
      argv: command-line arguments (without the program name); `None` reads `sys.argv`.

    Returns:
      The final metrics: `test_accuracy`, `test_loss`, `train_loss` (last batch),
      `num_params`, `steps` and `seconds` (wall time).
    """
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = LeNet()
    key = jax.random.key(args.seed)

    # 1. Shapes for free: nothing is computed or allocated here.
    input_spec = flaxlazy.spec(f"f32[{args.batch_size},8,8,1]")
    shapes = flaxlazy.abstract_init(model, key, input_spec)
    print(f"Shapes resolved from {input_spec.dtype}{list(input_spec.shape)}, nothing allocated:")
    print(flaxlazy.summary(shapes))

    # 2. Real parameters, created once by compiled code, initializers chosen by path.
    params = flaxlazy.materialize(model, key, input_spec, initializers=INITIALIZERS)["params"]

    # 3. An ordinary optax training loop.
    steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged last batch
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, images, labels):
        logits = model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    rng = np.random.default_rng(args.seed)
    loss = jnp.nan
    with tqdm(total=args.epochs * steps_per_epoch, desc="train", unit="step") as bar:
        for epoch in range(args.epochs):
            order = rng.permutation(len(x_train))
            for step in range(steps_per_epoch):
                batch = order[step * args.batch_size : (step + 1) * args.batch_size]
                params, opt_state, loss = train_step(
                    params, opt_state, x_train[batch], y_train[batch]
                )
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")

    test_loss, test_accuracy = evaluate(params, x_test, y_test)
    metrics = {
        "train_loss": float(loss),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "num_params": int(flaxlazy.num_params(params)),
        "steps": args.epochs * steps_per_epoch,
        "seconds": time.perf_counter() - start,
    }
    print(
        f"\ntest accuracy {metrics['test_accuracy']:.2%} (loss {metrics['test_loss']:.4f}) "
        f"on {len(x_test)} held-out digits after {metrics['steps']} steps "
        f"in {metrics['seconds']:.1f} s"
    )
    return metrics


if __name__ == "__main__":
    main()
