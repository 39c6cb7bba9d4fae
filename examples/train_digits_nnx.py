"""Train a LeNet-style CNN on scikit-learn's handwritten digits with Flax NNX and flaxlazy.

The NNX twin of ``train_digits.py``: the same data, split, schedule and
accuracy, with the model written as an ``nnx.Module``. NNX modules create their
parameters in their constructor, so flaxlazy takes the constructor and its
arguments: ``abstract_init`` gives the module with shapes and dtypes only
(nothing computed or allocated), and ``materialize`` builds it with
jit-compiled code, with values equal to NNX's own
(``nnx.jit(lambda: LeNet(rngs=nnx.Rngs(0)))()``) except where an initializer
tree, keyed by NNX state paths such as ``"conv1/kernel"``, says otherwise.
Training is plain NNX: ``nnx.Optimizer`` with optax, and an ``nnx.jit`` step.

The data set (1,797 grey-scale 8x8 images, ten classes) ships with
scikit-learn, so nothing is downloaded. A fixed, stratified 20% split is held
out for testing.

Run it from the repository root::

    pip install -e ".[examples]"
    python examples/train_digits_nnx.py            # full run, ~98% test accuracy
    python examples/train_digits_nnx.py --quick    # a few hundred steps (CI smoke test)
    python examples/train_digits_nnx.py --help     # epochs, batch size, learning rate, seed
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import flaxlazy

NUM_CLASSES = 10
EPOCHS, QUICK_EPOCHS = 40, 10

# Initializers by NNX state path; the first pattern that matches wins, and parameters
# no pattern matches keep the layer's own initializer (here lecun_normal kernels and
# zero biases). `*` matches within one path segment, `**` any number of whole segments.
INITIALIZERS = {
    "conv*/kernel": nnx.initializers.he_normal(),  # Kaiming normal, suits ReLU convs
    "head/kernel": nnx.initializers.normal(stddev=1e-2),  # small logits at the start
}


class LeNet(nnx.Module):
    """A LeNet-style CNN for 8x8x1 images (NNX layers are told their input sizes)."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 64, 128, rngs=rngs)
        self.head = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))  # 8x8
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))  # 4x4
        x = nnx.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))  # 2x2
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense(x))
        return self.head(x)


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


def loss_and_logits(model: LeNet, images: jax.Array, labels: jax.Array):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@nnx.jit
def train_step(model: LeNet, optimizer: nnx.Optimizer, images, labels) -> jax.Array:
    """One Adam step, in place on `model` and `optimizer`; returns the batch loss."""
    (loss, _), grads = nnx.value_and_grad(loss_and_logits, has_aux=True)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model: LeNet, images, labels) -> tuple[jax.Array, jax.Array]:
    """Mean loss and accuracy on the given images."""
    loss, logits = loss_and_logits(model, images, labels)
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


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

    # 1. Shapes for free: the constructor is traced, nothing is computed or allocated.
    shapes = flaxlazy.abstract_init(LeNet, NUM_CLASSES, rngs=nnx.Rngs(args.seed))
    print("Shapes of LeNet's state, nothing allocated:")
    print(flaxlazy.summary(shapes))

    # 2. The real module, created once by compiled code, some initializers chosen by path.
    model = flaxlazy.materialize(
        LeNet, NUM_CLASSES, rngs=nnx.Rngs(args.seed), initializers=INITIALIZERS
    )

    # 3. An ordinary NNX training loop.
    steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged last batch
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)

    rng = np.random.default_rng(args.seed)
    loss = jnp.nan
    with tqdm(total=args.epochs * steps_per_epoch, desc="train", unit="step") as bar:
        for epoch in range(args.epochs):
            order = rng.permutation(len(x_train))
            for step in range(steps_per_epoch):
                batch = order[step * args.batch_size : (step + 1) * args.batch_size]
                loss = train_step(model, optimizer, x_train[batch], y_train[batch])
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")

    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    metrics = {
        "train_loss": float(loss),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "num_params": int(flaxlazy.num_params(nnx.state(model, nnx.Param))),
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
