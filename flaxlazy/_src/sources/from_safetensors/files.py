"""The safetensors format, read as its specification defines it, and nothing more.

A ``.safetensors`` file is an 8-byte little-endian unsigned header length ``N``, then
``N`` bytes of UTF-8 JSON (an object: each tensor's ``dtype``, ``shape`` and
``data_offsets [begin, end)`` into the byte buffer, plus an optional ``__metadata__``
object), then the byte buffer: little-endian, row-major tensors that the header indexes
entirely, without holes or overlaps. A checkpoint split over several files has a JSON
index (``model.safetensors.index.json``) whose ``weight_map`` names each tensor's file.

Every file's header is read and checked before any tensor data is: a header that lies
about sizes, a truncated file or a missing shard is one ``ValueError`` naming the file.
Tensors are then read as boxes of a memory-mapped view (``Opened.mapped``), so a reader copies
only the elements it asks for.

Why not the ``safetensors`` package here: a device's shard of a transformed parameter
(transposed, split, reshaped, stacked) is a strided box of the stored tensor, which a
NumPy view of the mapped bytes gives for any transform and any shard, where
``safe_open(...).get_slice`` takes basic slices of the stored layout only (each transform
would need its own index arithmetic); and a view here maps one tensor and unmaps with it,
where a ``safe_open`` handle maps whole files for its lifetime. The format is small
enough to read by its specification with the standard library and NumPy (bfloat16 and
float8 through ``ml_dtypes``, which JAX requires).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import ml_dtypes
import numpy as np

INDEX_SUFFIX = ".safetensors.index.json"
SUFFIX = ".safetensors"
METADATA = "__metadata__"

# The format's dtype names, by the NumPy dtype each is read as (sub-byte types are not).
DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}

DAMAGED = (
    "from_safetensors: {file!r} is damaged: {what}. Nothing was read from it; write or "
    "download the file again (a copy cut short, or a file still being written, looks "
    "like this)."
)
NOT_FOUND = (
    "from_safetensors: {path!r} does not exist. Pass a .safetensors file, a directory "
    "holding one (or shards with a *" + INDEX_SUFFIX + " index), or the index itself."
)


class Tensor(NamedTuple):
    """One tensor of a file, as its header describes it.

    Attributes:
      key: its name in the header (``"model.layers.0.mlp.up_proj.weight"``).
      file: the file holding it.
      dtype: the format's dtype name (``"BF16"``).
      shape: its shape.
      start: the file offset of its first byte.
      nbytes: its size in bytes.
    """

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    def np_dtype(self) -> np.dtype:
        """The NumPy dtype its bytes are read as (ValueError for one flaxlazy cannot read)."""
        if self.dtype not in DTYPES:
            raise ValueError(
                f"from_safetensors: {self.key!r} in {self.file!r} has dtype {self.dtype!r}, "
                f"which flaxlazy does not read (it reads {', '.join(DTYPES)}). Convert the "
                "tensor, or give its parameter another initializer."
            )
        dtype = np.dtype(DTYPES[self.dtype])
        return dtype.newbyteorder("<") if dtype.byteorder in "=<>" else dtype


class Checkpoint(NamedTuple):
    """The tensors of a file or of an index's shards, by key (headers only)."""

    path: str
    files: tuple[str, ...]
    tensors: Mapping[str, Tensor]


def _damaged(file: str, what: str) -> ValueError:
    return ValueError(DAMAGED.format(file=file, what=what))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise KeyError(key)
        out[key] = value
    return out


def _entry(file: str, key: str, info: Any, header_end: int) -> Tensor:
    """One header entry, its types checked; offsets made absolute."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(
        info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else ((), ())
    if not ok or not all(isinstance(d, int) and d >= 0 for d in shape) or not (
            len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _damaged(file, f"header entry {key!r} is {info!r}, not {{\"dtype\": str, "
                             "\"shape\": [int, ...], \"data_offsets\": [begin, end]}")
    begin, end = offsets
    tensor = Tensor(key, file, info["dtype"], tuple(shape), header_end + begin, end - begin)
    if tensor.dtype in DTYPES:
        want = math.prod(shape) * np.dtype(DTYPES[tensor.dtype]).itemsize
        if want != tensor.nbytes:
            raise _damaged(
                file, f"its header says {key!r} is {tensor.dtype}{list(shape)}, {want:,} "
                f"bytes, but gives it the {tensor.nbytes:,} bytes [{begin:,}, {end:,})")
    return tensor


def read_header(file: str) -> dict[str, Tensor]:
    """Every tensor of one ``.safetensors`` file, from its header, checked against the
    file: sizes that match shapes, a buffer indexed whole, without holes or overlaps, and
    as long as the file.

    Raises:
      ValueError: naming the file, for a damaged or truncated one.

    Examples:
      >>> import os, tempfile, json, struct
      >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
      >>> path = os.path.join(tempfile.mkdtemp(), "one.safetensors")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
      >>> read_header(path)["w"].shape
      (2,)
      >>> with open(path, "r+b") as f:
      ...     _ = f.truncate(os.path.getsize(path) - 4)
      >>> read_header(path)
      Traceback (most recent call last):
      ValueError: from_safetensors: '...one.safetensors' is damaged: it is truncated: ...
    """
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(file, f"it has {size} bytes, fewer than the 8 of the "
                                     "header's length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _damaged(file, f"its first 8 bytes give a header of {n:,} bytes, but "
                                     f"only {size - 8:,} bytes follow them")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"from_safetensors: cannot read {file!r}: {e}.") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except KeyError as e:
        raise _damaged(file, f"its header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(file, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _damaged(file, f"its header is a JSON {type(header).__name__}, not an object")
    header_end = 8 + n
    tensors = {key: _entry(file, key, info, header_end)
               for key, info in header.items() if key != METADATA}
    position = header_end
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if t.start != position:
            what = "overlaps the tensor before it" if t.start < position else (
                f"starts {t.start - position:,} bytes after the tensor before it ends")
            raise _damaged(file, f"its header places {t.key!r} at bytes "
                                 f"[{t.start - header_end:,}, "
                                 f"{t.start - header_end + t.nbytes:,}), which {what}")
        position += t.nbytes
    if position > size:
        raise _damaged(file, f"it is truncated: its header indexes {position - header_end:,} "
                             f"bytes of tensor data, and {size - header_end:,} follow the "
                             "header")
    if position < size:
        raise _damaged(file, f"{size - position:,} bytes after its last tensor are indexed "
                             "by no header entry")
    return tensors


def _merge(path: str, files: list[str], where: Mapping[str, str] | None = None
           ) -> Checkpoint:
    tensors: dict[str, Tensor] = {}
    for file in files:
        for key, tensor in read_header(file).items():
            if key in tensors:
                raise ValueError(
                    f"from_safetensors: {key!r} is in both {tensors[key].file!r} and "
                    f"{file!r}; a checkpoint names each tensor once."
                )
            tensors[key] = tensor
    for key, file in (where or {}).items():
        if key not in tensors or tensors[key].file != file:
            raise _damaged(path, f"it maps {key!r} to {os.path.basename(file)!r}, whose "
                                 "header has no such tensor")
    return Checkpoint(path, tuple(files), tensors)


def _from_index(index: str) -> Checkpoint:
    try:
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
    except OSError as e:
        raise ValueError(f"from_safetensors: cannot read {index!r}: {e}.") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(index, f"it is not JSON ({e})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise _damaged(index, "it has no \"weight_map\" object of tensor names to file names")
    folder = os.path.dirname(index)
    where = {key: os.path.join(folder, name) for key, name in weight_map.items()}
    files = sorted(set(where.values()))
    for file in files:
        if not os.path.isfile(file):
            count = sum(1 for f in where.values() if f == file)
            raise ValueError(
                f"from_safetensors: the shard {file!r}, which {index!r} names for {count} "
                "tensor(s), is missing. Download or copy every shard the index names."
            )
    return _merge(index, files, where)


def open_checkpoint(path: str) -> Checkpoint:
    """The tensors of a checkpoint: a ``.safetensors`` file, an index of shards, or a
    directory holding either (headers only; no tensor data is read).

    Raises:
      ValueError: naming the path or file, for a missing path, a directory with nothing
        to read or several indexes, a missing shard, or a damaged file.
    """
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
        if len(indexes) > 1:
            raise ValueError(
                f"from_safetensors: {path!r} holds several indexes ({', '.join(indexes)}); "
                "pass the one to read as `path`."
            )
        if indexes:
            return _from_index(os.path.join(path, indexes[0]))
        files = [os.path.join(path, n) for n in names if n.endswith(SUFFIX)]
        if not files:
            raise ValueError(
                f"from_safetensors: {path!r} holds no {SUFFIX} file and no *{INDEX_SUFFIX} "
                "index."
            )
        return _merge(path, files)
    if path.endswith(".json") and os.path.isfile(path):
        return _from_index(path)
    if os.path.isfile(path):
        return _merge(path, [path])
    raise ValueError(NOT_FOUND.format(path=path))


class Opened:
    """The files one load reads, each opened once (``mapped`` maps tensors of them), and
    closed by ``close`` (a tensor's mapping outlives it until its views are gone)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise ValueError(f"from_safetensors: cannot read {file!r}: {e}.") from None
            return self._fds[file]

    def mapped(self, tensor: Tensor) -> np.ndarray:
        """A read-only view of ``tensor`` in its memory-mapped file: indexing it copies
        only the elements indexed. Only the tensor's own pages are mapped, and unmapped
        when the view and what is sliced from it without a copy are gone."""
        dtype = tensor.np_dtype()
        if tensor.nbytes == 0:
            return np.zeros(tensor.shape, dtype)
        start = tensor.start - tensor.start % mmap.ALLOCATIONGRANULARITY
        try:
            buf = mmap.mmap(self._fd(tensor.file), tensor.start + tensor.nbytes - start,
                            access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError) as e:  # changed since its header was read
            raise _damaged(tensor.file, f"{tensor.key!r} cannot be mapped ({e})") from None
        count = tensor.nbytes // dtype.itemsize
        return np.frombuffer(buf, dtype, count, tensor.start - start).reshape(tensor.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
