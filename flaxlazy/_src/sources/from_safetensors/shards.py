"""Executing ``from_safetensors`` leaves: each device's box read from the mapped file.

A planned leaf (``Read``) names its tensor(s), its transform and its layer axis. For each
addressable device the box of the parameter it holds is taken from a view of the mapped
tensor through the transform (NumPy views: nothing whole is copied), then copied into the
device buffer; a box several devices hold is read once. Leaves load side by side on the
host threads, largest first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from flaxlazy._src.draw import host
from flaxlazy._src.sources import kinds
from flaxlazy._src.sources.from_safetensors import files
from flaxlazy._src.sources.from_safetensors import mapping

TILE = 256  # a strided copy goes tile by tile (``_assign``)


class Read(NamedTuple):
    """A planned leaf: the tensors it reads and how (``plan.Leaf.value``).

    Attributes:
      source: the ``source.SafetensorsSource``.
      tensors: the tensor it reads, or with ``stack``, one per layer.
      stack: the parameter's layer axis, or None.
      steps: the transform's steps, applied to each tensor.
      label: the key as reports print it (``model.layers.{0..31}.mlp.up_proj.weight``).
    """

    source: Any
    tensors: tuple[files.Tensor, ...]
    stack: int | None
    steps: tuple[mapping.Step, ...]
    label: str


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What loading from ``path`` reads, and what it maps on the host at once beside the
    parameters themselves, from the headers alone (``flaxlazy inspect --weights``).

    Returns:
      ``{"path", "files", "tensors", "bytes", "largest_tensor", "mapped_at_once"}``: the
      checkpoint's size, and at most one tensor mapped per loading thread.

    Raises:
      ValueError: as ``from_safetensors`` does for a missing or damaged checkpoint.
    """
    ckpt = files.open_checkpoint(os.fspath(path))
    sizes = [t.nbytes for t in ckpt.tensors.values()]
    largest = max(sizes, default=0)
    return {"path": os.fspath(path), "files": len(ckpt.files), "tensors": len(sizes),
            "bytes": sum(sizes), "largest_tensor": largest,
            "mapped_at_once": min(host.workers(), len(sizes)) * largest}


def _read(opened: files.Opened, tensor: files.Tensor, steps: Sequence[mapping.Step],
          shape: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """The elements ``box`` of one tensor after ``steps``: a strided view of the mapped
    file (whoever copies it copies those elements, and only those)."""
    return mapping.apply(opened.mapped(tensor), steps, shape)[box]


def _assign(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src``, in tiles of the last two axes where ``src`` is strided (a
    transposed view): NumPy's element-by-element strided copy is about twice as fast
    when the pages it reads stay few (measured on this project's machine)."""
    if out.ndim < 2 or src.flags.c_contiguous:
        out[...] = src
        return
    rows, cols = out.shape[-2:]
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            out[..., i:i + TILE, j:j + TILE] = src[..., i:i + TILE, j:j + TILE]


def _copy_layers(opened: files.Opened, read: Read, shape: tuple[int, ...], out: np.ndarray,
                 box: tuple[slice, ...]) -> None:
    """Fills ``out`` with the elements ``box`` of a stacked parameter (of shape
    ``shape``), layer by layer from the layers' tensors, cast to ``out``'s dtype."""
    axis = read.stack
    layer_shape = shape[:axis] + shape[axis + 1:]
    rest = box[:axis] + box[axis + 1:]
    for j, i in enumerate(range(box[axis].start, box[axis].stop)):
        _assign(out[(slice(None),) * axis + (j,)],
                _read(opened, read.tensors[i], read.steps, layer_shape, rest))


def _box(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A shard's index as plain ``slice(start, stop)`` per axis."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _buffer(sizes: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new aligned host buffer (it becomes a CPU device array without another copy)."""
    buf, populate = host.aligned_empty(math.prod(sizes), dtype)
    if populate is not None:
        populate(0, buf.size)
    return buf.reshape(sizes)


def _shard(opened: files.Opened, read: Read, shape: tuple[int, ...], dtype: np.dtype,
           box: tuple[slice, ...], devices: list[Any]) -> list[jax.Array]:
    """One box of the parameter, on each of ``devices`` (None: the default device,
    uncommitted), read from the file once.

    A strided box of one tensor in its own dtype (a transposed weight) is handed to
    ``jax.device_put`` as the view of the mapped file: the runtime copies it into the
    device buffer, transposing on the way, faster than NumPy does. Any other box is
    copied into an aligned host buffer first: a contiguous view the runtime would not
    copy but alias (the parameter would live in the file's mapping, and change with the
    file), a box to cast, a box stacked from several tensors.
    """
    sizes = tuple(s.stop - s.start for s in box)
    if read.stack is None:
        view = _read(opened, read.tensors[0], read.steps, shape, box)
        if view.dtype == dtype and not view.flags.c_contiguous:
            value = view
        else:
            value = _buffer(sizes, dtype)
            _assign(value, view)
    else:
        value = _buffer(sizes, dtype)
        if value.size:
            _copy_layers(opened, read, shape, value, box)
    first = jax.device_put(value, devices[0])
    rest = devices[1:]
    return [first, *(jax.device_put([first] * len(rest), rest) if rest else [])]


def load(opened: files.Opened, read: Read, shape: tuple[int, ...], dtype: Any, sharding: Any
         ) -> jax.Array:
    """One parameter, each addressable device's shard read as the box it needs (a box
    several devices hold, once)."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    whole = tuple(slice(0, n) for n in shape)
    if sharding is None:
        return _shard(opened, read, shape, dtype, whole, [None])[0]
    if len(sharding.device_set) == 1:
        return _shard(opened, read, shape, dtype, whole, [sharding])[0]
    where: dict[tuple, list[Any]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        where.setdefault(tuple((s.start, s.stop) for s in _box(index, shape)), []).append(
            device)
    placed: dict[Any, jax.Array] = {}
    for box, devices in where.items():
        placed.update(zip(devices, _shard(opened, read, shape, dtype,
                                          tuple(slice(*s) for s in box), devices), strict=True))
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [placed[d] for d in sharding.addressable_devices_indices_map(shape)])


def execute(plan: Any, indices: list[int], context: kinds.Context) -> dict[int, Any]:
    """Every safetensors leaf, where the plan places it (no placement: where the root
    keys are, as ``jax.jit(init)`` would put it, else uncommitted on the caller's default
    device), the largest first, side by side on the host threads (``host.share_out``:
    copies into device buffers release the GIL)."""
    default = context.home()
    device = jax.config.jax_default_device  # the caller's: each thread has its own
    opened = files.Opened()
    out: dict[int, Any] = {}

    def work(take):
        with jax.default_device(device):
            while (i := take()) is not None:
                leaf = plan.leaves[i]
                out[i] = load(opened, leaf.value, leaf.shape, leaf.dtype,
                              leaf.sharding or default)

    try:
        host.share_out(sorted(indices, key=lambda i: -math.prod(plan.leaves[i].shape)), work)
    finally:
        opened.close()
    return out
