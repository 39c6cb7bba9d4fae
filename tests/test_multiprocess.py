"""Multi-process: two local processes with 4 CPU devices each, one global 8-device mesh.

Each process (``_multiprocess_worker.py``) materializes the model in its own shards and
writes a checksum per shard; here they are compared with the same model initialized in
this single process. The processes are killed on failure or after ``TIMEOUT_S``.
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


def run_workers(tmp_path: Path) -> list[dict]:
    """Starts both processes, waits for them (killing both on failure), reads reports."""
    port, env = free_port(), worker_env()
    outs = [tmp_path / f"process_{i}.json" for i in range(worker.NUM_PROCESSES)]
    logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(worker.NUM_PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out)],
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
    local_mesh = worker.make_mesh(jax.devices()[:8])
    requested = worker.requested_shardings(local_mesh)
    assert set(reports[0]["leaves"]) == set(single_process_reference) == set(requested)
    split = 0
    for path, full in single_process_reference.items():
        sharding = requested[path]
        owners = {}  # shard index -> the processes that hold it
        for i, device_index in sharding.devices_indices_map(full.shape).items():
            process = 0 if i in local_mesh.devices[0] else 1
            owners.setdefault(worker.index_text(device_index), set()).add(process)
        expected_by_index = {
            worker.index_text(index): worker.checksum(full[index])
            for index in sharding.devices_indices_map(full.shape).values()
        }
        for p, report in enumerate(reports):
            leaf = report["leaves"][path]
            assert leaf["shape"] == list(full.shape) and leaf["spec"] == str(sharding.spec)
            held = leaf["shards"]
            assert set(held) == {k for k, procs in owners.items() if p in procs}, path
            for index, got in held.items():
                want = expected_by_index[index]
                assert got["sha256"] == want["sha256"], (path, index, got, want)
                np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-6)
        if any(len(procs) == 1 for procs in owners.values()):
            split += 1  # some shard of this leaf lives in one process only
    assert split >= 3  # embed/kernel, and the 'embed'-split layers of the scan stack
