"""Shared test setup: 8 simulated CPU devices (set before jax is imported), keys, models."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


class MLP(nn.Module):
    """The D2L-style MLP: no input size anywhere."""

    hidden: int = 256
    out: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


@pytest.fixture
def mlp():
    return MLP()
