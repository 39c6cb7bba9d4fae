"""Per-device peak while materializing GPT-2 medium over 8 simulated devices (issue 12).

Each leaf is created by its own compiled function, placed in its shards; the arrays
accumulate on each device. A device's peak is therefore the leaves created so far plus
the leaf being drawn plus that function's temporaries, which XLA's memory analysis of
the compiled executable gives exactly. Large random leaves are drawn block by block on
each device (``chunked.sharded_chunked_jaxpr``), so the temporaries stay one block.

    python benchmarks/sharded_memory.py            # GPT-2 medium, 8 devices
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import zoo  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flaxlazy._src import placement  # noqa: E402
from flaxlazy._src import plan as plan_lib  # noqa: E402
from flaxlazy._src.linen import call as linen_call  # noqa: E402
from flaxlazy._src.sources import compiled  # noqa: E402

RULES = [("**/kernel", P(None, "model")), ("**/embedding", P(None, "model")), ("**", P())]


def main() -> None:
    model = zoo.MODELS["gpt2_medium"]()
    mesh = jax.make_mesh((8,), ("model",))
    call = linen_call.make_call(model.module, jax.random.key(0), model.inputs, model.kwargs)
    traced = linen_call.trace(call)
    by_path = placement.resolve(traced.variables, mesh=mesh, partition_rules=RULES)
    plan = plan_lib.build(traced, shardings=lambda path, leaf: by_path[path])
    root = jax.random.key(0)
    live = peak = 0
    worst = ("", 0, 0)
    for leaf in plan.leaves:  # in the engine's order
        out = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        temp = 0
        if compiled.fill(leaf) is None:
            key_hash = None if leaf.key is None else np.uint32(leaf.key)
            executable = compiled._leaf_fn(leaf).lower(
                root if key_hash is not None else None, key_hash, leaf.program.runtime_consts
            ).compile()
            temp = executable.memory_analysis().temp_size_in_bytes
        if live + out + temp > peak:
            peak, worst = live + out + temp, (leaf.path, out, temp)
        live += out
    print(f"{model.note}, mesh {dict(mesh.shape)}, rules {RULES}")
    print(f"per-device parameter bytes {live / 1e6:.1f} MB; per-device peak {peak / 1e6:.1f} MB "
          f"= {peak / live:.3f}x (target <= 1.15x)")
    print(f"at {worst[0]}: its shard {worst[1] / 1e6:.1f} MB, temporaries {worst[2] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
