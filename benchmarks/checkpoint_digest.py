"""What checkpoint checksums cost: save and read of a GPT-2-medium-sized tree, with and without.

``flaxlazy.save`` records a CRC-32 per written shard and writes atomically (aside, then
renamed into place); ``read`` checks what it reads against the CRCs. This times both
against the same Orbax write and read without them, on a tree shaped like GPT-2 medium
(24 layers of qkv 1024x3072, proj 1024x1024, mlp 1024x4096 and 4096x1024, plus a
50257x1024 embedding: ~355M float32 parameters, 1.4 GB) of random values.

    python benchmarks/checkpoint_digest.py [--layers 24] [--repeats 3]

One tree is held at a time (about 2x its size in RAM while reading back). Checkpoints go
to a fresh temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import paths
from flaxlazy._src.checkpoint import integrity
from flaxlazy._src.checkpoint import orbax_io


def gpt2_medium_tree(layers: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    tree = {"wte": w(50257, 1024)}
    for i in range(layers):
        tree[f"h_{i}"] = {
            "attn_qkv": w(1024, 3072), "attn_proj": w(1024, 1024),
            "mlp_fc": w(1024, 4096), "mlp_proj": w(4096, 1024),
        }
    return tree


def plain_orbax_save(path: str, tree: dict) -> None:
    """The write ``save`` wraps: same Orbax handler, no checksums, no rename."""
    ocp = orbax_io._orbax()
    registry = orbax_io._save_registry(ocp)
    handler = ocp.PyTreeCheckpointHandler(
        **({} if registry is None else {"type_handler_registry": registry})
    )
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))


def check_all(ckpt: str, digests: dict, arrays: dict) -> None:
    for p, value in arrays.items():
        integrity.verify(ckpt, p, digests[p], integrity.pieces(value, digests[p][0]), None)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    del out
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="flaxlazy-digest-bench-")
    times: dict[str, list[float]] = {}
    try:
        tree = gpt2_medium_tree(args.layers)
        flat = paths.flatten(tree)[0]
        n_params = sum(x.size for _, x in flat)
        gbytes = sum(x.nbytes for _, x in flat) / 1e9
        times["crc32 alone"] = [timed(integrity.record, flat)]

        saves = [("save: Orbax only", plain_orbax_save), ("save: flaxlazy", orbax_io.save)]
        for r in range(args.repeats):  # alternate the order, so drift hits both alike
            for name, fn in saves[:: 1 if r % 2 == 0 else -1]:
                path = os.path.join(root, f"{r}-{name[6:11]}")
                os.sync()  # the last save's write-back is not charged to this one
                times.setdefault(name, []).append(timed(fn, path, tree))
                if r < args.repeats - 1 or name != "save: flaxlazy":
                    shutil.rmtree(path)
        del tree, flat  # one tree in memory at a time
        ckpt = os.path.join(root, f"{args.repeats - 1}-flaxl")

        targets = orbax_io.entries(ckpt)
        digests, hidden = os.path.join(ckpt, integrity.DIGESTS), os.path.join(root, "digests")
        timed(orbax_io.read, ckpt, targets)  # warm the page cache
        for _ in range(args.repeats):
            os.rename(digests, hidden)  # a checkpoint without checksums reads unchecked
            times.setdefault("read: unchecked", []).append(
                timed(orbax_io.read, ckpt, targets))
            os.rename(hidden, digests)
            times.setdefault("read: checked", []).append(
                timed(orbax_io.read, ckpt, targets))
        # The check alone, on data already read (what "checked" adds, without I/O noise).
        digests, arrays = integrity.load(ckpt), orbax_io.read(ckpt, targets)
        times["check alone"] = [timed(check_all, ckpt, digests, arrays)]
        del arrays
    finally:
        shutil.rmtree(root, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"tree: {len(targets)} arrays, {n_params / 1e6:.0f}M float32 params, {gbytes:.2f} GB; "
          f"best and median of {args.repeats}")
    print(f"{'':12} {'without':>9} {'with':>9} {'ratio':>6} {'median ratio':>13}")
    for what, base, new in (("save", "save: Orbax only", "save: flaxlazy"),
                            ("read", "read: unchecked", "read: checked")):
        print(f"{what:12} {best[base]:8.2f}s {best[new]:8.2f}s {best[new] / best[base]:5.2f}x "
              f"{med[new] / med[base]:12.2f}x")
    crc, check = best["crc32 alone"], best["check alone"]
    print(f"checksum work alone: {crc:.2f}s at save ({gbytes / crc:.1f} GB/s, "
          f"{crc / best['save: Orbax only']:.0%} of a save, overlapped with Orbax's write), "
          f"{check:.2f}s at read ({check / best['read: unchecked']:.0%} of a read)")


if __name__ == "__main__":
    main()
