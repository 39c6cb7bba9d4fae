"""Checkpoints that fail loudly: atomic overwrite, checksums, damaged files, bad arguments."""

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flaxlazy
from flaxlazy._src.checkpoint import folders
from flaxlazy._src.checkpoint import integrity
from flaxlazy._src.checkpoint import orbax_io

# A failed Orbax read leaves coroutines that were never awaited (an Orbax quirk): they are
# collected after each test here, and their "exception ignored" reports are not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
    yield
    gc.collect()


OLD = {"params": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}, "step": 7}
NEW = {"params": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, "step": 8}
X = flaxlazy.spec("f32[1,2]")


def _target(tree):
    return jax.eval_shape(lambda: tree)


def _assert_holds(path, tree):
    chex.assert_trees_all_equal(flaxlazy.restore(path, _target(tree)), tree)


def _files(path):
    found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    return sorted(found, key=os.path.getsize)


def _flip_middle(path, n=16):
    """Flips ``n`` bytes in the middle of the largest file under ``path`` (array data)."""
    largest = _files(path)[-1]
    with open(largest, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
        f.seek(0)
        f.write(data)
    return largest


def _mesh(n):
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices")
    return Mesh(np.array(jax.devices()[:n]), ("data",))


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    flaxlazy.save(path, OLD)
    return path


# ------------------------------------------------------------------ atomic overwrite
def _fail_orbax_write(monkeypatch, tree):
    # Orbax fails mid-write on a deleted array (after creating its temporary directory).
    monkeypatch.setattr(integrity, "record", lambda flat: {})
    gone = jnp.ones(3)
    gone.delete()
    return {**tree, "gone": gone}, RuntimeError


def _fail_after_write(monkeypatch, tree):
    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(integrity, "write", disk_full)
    return tree, OSError


def _fail_rename(monkeypatch, tree):
    # The rename that puts the new checkpoint at the path fails: the swap, or (without
    # it) the rename in after the old checkpoint was moved aside.
    rename, rename2 = os.rename, folders._rename2

    def placing(src, dst):
        return (os.path.basename(src) == folders.NEW and folders.STAGING
                in os.path.basename(os.path.dirname(src)) and not os.path.lexists(dst))

    def fake_rename(src, dst):
        if placing(src, dst):
            raise PermissionError("rename refused")
        return rename(src, dst)

    def fake_rename2(src, dst, flags):
        swap = flags == folders._RENAME_EXCHANGE and folders._renameat2
        if placing(src, dst) or (swap and folders.STAGING in src):
            raise PermissionError("rename refused")
        return rename2(src, dst, flags)

    monkeypatch.setattr(os, "rename", fake_rename)
    monkeypatch.setattr(folders, "_rename2", fake_rename2)
    return tree, PermissionError


def _unsupported_leaf(monkeypatch, tree):
    return {**tree, "params": {**tree["params"], "note": object()}}, TypeError


@pytest.fixture(params=["swap", "two-renames"])
def renames(request, monkeypatch):
    """Linux swaps the old checkpoint out in one rename; elsewhere, two renames."""
    if request.param == "swap" and folders._renameat2 is None:
        pytest.skip("no renameat2 here")
    if request.param == "two-renames":
        monkeypatch.setattr(folders, "_renameat2", None)
    return request.param


@pytest.mark.parametrize(
    "fail", [_unsupported_leaf, _fail_orbax_write, _fail_after_write, _fail_rename],
    ids=["unsupported-leaf", "orbax-write", "after-write", "rename"],
)
def test_failed_overwrite_keeps_old_checkpoint(ckpt, monkeypatch, fail, renames):
    tree, error = fail(monkeypatch, NEW)
    with pytest.raises(error):
        flaxlazy.save(ckpt, tree, force=True)
    monkeypatch.undo()
    if renames == "two-renames":
        monkeypatch.setattr(folders, "_renameat2", None)
    assert os.listdir(ckpt.parent) == ["ckpt"]  # no temporary directories left
    _assert_holds(ckpt, OLD)
    flaxlazy.save(ckpt, NEW, force=True)  # and the next save works
    _assert_holds(ckpt, NEW)
    assert os.listdir(ckpt.parent) == ["ckpt"]


def test_unsupported_leaf_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"leaf 'params/note' is of type object"):
        flaxlazy.save(tmp_path / "ckpt", {"params": {"w": jnp.ones(2), "note": object()}})
    assert not os.listdir(tmp_path)


def test_interrupted_save_is_recovered(ckpt):
    # Killed between its two renames (where the filesystem cannot swap): the old
    # checkpoint moved into the save's own folder, the complete new one beside it.
    folder = f"{ckpt}{folders.STAGING}-123-0000abcd"
    os.mkdir(folder)
    aside = os.path.join(folder, f"{folders.OLD}-0")
    os.rename(ckpt, aside)
    flaxlazy.save(os.path.join(folder, folders.NEW), NEW)
    with pytest.raises(FileNotFoundError, match=re.escape(f"previous checkpoint at {aside}")):
        flaxlazy.restore(ckpt, _target(OLD))
    with pytest.raises(FileExistsError, match="force=True"):  # the old one is back first
        flaxlazy.save(ckpt, NEW)
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt", os.path.basename(folder)]
    _assert_holds(ckpt, OLD)


# ------------------------------------------------------------------------ checksums
@pytest.mark.parametrize("values", ["smooth", "random"])
def test_flipped_bytes_are_detected(tmp_path, values):
    # Smooth values compress well and zstd decodes the flipped stream to other numbers
    # without an error (only the checksum sees it); random ones fail zstd's own check.
    rng = np.random.default_rng(0)
    data = {"smooth": np.arange(256 * 256, dtype=np.float32).reshape(256, 256),
            "random": rng.standard_normal((256, 256), dtype=np.float32)}[values]
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"params": {"w": jnp.asarray(data), "b": jnp.ones(2)}})
    _flip_middle(path)
    match = rf"checkpoint at {re.escape(str(path))} is damaged .*entry 'params/w'"
    with pytest.raises(ValueError, match=match):
        flaxlazy.restore(path, {"params": {"w": jax.ShapeDtypeStruct(data.shape, data.dtype)}})
    # Entries that are intact still read.
    assert orbax_io.read(path, {"params/b": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_sharded_save_checked_in_any_layout(tmp_path):
    # 8 shards (8 checksummed blocks) of 1 MiB in all, read back three ways.
    mesh = _mesh(8)
    data = np.arange(1024 * 256, dtype=np.float32).reshape(1024, 256)
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"w": jax.device_put(data, NamedSharding(mesh, P("data")))})
    assert len(integrity.load(str(path))["w"][2]) == 8
    for sharding in (None, NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())):
        got = orbax_io.read(path, {"w": jax.ShapeDtypeStruct(data.shape, data.dtype,
                                                               sharding=sharding)})
        chex.assert_trees_all_equal(np.asarray(got["w"]), data)
    _flip_middle(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} .*entry 'w'"):
        orbax_io.read(path, {"w": jax.ShapeDtypeStruct(data.shape, data.dtype)})


def test_block_read_partly_here_is_read_whole(tmp_path):
    # Another process reads the rest of a saved block: it is read from the checkpoint.
    mesh = _mesh(2)
    data = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    path = str(tmp_path / "ckpt")
    flaxlazy.save(path, {"w": jax.device_put(data, NamedSharding(mesh, P("data")))})
    digest = integrity.load(path)["w"]
    assert sorted(digest[2]) == [((0, 4), (0, 4)), ((4, 8), (0, 4))]
    with open(os.path.join(path, "_METADATA")) as f:
        reader = integrity.box_reader(path, json.load(f), "w", "w")
    np.testing.assert_array_equal(reader(((4, 8), (0, 4))), data[4:8])
    calls = []

    def read_box(box):
        calls.append(box)
        return reader(box)

    here = {((0, 2), (0, 4)): lambda: data[:2]}  # rows 0-1 only
    integrity.verify(path, "w", digest, here, read_box)
    assert calls == [((0, 4), (0, 4))]  # the block under rows 0-1, not the other one
    with pytest.raises(ValueError, match=r"entry 'w' differs from what was saved \(block \[0:4"):
        integrity.verify(path, "w", digest, here, lambda box: reader(box) + 1)


def test_wider_saved_dtype_is_checked(tmp_path):
    # numpy int64, read as jax int32 (x64 off): checked at int64, then cast.
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"ids": np.arange(5), "x": 1.5})
    got = orbax_io.read(path, orbax_io.entries(path))
    chex.assert_trees_all_equal(got, {"ids": jnp.arange(5), "x": jnp.float32(1.5)})


def test_plain_orbax_checkpoint_reads_unchecked(tmp_path):
    path = str(tmp_path / "plain")
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, {"w": np.arange(4.0, dtype=np.float32)})
    assert not os.path.exists(os.path.join(path, integrity.DIGESTS))
    got = flaxlazy.restore(path, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    chex.assert_trees_all_equal(got, {"w": jnp.arange(4.0)})


@pytest.mark.parametrize("loss", ["folder", "file"])
def test_lost_checksums_are_damage_not_an_unchecked_read(tmp_path, loss):
    # Flipped data and no checksums left to catch it: still not read silently.
    data = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"w": jnp.asarray(data)})
    with open(path / "_METADATA") as f:
        assert json.load(f)["custom_metadata"][integrity.MARKER]["process_count"] == 1
    if loss == "folder":
        shutil.rmtree(path / integrity.DIGESTS)
        detail = rf"it was saved by flaxlazy with checksums, but its {integrity.DIGESTS}/ folder"
    else:
        os.remove(path / integrity.DIGESTS / "process_0.json")
        detail = rf"{integrity.DIGESTS}/ lacks the checksum files of processes \[0\]"
    _flip_middle(path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged or incomplete: "
                                         rf"{detail}"):
        flaxlazy.restore(path, {"w": jax.ShapeDtypeStruct(data.shape, data.dtype)})


def test_stray_files_beside_checksums_are_ignored(tmp_path):
    tree = {"w": jnp.arange(256 * 256.0).reshape(256, 256), "step": 1}
    path = tmp_path / "ckpt"
    flaxlazy.save(path, tree)
    (path / integrity.DIGESTS / ".DS_Store").write_bytes(b"\x00\x01binary")
    (path / integrity.DIGESTS / "process_7.json").write_text("{not json")  # no process 7
    (path / integrity.DIGESTS / "notes.txt").write_text("copied by hand")
    _assert_holds(path, tree)
    _flip_middle(path)  # and the checks still run
    with pytest.raises(ValueError, match="entry 'w' differs from what was saved"):
        flaxlazy.restore(path, _target(tree))


def test_checksums_without_the_record_are_still_checked(tmp_path):
    # Saved before flaxlazy recorded its checksums in _METADATA: the folder is used.
    data = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    path = tmp_path / "ckpt"
    flaxlazy.save(path, {"w": jnp.asarray(data)})
    with open(path / "_METADATA") as f:
        info = json.load(f)
    del info["custom_metadata"][integrity.MARKER]
    (path / "_METADATA").write_text(json.dumps(info))
    chex.assert_trees_all_equal(orbax_io.read(path, orbax_io.entries(path))["w"], data)
    _flip_middle(path)
    with pytest.raises(ValueError, match="entry 'w' differs from what was saved"):
        orbax_io.read(path, orbax_io.entries(path))


# ------------------------------------------------------------------ damaged checkpoints
def _garbage_metadata(path):
    (path / "_METADATA").write_text("{not json")


def _no_manifest(path):
    os.remove(path / "manifest.ocdbt")


def _truncated_data(path):
    largest = _files(path)[-1]
    os.truncate(largest, os.path.getsize(largest) // 2)


def _no_metadata(path):
    os.remove(path / "_METADATA")


def _lost_checksum_file(path):
    os.remove(path / integrity.DIGESTS / "process_0.json")
    (path / integrity.DIGESTS / "process_1.json").write_text(
        json.dumps({"process": 1, "process_count": 2, "entries": {}})
    )


def _garbage_checksum_file(path):
    (path / integrity.DIGESTS / "process_0.json").write_text("\x00\x01")


DAMAGES = {
    "garbage-metadata": (_garbage_metadata, "_METADATA file is not valid JSON"),
    "no-manifest": (_no_manifest, r"manifest \(manifest.ocdbt\) is missing"),
    "truncated-data": (_truncated_data, "entry 'params/kernel'"),
    "no-metadata": (_no_metadata, "no _METADATA file"),
    "lost-checksums": (_lost_checksum_file, r"lacks the checksum files of processes \[0\]"),
    "garbage-checksums": (_garbage_checksum_file, "checksum file .*process_0.json is unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_has_one_clear_error(tmp_path, damage):
    big = {"params": {"kernel": jnp.arange(64 * 64.0).reshape(64, 64), "bias": jnp.ones(64)}}
    path = tmp_path / "ckpt"
    flaxlazy.save(path, big)
    damage_fn, detail = DAMAGES[damage]
    damage_fn(path)
    match = rf"checkpoint at {re.escape(str(path))} is damaged or incomplete: .*{detail}"
    with pytest.raises(ValueError, match=match):
        flaxlazy.restore(path, _target(big))
    with pytest.raises(ValueError, match=match):  # from_checkpoint: entries(), then read()
        flaxlazy.materialize(nn.Dense(64), jax.random.key(0), flaxlazy.spec("f32[1,64]"),
                             initializers={"**": flaxlazy.from_checkpoint(path)})
    if damage in ("garbage-metadata", "no-manifest", "no-metadata"):
        with pytest.raises(ValueError, match=match):
            orbax_io.entries(path)


def test_path_without_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flaxlazy.restore(tmp_path / "nothing", {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(FileNotFoundError, match="not an Orbax PyTree checkpoint"):
        orbax_io.entries(tmp_path)


# ------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"subtree": 3}, TypeError, r"`subtree` must be a string, got 3"),
        ({"rename": [("(", "x")]}, ValueError, r"`rename\[0\]`: the regex '\(' does not compile"),
        ({"rename": [("a/(.*)", r"b/\3")]}, ValueError,
         r"`rename\[0\]`: the replacement .* does not fit the regex 'a/\(\.\*\)': invalid "
         r"group reference 3.* groups: \\1"),
        ({"rename": [("(?P<x>a)", r"\g<name>")]}, ValueError,
         r"`rename\[0\]`: .*unknown group name 'name'.* groups: \\1, \\g<x>"),
        ({"rename": ("a", "b")}, TypeError,
         r"`rename\[0\]` must be a \(regex, replacement\) pair, got 'a'\. Maybe you wrote"),
        ({"rename": [("a", "b"), ("a", "b", "c")]}, ValueError,
         r"`rename\[1\]` must be a \(regex, replacement\) pair, got 3 items"),
        ({"rename": [("a", 1)]}, TypeError, r"`rename\[0\]` must hold two strings"),
        ({"rename": {"a": "b"}}, TypeError, r"`rename` must be a list .*list\(rename.items\(\)\)"),
    ],
)
def test_from_checkpoint_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        flaxlazy.from_checkpoint("ckpt", **kwargs)


def test_rename_groups_that_exist_are_fine():
    source = flaxlazy.from_checkpoint("ckpt", rename=[(r"(?P<m>enc)/(.*)", r"\g<m>oder/\2")])
    assert source.entry("enc/Dense_0/kernel") == "encoder/Dense_0/kernel"  # subtree: per framework
    assert source.with_default_subtree("params").entry("enc/Dense_0/kernel") == (
        "params/encoder/Dense_0/kernel")


@pytest.mark.parametrize(
    "leaf, shown",
    [(3, r"3 \(int\)"), ("kernel", r"'kernel' \(str\)"), (None, r"None \(NoneType\)")],
)
def test_restore_target_leaf_must_be_array_like(ckpt, leaf, shown):
    target = _target(OLD)
    target["params"]["bias"] = leaf
    with pytest.raises(TypeError, match=rf"target leaf 'params/bias' is {shown}, not an array"):
        flaxlazy.restore(ckpt, target)


def test_restore_keeps_none_where_nothing_was_saved(ckpt):
    target = {**_target(OLD), "extra": None}
    assert flaxlazy.restore(ckpt, target)["extra"] is None


# ----------------------------------------------------------------------------- warnings
def test_unused_entries_warning_points_at_the_caller(tmp_path):
    path = tmp_path / "ckpt"
    params = {"kernel": jnp.ones((2, 5)), "bias": jnp.zeros(5), "unused": jnp.ones(2)}
    flaxlazy.save(path, {"params": params})
    with pytest.warns(UserWarning, match=r"not used .*'params/unused'") as rec:
        flaxlazy.materialize(nn.Dense(5), jax.random.key(0), X,
                             initializers={"**": flaxlazy.from_checkpoint(path)})
    assert [w.filename for w in rec] == [__file__]


def test_unused_entries_left_out_on_purpose_are_silenced_with_strict_false(tmp_path):
    """A head re-initialized on purpose: strict=False reads the rest without a word;
    the default warning and strict=True's error both say so."""
    path = tmp_path / "ckpt"
    params = {"kernel": jnp.ones((2, 5)), "bias": jnp.zeros(5), "head": jnp.ones(2)}
    flaxlazy.save(path, {"params": params})
    model = lambda strict: flaxlazy.materialize(  # noqa: E731
        nn.Dense(5), jax.random.key(0), X,
        initializers={"**": flaxlazy.from_checkpoint(path, strict=strict)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(False)
    chex.assert_trees_all_equal(got["params"], {"kernel": params["kernel"],
                                                "bias": params["bias"]})
    with pytest.warns(UserWarning, match=r"on purpose \(a new head\), pass strict=False"):
        model(None)
    with pytest.raises(ValueError, match=r"'params/head'.*on purpose \(a new head\), pass "
                                         r"strict=False"):
        model(True)
    with pytest.raises(TypeError, match=r"`strict` must be None .* got 'yes'"):
        flaxlazy.from_checkpoint(path, strict="yes")


def test_directory_of_other_files_is_no_checkpoint_not_a_damaged_one(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no _METADATA"):
        orbax_io.read(tmp_path, {})


# --------------------------------------------------------------------- two processes
WORKER = r'''
import json, os, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp
from flaxlazy._src.checkpoint import integrity, orbax_io

pid, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if "jax_cpu_collectives_implementation" in jax.config.values:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=40)
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
full = np.arange(128 * 64, dtype=np.float32).reshape(128, 64)

def array(data, spec):
    return jax.make_array_from_callback(data.shape, NamedSharding(mesh, spec), lambda i: data[i])

def read(spec):
    target = jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=NamedSharding(mesh, spec))
    w = orbax_io.read(path, {"w": target})["w"]
    return all(np.array_equal(np.asarray(s.data), full[s.index]) for s in w.addressable_shards)

path, report = os.path.join(root, "ckpt"), {}
orbax_io.save(path, {"w": array(-full, P("data", "model")), "step": 1})
orbax_io.save(path, {"w": array(full, P("data", "model")), "step": 2}, force=True)
report["listing"] = sorted(n for n in os.listdir(root) if not n.startswith("process_"))
report["checksum files"] = sorted(os.listdir(os.path.join(path, integrity.DIGESTS)))
report["reads"] = [read(spec) for spec in (P("data", "model"), P("model", "data"), P())]
ocp.multihost.sync_global_processes("flip")
if pid == 0:
    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    with open(max(files, key=os.path.getsize), "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)
ocp.multihost.sync_global_processes("flipped")
try:
    read(P())
    report["corrupt"] = "no error"
except ValueError as e:
    report["corrupt"] = str(e)
with open(os.path.join(root, f"process_{pid}.json"), "w") as f:
    json.dump(report, f)
jax.distributed.shutdown()
'''


@pytest.mark.slow
def test_two_processes_save_overwrite_and_check(tmp_path):
    """Both write shards to one staging directory, process 0 renames; reads check blocks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo,
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip()}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    for i in range(2):
        with open(tmp_path / f"process_{i}.json") as f:
            report = json.load(f)
        assert report["listing"] == ["ckpt"]
        assert report["checksum files"] == ["process_0.json", "process_1.json"]
        assert report["reads"] == [True, True, True]
        assert re.match(rf"checkpoint at {re.escape(str(tmp_path / 'ckpt'))} is damaged .*"
                        r"entry 'w'", report["corrupt"]), report["corrupt"]
