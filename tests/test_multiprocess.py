"""Multi-process: two local processes with 4 CPU devices each, one global 8-device mesh.

Each process (``_multiprocess_worker.py``) materializes the model in its own shards and
writes a checksum per shard; here they are compared with the same model initialized in
this single process. A second run loads Hugging Face-layout weights with
``from_safetensors``: each process reads only the boxes of its own shards. The
processes are killed on failure or after ``TIMEOUT_S``.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multiprocess_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlazy

pytestmark = pytest.mark.slow  # fresh processes: run with -m slow

TIMEOUT_S = 45
WORKER = Path(__file__).with_name("_multiprocess_worker.py")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_workers(tmp_path: Path, *extra: str) -> list[dict]:
    """Starts both processes (``extra``: more worker arguments), waits for them (killing
    both on failure), reads reports."""
    port, env = free_port(), worker_env()
    outs = [tmp_path / f"process_{i}.json" for i in range(worker.NUM_PROCESSES)]
    logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(worker.NUM_PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out), *extra],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        for i, (out, log) in enumerate(zip(outs, logs, strict=True))
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break  # a timeout, or one process failed: the other would wait forever
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = []
        for i, log in enumerate(logs):
            log.seek(0)
            lines = [x for x in log.read().splitlines() if not x.startswith("[Gloo]")]
            tails.append(f"--- process {i} (exit {codes[i]}) ---\n" + "\n".join(lines[-25:]))
        timed_out = time.monotonic() > deadline
        pytest.fail(
            (f"timed out after {TIMEOUT_S}s; " if timed_out else "")
            + f"workers exited with {codes}:\n" + "\n".join(tails)
        )
    for log in logs:
        log.close()
    return [json.loads(out.read_text()) for out in outs]


@pytest.fixture(scope="module")
def single_process_reference():
    """The same variables, initialized in this process: ``{path: full np.ndarray}``."""
    model = worker.Model()
    x = jnp.zeros(worker.SPEC.shape, worker.SPEC.dtype)
    variables = jax.jit(model.init)(jax.random.key(worker.SEED), x)
    return {path: np.asarray(a) for path, a in worker.leaf_arrays(variables).items()}


def test_two_processes_materialize_only_their_shards(tmp_path, single_process_reference):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices here to lay out the reference mesh")
    reports = run_workers(tmp_path)
    assert sorted(r["process_index"] for r in reports) == [0, 1]
    assert "traced" not in reports[0]["sources"]  # the scan stack too: a key per layer

    # The shards each process should hold, from the same mesh laid out here.
    requested = worker.requested_shardings(local_mesh())
    assert set(reports[0]["leaves"]) == set(single_process_reference) == set(requested)
    split = check_shards([r["leaves"] for r in reports], single_process_reference, requested)
    assert split >= 3  # embed/kernel, and the 'embed'-split layers of the scan stack


def local_mesh():
    return worker.make_mesh(jax.devices()[:8])


def owners(sharding, shape: tuple, mesh) -> dict[str, set[int]]:
    """Each shard's index (as text) -> the processes holding it (process 0: the mesh's
    first row of devices, as in the workers)."""
    out: dict[str, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        process = 0 if device in mesh.devices[0] else 1
        out.setdefault(worker.index_text(index), set()).add(process)
    return out


def check_shards(held_by_process: list[dict], full: dict, requested: dict) -> int:
    """Each process holds exactly its shards of every leaf in ``held_by_process[p]``, each
    equal to the same slice of ``full[path]``; returns how many leaves are split between
    the processes."""
    mesh, split = local_mesh(), 0
    for path in held_by_process[0]:
        value, sharding = full[path], requested[path]
        by_index = owners(sharding, value.shape, mesh)
        expected_by_index = {
            worker.index_text(index): worker.checksum(value[index])
            for index in sharding.devices_indices_map(value.shape).values()
        }
        for p, leaves in enumerate(held_by_process):
            leaf = leaves[path]
            assert leaf["shape"] == list(value.shape) and leaf["spec"] == str(sharding.spec)
            held = leaf["shards"]
            assert set(held) == {k for k, procs in by_index.items() if p in procs}, path
            for index, got in held.items():
                want = expected_by_index[index]
                assert got["sha256"] == want["sha256"], (path, index, got, want)
                np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-6)
        if any(len(procs) == 1 for procs in by_index.values()):
            split += 1  # some shard of this leaf lives in one process only
    return split


def test_two_processes_load_safetensors_reading_only_their_shards(tmp_path):
    # Hugging Face-layout weights (kernels [out, in], the scan stack one tensor per layer):
    # each process reads from the file only the boxes its own devices hold, each once.
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices here to lay out the reference mesh")
    from safetensors.numpy import save_file

    requested = worker.requested_shardings(local_mesh())
    rng = np.random.default_rng(0)
    params = {path: rng.standard_normal(leaf.shape).astype(np.float32)
              for path, leaf in shapes_of_params().items()}
    weights = tmp_path / "model.safetensors"
    save_file(worker.hf_tensors(params), str(weights))
    reports = run_workers(tmp_path, str(weights))

    loaded = [r["weights"] for r in reports]
    split = check_shards([w["leaves"] for w in loaded], params, requested)
    assert split >= 3
    mesh = local_mesh()
    for p, report in enumerate(loaded):
        want = {}  # key -> elements of the distinct boxes this process holds, per tensor
        for path, value in params.items():
            boxes = {k for k, procs in owners(requested[path], value.shape, mesh).items()
                     if p in procs}
            for text in boxes:
                box = [tuple(int(x) if x else n for x, n in zip(part.split(":"), (0, dim),
                                                                strict=True))
                       for part, dim in zip(text.split(","), value.shape, strict=True)]
                sizes = [stop - start for start, stop in box]
                for key, elements in box_reads(path, box, sizes):
                    want.setdefault(key, []).append(elements)
        got = report["reads"]
        assert set(got) == set(want) == set(worker.hf_tensors(params)), p
        for key in want:
            assert sorted(got[key]) == sorted(want[key]), (p, key, got[key], want[key])


def shapes_of_params() -> dict:
    shapes = flaxlazy.abstract_init(worker.Model(), jax.random.key(worker.SEED), worker.SPEC)
    return {path: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
            for path, leaf in worker.leaf_arrays(shapes).items() if path.startswith("params/")}


def box_reads(path: str, box: list[tuple[int, int]], sizes: list[int]):
    """The checkpoint keys a box of ``path`` is read from, with the elements of each read:
    one read of the box, or for the scan stack one per layer in it, of the rest."""
    if worker.is_stacked(path):
        rest = int(np.prod(sizes[1:]))
        for i in range(*box[0]):
            yield worker.hf_key(path, i), rest
    else:
        yield worker.hf_key(path), int(np.prod(sizes))
