"""Orbax checkpoint I/O: save a tree, list its entries, read chosen entries into shardings.

A checkpoint is one Orbax PyTree directory. Its leaves are named by the canonical
``"/"``-joined paths of :func:`flaxlazy._src.paths.flatten` (``"params/Dense_0/kernel"``;
sequence items by index, ``NamedTuple`` and dataclass fields by name), so the names that
``entries`` lists are the names that ``read`` takes and that the plan matches against.

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

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax.core import meta

from flaxlazy._src import paths

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


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("flaxlazy checkpoints need Orbax: `pip install orbax-checkpoint`.") from e
    return ocp


def _save_registry(ocp: Any) -> Any:
    """Orbax's default type handlers, with arrays saved without replica parallelism."""
    from orbax.checkpoint._src.serialization import type_handler_registry as registries

    defaults = getattr(registries, "_DEFAULT_TYPE_HANDLERS", None)
    if defaults is None:  # another Orbax layout: keep its defaults
        return registries.GLOBAL_TYPE_HANDLER_REGISTRY
    array_handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    handlers = [(jax.Array, array_handler)] + [(t, h) for t, h in defaults if t is not jax.Array]
    return registries.create_type_handler_registry(*handlers)


def _abspath(path: str | os.PathLike) -> str:
    # Orbax refuses relative paths (its OCDBT store needs absolute ones).
    return os.path.abspath(os.fspath(path))


def _fmt(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}".replace(" ", "")


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


def _metadata_tree(path: str) -> Any:
    """The checkpoint's tree with Orbax value metadata at the leaves (no array data read)."""
    from etils import epath

    ocp = _orbax()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint at {path}: the directory does not exist.")
    try:
        tree_meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except FileNotFoundError as e:
        inside = _find_checkpoints(path)
        hint = (
            f" It contains checkpoints at {inside}; pass one of those."
            if inside
            else " Write one with `flaxlazy.save(path, tree)`."
        )
        raise FileNotFoundError(
            f"{path} is not an Orbax PyTree checkpoint (no _METADATA file).{hint}"
        ) from e
    return getattr(tree_meta, "tree", tree_meta)


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


def save(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes a pytree of arrays to an Orbax checkpoint directory, blocking until done.

    Flax boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) are unboxed first, so
    the checkpoint holds plain arrays. ``tree`` can be a variables dict, a Flax
    ``TrainState`` (its ``apply_fn`` and ``tx`` are static and not saved) or any pytree
    of ``jax.Array``s, numpy arrays and Python scalars (optax states included). Sharded
    arrays are written shard by shard, by every process that holds shards; call ``save``
    on all processes. It uses ``orbax.checkpoint.PyTreeCheckpointer`` (OCDBT format), so
    Orbax and other tools can read the result too.

    Args:
      path: the checkpoint directory to create (made absolute; parents are created).
      tree: the pytree to save.
      force: overwrite an existing ``path`` instead of raising.

    Raises:
      FileExistsError: ``path`` exists and ``force`` is false.
      ValueError: ``tree`` has no leaves to save.

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
    """
    ocp = _orbax()
    path = _abspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(
            f"Checkpoint directory {path} already exists; pass force=True to overwrite it."
        )
    tree = meta.unbox(tree)
    if not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"Nothing to save to {path}: the tree has no leaves ({tree!r}).")
    # Replica-parallel saving compiles a slice per array and replica (seconds for the
    # first save of a sharded model); each process writes its own shards either way.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_save_registry(ocp))
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree), force=force)


def entries(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """The checkpoint's array leaves, by ``"/"``-joined path, from its metadata only.

    No array data is read. Dtypes are as ``read`` returns them (jax's canonical dtype, so
    a saved ``int64`` reads as ``int32`` unless x64 is enabled). Leaves that are not
    numbers (strings) are left out. The shardings are ``None``: a checkpoint does not fix
    where its arrays go.

    Args:
      path: an Orbax PyTree checkpoint directory (as written by ``save``).

    Returns:
      ``{path: jax.ShapeDtypeStruct}`` in the order of the saved tree's leaves.

    Raises:
      FileNotFoundError: ``path`` is not a checkpoint directory.

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
    flat, _ = paths.flatten(_metadata_tree(_abspath(path)))
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

    Args:
      path: an Orbax PyTree checkpoint directory (as written by ``save``).
      targets: ``{entry path: jax.ShapeDtypeStruct}`` (anything with ``shape``, ``dtype``
        and optionally ``sharding``), e.g. from ``entries`` or an abstract tree.

    Returns:
      ``{entry path: jax.Array}`` in the order of ``targets``, each with exactly the
      target's shape, dtype and sharding.

    Raises:
      FileNotFoundError: ``path`` is not a checkpoint directory.
      ValueError: an entry is missing from the checkpoint (the message suggests the
        closest ones), or its shape or dtype differs from the target's.

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
    ocp = _orbax()
    ckpt = _abspath(path)
    tree = _metadata_tree(ckpt)
    flat, _ = paths.flatten(tree)
    saved = {p: m for p, m in flat if _is_value(m)}
    _check_targets(ckpt, targets, {p: _struct(m) for p, m in saved.items()})
    if not targets:
        return {}
    shardings = {p: getattr(t, "sharding", None) or _default_sharding() for p, t in targets.items()}

    # The restore item mirrors the saved tree exactly; leaves we don't want are
    # PLACEHOLDERs, which Orbax skips without reading them.
    def item_leaf(keypath, m):
        return m if paths.path_str(keypath) in targets else ocp.PLACEHOLDER

    def restore_args(keypath, m):
        p = paths.path_str(keypath)
        if p not in targets:
            return ocp.PLACEHOLDER
        if isinstance(m, ocp.metadata.ArrayMetadata):
            return ocp.ArrayRestoreArgs(
                restore_type=jax.Array,
                sharding=shardings[p],
                global_shape=tuple(targets[p].shape),
                dtype=np.dtype(targets[p].dtype),
            )
        return ocp.RestoreArgs()  # A Python scalar: placed below.

    with_path = jax.tree_util.tree_map_with_path
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            ckpt,
            args=ocp.args.PyTreeRestore(
                item=with_path(item_leaf, tree), restore_args=with_path(restore_args, tree)
            ),
        )
    values = dict(paths.flatten(restored)[0])
    out = {}
    for p, target in targets.items():
        value = values[p]
        if not isinstance(value, jax.Array):  # Python scalars and numpy-saved arrays.
            value = np.asarray(value, dtype=target.dtype)
        if not isinstance(value, jax.Array) or value.sharding != shardings[p]:
            value = jax.device_put(value, shardings[p])
        out[p] = value
    return out
