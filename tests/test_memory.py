"""Many distinct models in one process: flaxlazy's caches stay bounded (subprocess)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh processes: run with -m slow

SCRIPT = r"""
import json
import flax.linen as nn
import jax
import flaxlazy
from flaxlazy._src import cache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

class Net(nn.Module):
    width: int
    @nn.compact
    def __call__(self, x):
        # a kernel of >= 1,024 elements (drawn flat: one transform per fan-in) and small ones
        return nn.Dense(3 + self.width % 4)(nn.relu(nn.Dense(64 + self.width)(x)))

samples, sizes = [], []
for i in range(N):
    out = flaxlazy.materialize(Net(i), jax.random.key(0), flaxlazy.spec((2, 16 + i)))
    jax.block_until_ready(out)
    del out
    samples.append(rss())
    sizes.append((len(cache.EXECUTABLES), cache.EXECUTABLES.nbytes))
print(json.dumps({"rss": samples, "sizes": sizes, "max_bytes": cache.EXECUTABLES.max_bytes,
                  "max_count": cache.EXECUTABLES.size}))
"""


def test_rss_growth_is_bounded_over_many_models():
    # Each model has new parameter shapes, so each compiles new code (a flat-draw
    # transform for the new fan-in, the head's initializer): the one cache of compiled
    # functions fills (about 50 models; the zero biases need no compiled code), then
    # stays at its bound.
    n, steady = 80, 60
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("N)", f"{n})")],
        check=True, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for count, nbytes in report["sizes"]:
        assert count <= report["max_count"] and nbytes <= report["max_bytes"]
    rss = report["rss"]
    growth = (rss[-1] - rss[steady - 1]) / (n - steady)
    assert growth < 2.0, f"RSS grows {growth:.2f} MiB per model once the cache is full: {rss}"
