"""Pretrained Llama weights from safetensors shards: load time and peak host RSS, 3 ways.

Each size's bfloat16 checkpoint is written once by this script, in Hugging Face's layout
(PyTorch names, ``[out, in]``, shards of about 2 GB with a ``model.safetensors.index.json``),
then loaded into the NNX Llama of ``examples/load_pretrained.py`` (bfloat16 parameters),
on 1 device and on a ``data`` x ``model`` mesh of 8 simulated CPU devices, each load in
a fresh process:

* ``flaxlazy``: ``flaxlazy.materialize(..., initializers={"**":
  flaxlazy.from_safetensors(path, rename=flaxlazy.LLAMA_HF)})``: each device's shard
  copied out of the memory-mapped file through the transform;
* ``load_file``: ``safetensors.numpy.load_file`` of every shard, then each parameter
  transposed and reshaped on the host and ``jax.device_put`` with its target sharding;
* ``get_tensor``: the NNX model zoos' loop: per parameter ``safe_open(...).get_tensor``,
  host transpose and reshape, ``jax.device_put(x, NamedSharding)``.

Time counts from the model's shapes (an abstract init, which every method needs) to every
array ready, the median of ``--repeat`` runs interleaved; peak RSS is the process's peak
above its RSS after imports (``measure.Memory``), the highest of the runs, and ``x params``
divides it by the parameter bytes. A method whose peak would not fit the
machine (``load_file`` at 7B: the whole checkpoint on the host plus the placed copy) is
not started, and a size whose checkpoint does not fit the free disk is not written.

    python benchmarks/load_pretrained.py                    # small (~0.2B), 1 and 8 devices
    python benchmarks/load_pretrained.py --sizes small,1b   # and a ~1.1B (2.2 GB)
    python benchmarks/load_pretrained.py --sizes 7b         # Llama-2-7B: 13.5 GB on disk
    python benchmarks/load_pretrained.py --keep             # keep the checkpoints after
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

# name: (vocab, d_model, layers, heads, kv_heads, hidden)
SIZES = {
    "small": (32000, 1024, 12, 16, 16, 2816),  # 0.24B
    "1b": (32000, 2048, 22, 32, 4, 5632),  # TinyLlama-1.1B's shape
    "7b": (32000, 4096, 32, 32, 32, 11008),  # Llama-2-7B's shape
}
METHODS = ("flaxlazy", "load_file", "get_tensor")
SHARD_BYTES = 2 << 30
FIT = 0.80  # of the machine's memory: a method runs only if its estimate stays below
_FLAG = "--xla_force_host_platform_device_count"


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _config(size: str):
    import load_pretrained as example

    return example.Config(*SIZES[size])


def _param_bytes(size: str) -> int:
    v, d, n, h, kv, f = SIZES[size]
    hd = d // h
    layer = d * h * hd * 2 + 2 * d * kv * hd + 3 * d * f + 2 * d
    return 2 * (2 * v * d + d + n * layer)


def write(path: str, size: str) -> None:
    """The checkpoint, written shard by shard (bfloat16; values from a random pool)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    cfg = _config(size)
    os.makedirs(path, exist_ok=True)
    pool = np.random.default_rng(0).standard_normal(1 << 24, np.float32)
    pool = (0.02 * pool).astype(ml_dtypes.bfloat16)
    hd = cfg.d_model // cfg.heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab, cfg.d_model)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (cfg.d_model,),
                   p + "self_attn.q_proj.weight": (cfg.heads * hd, cfg.d_model),
                   p + "self_attn.k_proj.weight": (cfg.kv_heads * hd, cfg.d_model),
                   p + "self_attn.v_proj.weight": (cfg.kv_heads * hd, cfg.d_model),
                   p + "self_attn.o_proj.weight": (cfg.d_model, cfg.heads * hd),
                   p + "post_attention_layernorm.weight": (cfg.d_model,),
                   p + "mlp.gate_proj.weight": (cfg.hidden, cfg.d_model),
                   p + "mlp.up_proj.weight": (cfg.hidden, cfg.d_model),
                   p + "mlp.down_proj.weight": (cfg.d_model, cfg.hidden)}
    shapes |= {"model.norm.weight": (cfg.d_model,), "lm_head.weight": (cfg.vocab, cfg.d_model)}
    groups, current, nbytes = [], [], 0
    for key, shape in shapes.items():
        size_ = math.prod(shape) * 2
        if current and nbytes + size_ > SHARD_BYTES:
            groups.append(current)
            current, nbytes = [], 0
        current.append(key)
        nbytes += size_
    groups.append(current)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    offset = 0
    for name, group in zip(names, groups, strict=True):
        tensors = {}
        for key in group:
            n = math.prod(shapes[key])
            start = offset % (pool.size - n) if n < pool.size else 0
            offset += 7919
            flat = pool[start:start + n] if n <= pool.size else np.resize(pool, n)
            tensors[key] = flat.reshape(shapes[key])
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())},
             "weight_map": {k: n for n, g in zip(names, groups, strict=True) for k in g}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)


# --------------------------------------------------------------------------
# One measurement (a child process).


def _targets(example, cfg, mesh, dtype):
    """The abstract model (shapes and shardings), its state, and per parameter the
    checkpoint key(s) and host transform: what both baselines need."""
    from flax import nnx

    import flaxlazy

    kw = {"mesh": mesh, "partition_rules": example.partition_rules(False)} if mesh else {}
    abstract = flaxlazy.abstract_init(example.Llama, cfg, param_dtype=dtype,
                                      rngs=nnx.Rngs(0), **kw)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    return graphdef, state, flat


def _place(example, name, x, target, dtype):
    import jax

    x = example._naive_transform(name, x, target.shape)
    return jax.device_put(x.astype(dtype, copy=False), target.sharding)


def run(method: str, path: str, size: str, devices: int) -> dict:
    import jax
    import load_pretrained as example
    import measure
    import ml_dtypes
    from flax import nnx

    import flaxlazy

    cfg, dtype = _config(size), ml_dtypes.bfloat16
    mesh = example.make_mesh((2, 4)) if devices == 8 else None
    memory = measure.Memory()
    memory.reset()
    start = time.perf_counter()
    if method == "flaxlazy":
        kw = {"mesh": mesh, "partition_rules": example.partition_rules(False)} if mesh else {}
        model = flaxlazy.materialize(example.Llama, cfg, param_dtype=dtype, rngs=nnx.Rngs(0),
                                     initializers={"**": flaxlazy.from_safetensors(
                                         path, rename=flaxlazy.LLAMA_HF)}, **kw)
        out = nnx.state(model)
    else:
        graphdef, state, flat = _targets(example, cfg, mesh, dtype)
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if f.endswith(".safetensors")]
        if method == "load_file":
            from safetensors.numpy import load_file

            tensors = {}
            for file in files:
                tensors.update(load_file(file))
            for key_path, var in flat.items():
                name = "/".join(str(k) for k in key_path)
                var.set_value(_place(example, name, tensors[example._naive_key(name)],
                                     var.get_value(), dtype))
            del tensors
            out = state
        else:
            out = nnx.state(example.load_naively(pathlib.Path(path), nnx.merge(graphdef, state),
                                                 dtype))
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out))
    return {"method": method, "size": size, "devices": devices, "seconds": seconds,
            "peak_rss": memory.peak(), "param_bytes": params}


# --------------------------------------------------------------------------
# The driver.


def _estimate(method: str, size: str) -> int:
    """A method's expected peak RSS: the parameters, plus the whole checkpoint on the
    host for load_file."""
    params = _param_bytes(size)
    return params * (2 if method == "load_file" else 1) + (1 << 30)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="small", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--devices", default="1,8", help="device counts to load onto")
    parser.add_argument("--methods", default=",".join(METHODS), help="the ways to load")
    parser.add_argument("--dir", default=os.path.join(ROOT, "checkpoints", "load_pretrained"),
                        help="where the checkpoints are written (one folder per size)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each method (the median time is reported)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints after")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "load_pretrained.json"),
                        help="the results file")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one measurement
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.run:
        print(json.dumps(run(args.run, args.dir, args.sizes, int(args.devices))))
        return []
    results, total = [], _mem_total()
    for size in args.sizes.split(","):
        path = os.path.join(args.dir, f"llama-{size}-bf16")
        need = _param_bytes(size)
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            free = shutil.disk_usage(os.path.dirname(path) if os.path.exists(
                os.path.dirname(path)) else ROOT).free
            if free < need + (2 << 30):
                print(f"{size}: not written: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB "
                      "free on disk")
                continue
            t0 = time.perf_counter()
            write(path, size)
            print(f"{size}: wrote {need / 1e9:.2f} GB to {path} in "
                  f"{time.perf_counter() - t0:.0f} s")
        for devices in (int(n) for n in args.devices.split(",")):
            runs: dict[str, list[dict]] = {m: [] for m in args.methods.split(",")}
            for _ in range(args.repeat):  # interleaved, so that load drifts hit all alike
                for method in runs:
                    runs[method].append(_measure(method, size, devices, path, total))
            for rows in runs.values():
                row = _summary(rows)
                results.append(row)
                _print(row)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


def _measure(method: str, size: str, devices: int, path: str, total: int) -> dict:
    """One measurement in a fresh process (or why it was not made)."""
    row = {"method": method, "size": size, "devices": devices}
    if _estimate(method, size) > FIT * total:
        row["skipped"] = (f"needs about {_estimate(method, size) / 1e9:.0f} GB, the machine "
                          f"has {total / 1e9:.0f} GB")
        return row
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_FLAG}={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(
        [sys.executable, __file__, "--run", method, "--sizes", size, "--devices", str(devices),
         "--dir", path], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        row["failed"] = done.stderr.strip().splitlines()[-1:]
        return row
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(rows: list[dict]) -> dict:
    """The median time and the highest peak of a method's runs."""
    done = [r for r in rows if "seconds" in r]
    if not done:
        return rows[0]
    out = dict(done[0])
    out["seconds"] = sorted(r["seconds"] for r in done)[(len(done) - 1) // 2]
    out["peak_rss"] = max(r["peak_rss"] for r in done)
    out["runs"] = [round(r["seconds"], 3) for r in done]
    return out


def _print(row: dict) -> None:
    head = f"{row['size']:>5s} {row['devices']} dev  {row['method']:<10s}"
    if "seconds" not in row:
        print(f"{head}  {row.get('skipped') or row.get('failed')}")
        return
    gb = row["peak_rss"] / 1e9
    ratio, params = row["peak_rss"] / row["param_bytes"], row["param_bytes"] / 1e9
    print(f"{head}  {row['seconds']:7.2f} s  peak RSS {gb:6.2f} GB  {ratio:.2f} x params "
          f"({params:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
