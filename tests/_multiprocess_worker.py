"""One process of the multi-process test (``test_multiprocess.py`` starts two).

Run as ``python _multiprocess_worker.py PROCESS_ID PORT OUT.json [WEIGHTS.safetensors]``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu``: it joins
the other process with ``jax.distributed.initialize`` on 127.0.0.1, builds the global
8-device mesh, materializes ``Model`` directly in its shards through the plan and the
engine, checks that this process holds only its own (addressable) shards, and writes a
checksum per shard to ``OUT.json``. With ``WEIGHTS``, it then loads the parameters from
that Hugging Face-layout file with ``flaxlazy.from_safetensors`` (``RENAME``), and
reports their shards and every box it read from the file.

Importing this module (as the test does, for the model, the rules and the checksums)
runs nothing.
"""

import hashlib
import json
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from plans import plan_of

import flaxlazy
from flaxlazy._src import engine
from flaxlazy._src import paths
from flaxlazy._src import sharding as sharding_lib

NUM_PROCESSES = 2
MESH_SHAPE = (2, 4)  # 'data' spans the two processes, 'model' the devices of one
MESH_AXES = ("data", "model")
SPEC = flaxlazy.spec("f32[4,16]")
SEED = 0

RULES = [
    ("embed/kernel", P("data", "model")),
    ("head/kernel", P("model", None)),
    ("batch_stats/**", P("model")),
    ("**", None),  # keep the Flax annotations of the scanned block
    ("**", P()),
]
LOGICAL_AXIS_RULES = [("layers", None), ("embed", "data"), ("mlp", "model")]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        bias = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp",))
        h = nn.relu(nn.Dense(64, kernel_init=kernel, bias_init=bias)(x))
        kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        return x + nn.Dense(32, kernel_init=kernel)(h), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="embed")(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(8, name="head")(x)


# The parameters in a Hugging Face-like layout: kernels stored [out, in] (PyTorch), the
# scan stack's layer i under ``layers.{i}.``, everything else at its path with dots.
RENAME = [
    (r"layers/(\w+)/kernel", r"layers.{layer}.\1.weight", "T"),
    (r"layers/(\w+)/bias", r"layers.{layer}.\1.bias"),
    (r"(\w+)/kernel", r"\1.weight", "T"),
]


def hf_key(path: str, layer: int | None = None) -> str:
    """The checkpoint key ``RENAME`` reads parameter ``path`` (``"params/..."``) from; for
    the scan stack, its layer ``layer``'s."""
    parts = path.split("/")[1:]  # inside the params collection
    name = ".".join(parts[:-1] + ["weight" if parts[-1] == "kernel" else parts[-1]])
    return name if layer is None else name.replace("layers.", f"layers.{layer}.", 1)


def is_stacked(path: str) -> bool:
    """Whether parameter ``path`` is the scan stack's, stored one tensor per layer."""
    return path.split("/")[1] == "layers"


def hf_tensors(params: dict) -> dict:
    """``{checkpoint key: tensor}`` that ``RENAME`` loads back as ``params``
    (``{"params/...": array}``): kernels stored transposed, the stack per layer."""
    out = {}
    for path, value in params.items():
        stored = (lambda x: x.T) if path.endswith("/kernel") else (lambda x: x)
        if is_stacked(path):
            for i, layer in enumerate(value):
                out[hf_key(path, i)] = np.ascontiguousarray(stored(layer))
        else:
            out[hf_key(path)] = np.ascontiguousarray(stored(value))
    return out


def load_weights(mesh: Mesh, weights: str) -> dict:
    """``Model``'s parameters read from ``weights`` in this process's shards: a checksum
    per shard held, and ``reads``: ``{key: [elements of each box read]}``."""
    from flaxlazy._src.sources.from_safetensors import shards as shards_lib

    reads: dict[str, list[int]] = {}
    read = shards_lib._read

    def counting(opened, tensor, steps, shape, box):
        out = read(opened, tensor, steps, shape, box)
        reads.setdefault(tensor.key, []).append(int(out.size))
        return out

    shards_lib._read = counting
    try:
        variables = flaxlazy.materialize(
            Model(), jax.random.key(SEED), SPEC, mesh=mesh, partition_rules=RULES,
            logical_axis_rules=LOGICAL_AXIS_RULES,
            initializers={"**": flaxlazy.from_safetensors(weights, rename=RENAME, strict=True)},
        )
    finally:
        shards_lib._read = read
    return {"leaves": held_shards(variables, requested_shardings(mesh), "params/"),
            "reads": reads}


def held_shards(variables, requested: dict, prefix: str = "") -> dict:
    """``{path: {"shape", "spec", "shards": {index: checksum}}}`` of this process's shards,
    checking each leaf is placed as requested and holds only this process's devices."""
    local = set(jax.local_devices())
    leaves = {}
    for path, array in leaf_arrays(variables).items():
        if not path.startswith(prefix):
            continue
        sharding = requested[path]
        assert array.sharding == sharding, (path, array.sharding, sharding)
        shards = array.addressable_shards
        assert {s.device for s in shards} == local, path  # only this process's devices
        assert not array.is_fully_addressable, path
        shard_shape = sharding.shard_shape(array.shape)
        sums = {}
        for shard in shards:
            assert shard.data.shape == shard_shape, (path, shard.data.shape, shard_shape)
            text, value = index_text(shard.index), checksum(np.asarray(shard.data))
            assert sums.setdefault(text, value) == value, path  # replicas agree
        leaves[path] = {"shape": list(array.shape), "spec": str(sharding.spec), "shards": sums}
    return leaves


def make_mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices).reshape(MESH_SHAPE), MESH_AXES)


def requested_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    shapes = flaxlazy.abstract_init(Model(), jax.random.key(SEED), SPEC)
    specs = sharding_lib.partition_specs(
        shapes, mesh, partition_rules=RULES, logical_axis_rules=LOGICAL_AXIS_RULES
    )
    return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}


def index_text(index: tuple) -> str:
    """A shard's index (a tuple of slices) as text, e.g. ``"0:2,8:16"``."""
    return ",".join(f"{s.start or 0}:{'' if s.stop is None else s.stop}" for s in index)


def checksum(block: np.ndarray) -> dict:
    block = np.ascontiguousarray(block)
    return {
        "sum": float(block.astype(np.float64).sum()),
        "sha256": hashlib.sha256(block.tobytes()).hexdigest(),
    }


def leaf_arrays(variables) -> dict:
    return {path: nn.meta.unbox(leaf) for path, leaf in paths.flatten(variables)[0]}


def main(process_id: int, port: int, out_path: str, weights: str | None = None) -> None:
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
        process_id=process_id, initialization_timeout=40,
    )
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    mesh = make_mesh(jax.devices())
    requested = requested_shardings(mesh)

    key = jax.random.key(SEED)
    plan = plan_of(Model(), key, SPEC, shardings=lambda path, leaf: requested[path])
    variables = engine.execute(plan, key, [SPEC])

    report = {"process_index": jax.process_index(), "sources": plan.counts(),
              "leaves": held_shards(variables, requested)}
    if weights:
        report["weights"] = load_weights(mesh, weights)
    with open(out_path, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
