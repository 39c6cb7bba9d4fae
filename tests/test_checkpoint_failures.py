"""Failed saves and reads: the previous checkpoint kept, one clear error, no Orbax noise.

Orbax's threads log a failure again with its traceback, and TensorStore callbacks that
finish after Orbax closed its event loop report "Event loop is closed"; flaxlazy's
error is the whole report.
"""

import contextlib
import errno
import gc
import logging
import os
import re
import sys
import time

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy

resource = pytest.importorskip("resource")
signal = pytest.importorskip("signal")

OLD = {"w": np.arange(16.0, dtype=np.float32), "step": 3}


def _target(tree):
    return jax.eval_shape(lambda: tree)


def _orbax_records(caplog):
    return [r for r in caplog.records
            if r.levelno >= logging.WARNING and f"{os.sep}orbax{os.sep}" in r.pathname]


@contextlib.contextmanager
def _small_files():
    """Files this process writes may not exceed 64 KiB: writing more fails with EFBIG."""
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no file size limits here")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def test_failed_write_keeps_previous_checkpoint_and_is_quiet(tmp_path, capfd, caplog):
    # Like a full disk: Orbax's writer threads fail midway through the new checkpoint.
    path = tmp_path / "ckpt"
    flaxlazy.save(path, OLD)
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal((256, 256), dtype=np.float32) for k in "abc"}
    capfd.readouterr()
    caplog.set_level(logging.INFO)
    with _small_files():
        with pytest.raises(OSError, match=rf"writing the checkpoint for {re.escape(str(path))} "
                                          r"failed: File too large\. Nothing at .* changed") as e:
            flaxlazy.save(path, new, force=True)
    assert e.value.errno == errno.EFBIG
    assert os.listdir(tmp_path) == ["ckpt"]  # its staging folder removed, the old one kept
    chex.assert_trees_all_equal(flaxlazy.restore(path, _target(OLD)), OLD)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err
    assert not _orbax_records(caplog), [r.getMessage()[:200] for r in _orbax_records(caplog)]


def test_damaged_read_reports_only_its_error(tmp_path, capfd, caplog, monkeypatch):
    # Reads of 8 shards per array, several failing at once: the first failure ends
    # Orbax's event loop while TensorStore still completes the others.
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    tree = {f"k{i}": jax.device_put(rng.standard_normal((512, 256), dtype=np.float32),
                                    NamedSharding(mesh, P("data"))) for i in range(4)}
    path = tmp_path / "ckpt"
    flaxlazy.save(path, tree)
    data = sorted((os.path.join(r, f) for r, _, fs in os.walk(path / "d") for f in fs),
                  key=os.path.getsize)
    for f in data[-3:]:
        os.remove(f)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    caplog.set_level(logging.INFO)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
              for k, v in tree.items()}
    for _ in range(3):
        with pytest.raises(ValueError, match=rf"checkpoint at {re.escape(str(path))} is "
                                             r"damaged or incomplete: .*k\d"):
            flaxlazy.restore(path, target)
    time.sleep(0.2)  # TensorStore's last callbacks
    gc.collect()
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    assert not _orbax_records(caplog)
