"""Orbax checkpoint I/O: save a tree, list its entries, read chosen entries into shardings.

A checkpoint is one Orbax PyTree directory. Its leaves are named by the canonical
``"/"``-joined paths of :func:`flaxlazy._src.paths.flatten` (``"params/Dense_0/kernel"``;
sequence items by index, ``NamedTuple`` and dataclass fields by name), so the names that
``entries`` lists are the names that ``read`` takes and that the plan matches against.

A checkpoint cannot be lost or silently corrupted:

* ``save`` writes the new checkpoint in a folder of its own beside ``path`` and moves it
  into place by one rename only once it is complete (``folders``), so a save
  that fails, at any point, leaves the checkpoint already at ``path`` as it was; of two
  saves racing to one path exactly one wins (with ``force``, the last one, whole). It
  refuses paths whose folder must never be replaced (empty, the working directory or
  a parent of it, a filesystem root, the home directory), and replaces only a folder
  that is a checkpoint, even with ``force``.
* ``save`` records a CRC-32 of every array it writes, one per written block (per shard
  of a sharded array, so each process checksums only what it writes), in
  ``flaxlazy_digests/`` inside the checkpoint, and notes in the checkpoint's metadata
  that it did. ``read`` checks the data it reads against them and raises ``ValueError``
  naming the checkpoint and the entry on a mismatch, or when a flaxlazy checkpoint's
  checksums are missing. Checkpoints written by plain Orbax are read without checks.
* A checkpoint whose metadata or data files are damaged or missing raises one
  ``ValueError``, "checkpoint at PATH is damaged or incomplete: ...", from ``entries``
  and ``read`` alike (``FileNotFoundError`` stays for a path holding no checkpoint).
  Orbax's own reports of the failure (logged tracebacks from its threads) are held
  back: the exception raised is the whole report.

Examples:
  >>> import os, tempfile
  >>> import jax, jax.numpy as jnp
  >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
  >>> save(ckpt, {"params": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}})
  >>> entries(ckpt)["params/Dense_0/kernel"]
  ShapeDtypeStruct(shape=(2, 3), dtype=float32)
  >>> target = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  >>> read(ckpt, {"params/Dense_0/kernel": target})["params/Dense_0/kernel"].sum()
  Array(6., dtype=float32)
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from flaxlazy._src import _compat
from flaxlazy._src import paths
from flaxlazy._src.checkpoint import folders
from flaxlazy._src.checkpoint import integrity

_ORBAX_FILES = ("manifest.ocdbt", "_CHECKPOINT_METADATA", "commit_success.txt", "d")

_MISSING_ENTRY = (
    "Checkpoint {ckpt} has no entry {path!r}; closest entries: {closest}. Entry names are "
    "'/'-joined paths of the saved tree (e.g. 'params/Dense_0/kernel'); list them with "
    "`entries(path)`."
)
_MISMATCH = (
    "Checkpoint entry {path!r} in {ckpt} is {saved} but the target is {target}. The "
    "checkpoint was saved from a differently shaped model, or the entry is matched to the "
    "wrong parameter."
)
_UNSUPPORTED = (
    "save: leaf {path!r} is of type {kind}, which Orbax cannot store. A checkpoint holds "
    "jax.Arrays, numpy arrays, Python numbers and strings; convert the leaf or remove it "
    "from the tree (static fields of a dataclass or TrainState are not saved)."
)
_ABSTRACT_MESH = (
    "The target for {path!r} has a sharding over an abstract mesh ({sharding}): reading "
    "puts data on devices, so it needs a NamedSharding over a jax.sharding.Mesh (as "
    "`abstract_init(..., mesh=mesh)` gives), or no sharding for the default device."
)
_WRITE_FAILED = (
    "save: writing the checkpoint for {path} failed: {cause}. Nothing at {path} changed. "
    "(Orbax reported: {reason})"
)
_SAVE_BARRIERS = itertools.count()  # every process saves in the same order


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("flaxlazy checkpoints need Orbax: `pip install orbax-checkpoint`.") from e
    return ocp


def _save_registry(ocp: Any) -> Any:
    """Orbax's default type handlers, with arrays saved without replica parallelism.

    ``None`` on an Orbax layout without them: Orbax's global registry is used.
    """
    registries = _compat.orbax_type_handler_registry()
    defaults = getattr(registries, "_DEFAULT_TYPE_HANDLERS", None)
    if defaults is None:  # another Orbax layout: keep its defaults (the global registry)
        return None
    array_handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    handlers = [(jax.Array, array_handler)] + [(t, h) for t, h in defaults if t is not jax.Array]
    return registries.create_type_handler_registry(*handlers)


def _abspath(path: str | os.PathLike) -> str:
    # Orbax refuses relative paths (its OCDBT store needs absolute ones).
    return os.path.abspath(os.fspath(path))


def _fmt(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}".replace(" ", "")


# ------------------------------------------------------------------------------- save
def _wait_for_orbax_writes(before: set[threading.Thread], timeout: float = 60.0) -> None:
    """Joins the writer threads Orbax started since ``before`` (after a failed save).

    When one array fails, Orbax raises at once while the writes of the others go on in
    its threads; they would recreate the directories we are about to remove.
    """
    deadline = time.monotonic() + timeout
    for thread in _compat.orbax_threads() - before:
        thread.join(max(0.0, deadline - time.monotonic()))


def _write_failure(path: str, error: BaseException) -> BaseException:
    """Orbax's error for a failed write, as one ``OSError`` where it is one (disk full)."""
    if isinstance(error, OSError):
        return error
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    code = re.search(r"os_error_code='(\d+)'", "\n".join(chain))
    if code is None:
        return error
    number = int(code.group(1))
    return OSError(number, _WRITE_FAILED.format(path=path, cause=os.strerror(number),
                                                reason=integrity.reason(error)))


def _from_process_0(numbers: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return numbers
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(numbers))


def _barrier(ocp: Any, name: str) -> None:
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"flaxlazy_save_{next(_SAVE_BARRIERS)}_{name}")


def nnx_object(tree: Any) -> bool:
    """Whether ``tree`` is an NNX object (a module, an optimizer), which ``save`` writes
    and ``restore`` reads as its ``nnx.state``, as Flax NNX checkpoints one; an
    ``nnx.State`` is a tree like any other.

    Examples:
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> nnx_object(model), nnx_object(nnx.state(model)), nnx_object({"w": 1})
      (True, False, False)
    """
    return isinstance(tree, nnx.Pytree) and not isinstance(tree, nnx.State)


def save(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes a pytree of arrays to an Orbax checkpoint directory, blocking until done.

    Flax boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) are unboxed first, so
    the checkpoint holds plain arrays. ``tree`` can be a variables dict, a Flax
    ``TrainState`` (its ``apply_fn`` and ``tx`` are static and not saved), an NNX module or
    optimizer (saved as ``nnx.state(...)``, the layout Flax's NNX guides use) or any pytree
    of ``jax.Array``s, numpy arrays and Python scalars (optax states included). Sharded
    arrays are written shard by shard, by every process that holds shards; call ``save``
    on all processes. It uses ``orbax.checkpoint.PyTreeCheckpointer`` (OCDBT format), so
    Orbax and other tools can read the result too.

    The checkpoint is written in a folder of this save's own beside ``path``
    (``<path>.flaxlazy-tmp-<pid>-<random>``) and moved to ``path`` by one rename once
    complete (with ``force``, swapped with the old one, which is then deleted; see
    ``folders``). A failed save leaves ``path`` as it was and its folder
    removed; of two saves racing to one new path, one wins and the other raises
    ``FileExistsError`` (with ``force``, the last one wins, whole). With several
    processes, all write into process 0's folder and process 0 renames. A CRC-32 per
    written shard goes to ``flaxlazy_digests/`` in the checkpoint, for ``read`` to detect
    corrupted data.

    Args:
      path: the checkpoint directory to create (made absolute; parents are created).
        Not empty, the working directory or one containing it, a filesystem root, or
        the home directory or one containing it.
      tree: the pytree to save.
      force: replace the checkpoint at ``path`` instead of raising. Only a checkpoint
        (a folder with Orbax's metadata files) is ever replaced.

    Raises:
      FileExistsError: ``path`` is a checkpoint and ``force`` is false (or another save
        created it while this one wrote); or ``path`` is something else (a file, a folder
        of other files), whatever ``force``.
      OSError: the checkpoint could not be written (e.g. the disk is full); ``path`` is
        unchanged.
      TypeError: a leaf Orbax cannot store (naming its path); nothing is written.
      ValueError: ``path`` is refused (see ``path``), or ``tree`` has no leaves to save.

    Examples:
      >>> import os, tempfile
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save(ckpt, {"w": nn.Partitioned(jnp.ones((4, 2)), names=("data", None))})
      >>> entries(ckpt)
      {'w': ShapeDtypeStruct(shape=(4, 2), dtype=float32)}
      >>> save(ckpt, {"w": jnp.zeros(3)}, force=True)
      >>> entries(ckpt)
      {'w': ShapeDtypeStruct(shape=(3,), dtype=float32)}
      >>> save(ckpt, {"w": object()}, force=True)
      Traceback (most recent call last):
      TypeError: save: leaf 'w' is of type object, which Orbax cannot store...
      >>> sorted(os.listdir(os.path.dirname(ckpt)))  # the old checkpoint, nothing else
      ['ckpt']
      >>> save(os.path.dirname(ckpt), {"w": jnp.zeros(3)}, force=True)
      Traceback (most recent call last):
      FileExistsError: save: ... exists and is a folder, not a checkpoint...
    """
    ocp = _orbax()
    path = folders.target(path)
    if nnx_object(tree):
        tree = nnx.state(tree)  # saved as Flax NNX saves: nnx.state(model)
    tree = meta.unbox(tree)
    flat, _ = paths.flatten(tree)
    if not flat:
        raise ValueError(f"Nothing to save to {path}: the tree has no leaves ({tree!r}).")
    registry = _save_registry(ocp)
    supported = registry.has if registry is not None else ocp.type_handlers.has_type_handler
    for p, leaf in flat:
        if not supported(type(leaf)):
            raise TypeError(_UNSUPPORTED.format(path=p, kind=type(leaf).__name__))
    primary = jax.process_index() == 0
    if primary:  # a save killed mid-replace left the old checkpoint aside: put it back
        folders.recover(path)
    _barrier(ocp, "recovered")
    folders.check_existing(path, force=force)
    tag = folders.token_text(_from_process_0(folders.token_numbers()))
    private = folders.private_folder(path, tag, create=primary)
    new = os.path.join(private, folders.NEW)
    with _compat.orbax_quiet():
        threads = _compat.orbax_threads()
        try:
            # Checksums are computed while Orbax writes (zlib releases the GIL).
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                records = pool.submit(integrity.record, flat)
                # Replica-parallel saving compiles a slice per array and replica (seconds
                # for the first save of a sharded model); each process writes its own
                # shards anyway.
                handler = ocp.PyTreeCheckpointHandler(
                    **({} if registry is None else {"type_handler_registry": registry})
                )
                item = ocp.args.PyTreeSave(
                    tree, custom_metadata={integrity.MARKER: integrity.marker()})
                with ocp.Checkpointer(handler) as checkpointer:
                    checkpointer.save(new, args=item)
                integrity.write(new, records.result())
            _barrier(ocp, "written")
            if primary:
                folders.place(new, path, force=force)
                folders.remove_quietly(private)  # holds the replaced one, if any
            _barrier(ocp, "replaced")
        except BaseException as e:
            _wait_for_orbax_writes(threads)
            if primary:
                folders.discard(private, path)
            failure = _write_failure(path, e)
            if failure is e:
                raise
            raise failure from e


# ------------------------------------------------------------------------------- read
def _find_checkpoints(path: str, depth: int = 2) -> list[str]:
    """Subdirectories that are checkpoints (CheckpointManager keeps ``<step>/<item>``)."""
    found = []
    for root, dirs, files in os.walk(path):
        if "_METADATA" in files:
            found.append(root)
            dirs.clear()
        elif root[len(path) :].count(os.sep) >= depth:
            dirs.clear()
    return sorted(found)[:5]


def _open(path: str) -> tuple[Any, dict]:
    """The checkpoint's tree of Orbax value metadata (no array data read) and _METADATA."""
    from etils import epath

    ocp = _orbax()
    if not os.path.isdir(path):
        aside = folders.stranded(path)
        hint = (
            f" An interrupted save left the previous checkpoint at {aside[-1]}; the next "
            "`flaxlazy.save` to this path moves it back, or rename it yourself."
            if aside else ""
        )
        raise FileNotFoundError(f"No checkpoint at {path}: the directory does not exist.{hint}")
    metadata_file = os.path.join(path, "_METADATA")
    if not os.path.isfile(metadata_file):
        present = [n for n in os.listdir(path) if n in _ORBAX_FILES or n.startswith("ocdbt.")]
        if present:
            listing = ", ".join(sorted(present))
            raise integrity.damaged(path, f"it has Orbax files ({listing}) but no _METADATA file.")
        inside = _find_checkpoints(path)
        hint = (
            f" It contains checkpoints at {inside}; pass one of those."
            if inside
            else " Write one with `flaxlazy.save(path, tree)`."
        )
        raise FileNotFoundError(
            f"{path} is not an Orbax PyTree checkpoint (no _METADATA file).{hint}"
        )
    try:
        with open(metadata_file, "rb") as f:
            info = json.loads(f.read())
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise integrity.damaged(path, f"its _METADATA file is not valid JSON ({e}).") from e
    if info.get("use_ocdbt") and not os.path.isfile(os.path.join(path, "manifest.ocdbt")):
        raise integrity.damaged(path, "its OCDBT manifest (manifest.ocdbt) is missing.")
    try:
        tree_meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        raise integrity.damaged(path, integrity.reason(e)) from e
    return getattr(tree_meta, "tree", tree_meta), info


def _is_value(m: Any) -> bool:
    # ArrayMetadata (jax and numpy arrays) and ScalarMetadata (Python numbers) have a
    # shape and a dtype; StringMetadata and empty nodes have neither.
    return getattr(m, "shape", None) is not None and getattr(m, "dtype", None) is not None


def _struct(m: Any) -> jax.ShapeDtypeStruct:
    # Canonical dtype: what the entry becomes as a jax.Array (int64 -> int32 without x64).
    return jax.ShapeDtypeStruct(tuple(m.shape), jax.dtypes.canonicalize_dtype(m.dtype))


def _default_sharding() -> jax.sharding.Sharding:
    device = jax.config.jax_default_device
    if not isinstance(device, jax.Device):
        device = jax.devices(device)[0] if isinstance(device, str) else jax.devices()[0]
    return jax.sharding.SingleDeviceSharding(device)


def entries(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """The checkpoint's array leaves, by ``"/"``-joined path, from its metadata only.

    No array data is read (so nothing is checked against the saved checksums; ``read``
    does that). Dtypes are as ``read`` returns them (jax's canonical dtype, so a saved
    ``int64`` reads as ``int32`` unless x64 is enabled). Leaves that are not numbers
    (strings) are left out. The shardings are ``None``: a checkpoint does not fix where
    its arrays go.

    Args:
      path: an Orbax PyTree checkpoint directory (as written by ``save``).

    Returns:
      ``{path: jax.ShapeDtypeStruct}`` in the order of the saved tree's leaves.

    Raises:
      FileNotFoundError: ``path`` holds no checkpoint.
      ValueError: the checkpoint's metadata is damaged or incomplete.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save(ckpt, {"step": 3, "params": {"bias": jnp.zeros(2), "kernel": jnp.ones((3, 2))}})
      >>> for name, struct in entries(ckpt).items():
      ...   print(name, struct.shape, struct.dtype)
      params/bias (2,) float32
      params/kernel (3, 2) float32
      step () int32
    """
    with _compat.orbax_quiet():
        flat, _ = paths.flatten(_open(_abspath(path))[0])
    return {p: _struct(m) for p, m in flat if _is_value(m)}


def _check_targets(ckpt: str, targets: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    missing = [p for p in targets if p not in saved]
    if missing:
        raise ValueError(
            "\n".join(
                _MISSING_ENTRY.format(ckpt=ckpt, path=p, closest=paths.closest(p, saved))
                for p in missing
            )
        )
    for p, target in targets.items():
        if not (hasattr(target, "shape") and hasattr(target, "dtype")):
            raise TypeError(
                f"The target for {p!r} must have a shape and a dtype (a "
                f"jax.ShapeDtypeStruct), got {target!r}."
            )
        have, want = saved[p], (tuple(target.shape), np.dtype(target.dtype))
        if (tuple(have.shape), np.dtype(have.dtype)) != want:
            raise ValueError(
                _MISMATCH.format(
                    path=p, ckpt=ckpt, saved=_fmt(have.shape, have.dtype), target=_fmt(*want)
                )
            )


def read(path: str | os.PathLike, targets: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Reads only the requested checkpoint entries, each straight into its sharding.

    Every entry is read by Orbax shard by shard into ``targets[p].sharding``: each device
    receives only its slice (replicas share one read), so no host-side copy of a whole
    sharded array is made. Entries not in ``targets`` are not read at all. A ``None``
    sharding means jax's default device.

    What is read is checked against the CRC-32s ``save`` recorded: each process checks
    the saved shards it reads (a saved shard this process reads only part of is read whole
    for the check). Checkpoints without recorded checksums (written by plain Orbax) are
    read unchecked. An entry saved as 64-bit and read as 32-bit (x64 off) is read whole on
    every process, checked, then cast.

    Args:
      path: an Orbax PyTree checkpoint directory (as written by ``save``).
      targets: ``{entry path: jax.ShapeDtypeStruct}`` (anything with ``shape``, ``dtype``
        and optionally ``sharding``), e.g. from ``entries`` or an abstract tree.

    Returns:
      ``{entry path: jax.Array}`` in the order of ``targets``, each with exactly the
      target's shape, dtype and sharding.

    Raises:
      FileNotFoundError: ``path`` holds no checkpoint.
      ValueError: an entry is missing from the checkpoint (the message suggests the
        closest ones), or its shape or dtype differs from the target's; or the checkpoint
        is damaged or incomplete, or an entry's data differs from what was saved (naming
        the checkpoint and the entry).

    Examples:
      >>> import os, tempfile
      >>> import jax, jax.numpy as jnp
      >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save(ckpt, {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.arange(2.0)}})
      >>> out = read(ckpt, {"Dense_0/bias": jax.ShapeDtypeStruct((2,), jnp.float32)})
      >>> out
      {'Dense_0/bias': Array([0., 1.], dtype=float32)}
      >>> read(ckpt, {"Dense_0/kernal": jax.ShapeDtypeStruct((3, 2), jnp.float32)})
      Traceback (most recent call last):
      ValueError: Checkpoint ... has no entry 'Dense_0/kernal'; closest ...: ['Dense_0/kernel'...
      >>> read(ckpt, {"Dense_0/kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
      Traceback (most recent call last):
      ValueError: Checkpoint entry 'Dense_0/kernel' in ... is float32[3,2] but ... float32[2,3]...
    """
    with _compat.orbax_quiet():
        return _read(_abspath(path), targets)


def _read(ckpt: str, targets: Mapping[str, Any]) -> dict[str, jax.Array]:
    ocp = _orbax()
    tree, info = _open(ckpt)
    flat, _ = paths.flatten(tree)
    saved = {p: m for p, m in flat if _is_value(m)}
    _check_targets(ckpt, targets, {p: _struct(m) for p, m in saved.items()})
    if not targets:
        return {}
    digests = integrity.load(ckpt, info)
    if digests is not None and (lost := [p for p in targets if p not in digests]):
        listing = ", ".join(map(repr, lost))
        raise integrity.damaged(ckpt, f"{integrity.DIGESTS}/ has no checksum for {listing}.")
    shardings = {p: getattr(t, "sharding", None) or _default_sharding() for p, t in targets.items()}
    for p, sharding in shardings.items():
        if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
            raise ValueError(_ABSTRACT_MESH.format(path=p, sharding=sharding))

    # The restore item mirrors the saved tree exactly; leaves we don't want are
    # PLACEHOLDERs, which Orbax skips without reading them.
    def item_leaf(keypath, m):
        return m if paths.path_str(keypath) in targets else ocp.PLACEHOLDER

    def restore_args(keypath, m):
        p = paths.path_str(keypath)
        if p not in targets:
            return ocp.PLACEHOLDER
        if not isinstance(m, ocp.metadata.ArrayMetadata):
            return ocp.RestoreArgs()  # A Python scalar: placed below.
        if digests is not None and jnp.dtype(digests[p][0]) != jnp.dtype(targets[p].dtype):
            # Saved wider than jax holds it (int64 with x64 off): read whole as numpy, at
            # the saved dtype the checksum is of; cast and placed below.
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(
            restore_type=jax.Array,
            sharding=shardings[p],
            global_shape=tuple(targets[p].shape),
            dtype=np.dtype(targets[p].dtype),
        )

    with_path = jax.tree_util.tree_map_with_path
    names = {getattr(m, "name", None): p for p, m in saved.items()}
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                ckpt,
                args=ocp.args.PyTreeRestore(
                    item=with_path(item_leaf, tree), restore_args=with_path(restore_args, tree)
                ),
            )
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        raise integrity.damaged(ckpt, integrity.reason(e, names)) from e
    values = dict(paths.flatten(restored)[0])
    out = {}
    for p, target in targets.items():
        value = values[p]
        if digests is not None:
            if digests[p][1] != tuple(saved[p].shape):
                raise integrity.damaged(ckpt, f"the checksums of entry {p!r} are for shape "
                                              f"{digests[p][1]}, the entry is {saved[p].shape}.")
            read_box = integrity.box_reader(ckpt, info, p, saved[p].name)
            integrity.verify(ckpt, p, digests[p], integrity.pieces(value, digests[p][0]), read_box)
        if not isinstance(value, jax.Array):  # Python scalars and numpy-saved arrays.
            value = np.asarray(value, dtype=target.dtype)
        if not isinstance(value, jax.Array) or value.sharding != shardings[p]:
            value = jax.device_put(value, shardings[p])
        out[p] = value
    return out
