"""Checkpoint integrity: CRC-32s recorded at save and checked on read; the "damaged" error.

Orbax stores array data without checksums (zstd catches some corruption, not all: flipped
bytes in compressible data decode to other values without an error), and Orbax offers
no option to add one. So ``save`` records a CRC-32 of every block it writes: one per
distinct shard of a ``jax.Array`` (each process checksums the shards it writes), one per
numpy array or Python number (process 0). They go to ``flaxlazy_digests/process_<i>.json``
inside the checkpoint, keyed by entry path and the block's place in the global array
(``"0:512,0:1024"``), so any process can check any block it reads, whatever sharding it
reads into. The checkpoint's own metadata (``_METADATA``, Orbax's ``custom_metadata``)
records that it carries them, and for how many processes (``marker``): a flaxlazy
checkpoint whose checksum files are missing is damaged, never read unchecked. Other
files in the folder are ignored. A checkpoint without the record or the folder (plain
Orbax) is read unchecked.

Examples:
  >>> import numpy as np
  >>> box = parse_box("0:2,1:3")
  >>> box, box_text(box), volume(box)
  (((0, 2), (1, 3)), '0:2,1:3', 4)
  >>> data = np.arange(12.0).reshape(3, 4)
  >>> pieces = {((0, 3), (0, 4)): lambda: data}
  >>> verify("ckpt", "w", ("float64", (3, 4), {((0, 3), (0, 4)): crc(data)}), pieces, None)
  >>> verify("ckpt", "w", ("float64", (3, 4), {((0, 3), (0, 4)): 0}), pieces, None)
  Traceback (most recent call last):
  ValueError: checkpoint at ckpt is damaged or incomplete: entry 'w' differs from what was saved...
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlazy._src import _compat

DIGESTS = "flaxlazy_digests"  # folder inside a checkpoint: one JSON file per process
MARKER = "flaxlazy"  # key of flaxlazy's record in the checkpoint's custom metadata
_FILE = re.compile(r"process_(\d+)\.json")
DAMAGED = "checkpoint at {ckpt} is damaged or incomplete: {reason}"
CORRUPT = (
    "entry {path!r} differs from what was saved (block [{block}]: crc32 {got:08x}, saved "
    "{want:08x}); its data changed on disk after it was written. Restore the checkpoint "
    "from a copy or save it again."
)

Box = tuple[tuple[int, int], ...]  # per dimension, [start, stop) in the global array
Digest = tuple[str, tuple[int, ...], dict[Box, int]]  # (dtype name, shape, {block: crc32})


def damaged(ckpt: str, reason: str) -> ValueError:
    """The one error for a checkpoint whose files are damaged, missing or corrupted."""
    return ValueError(DAMAGED.format(ckpt=ckpt, reason=reason))


def reason(error: BaseException, names: Mapping[str, str] | None = None) -> str:
    """One line on why Orbax or TensorStore failed, without TensorStore's spec dumps.

    Args:
      error: the exception raised by Orbax (TensorStore's own error is often its cause).
      names: ``{Orbax array name: entry path}``, to name the entry TensorStore mentions.
    """
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    # TensorStore's status ("FAILED_PRECONDITION: Error reading ...") says what broke.
    text = next((t for t in chain if re.match(r"[A-Z_]{5,}: ", t)), None)
    if text is None:
        text = f"{type(error).__name__}: {chain[0]}"
    text = re.split(r" \[tensorstore_spec|\n|\. See full TensorStore details", text)[0][:400]
    for name, entry in (names or {}).items():  # TensorStore names arrays "a.b/<chunk>"
        if name and f'"{name}/' in text:
            return f"entry {entry!r}: {text}"
    return text


# ------------------------------------------------------------------------------ boxes
def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """A shard's ``index`` (slices, as in ``Shard.index``) as a box of ``shape``."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def whole(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


def box_text(box: Box) -> str:
    return ",".join(f"{a}:{b}" for a, b in box)


def parse_box(text: str) -> Box:
    return tuple(tuple(map(int, d.split(":"))) for d in text.split(",")) if text else ()


def volume(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def _intersect(x: Box, y: Box) -> Box | None:
    box = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(x, y, strict=True))
    return box if all(a < b for a, b in box) else None


def _within(inner: Box, outer: Box) -> tuple[slice, ...]:
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(inner, outer, strict=True))


def crc(data: Any) -> int:
    """CRC-32 of an array's bytes in C order (zlib's, several GB/s)."""
    flat = np.ascontiguousarray(np.asarray(data)).reshape(-1)
    return zlib.crc32(flat.view(np.uint8))


def _key_data(x: jax.Array) -> jax.Array:
    # Orbax writes a typed PRNG key array as its uint32 key data.
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


# ----------------------------------------------------------------------- save: record
def record(flat: list[tuple[str, Any]]) -> dict[str, dict]:
    """This process's checksums of the values in ``flat``, one per block it writes.

    Orbax writes each distinct shard of a ``jax.Array`` once, from its replica 0, and
    numpy arrays and Python numbers from process 0; the checksums follow the same split.
    Process 0 lists every value entry, so a lost checksum file is noticed on read.
    """
    primary = jax.process_index() == 0
    records = {}
    for path, leaf in flat:
        if isinstance(leaf, str | bytes):
            continue  # kept in Orbax's metadata, not an array
        if isinstance(leaf, jax.Array):
            leaf = _key_data(leaf)
            blocks = {
                box_text(box_of(s.index, leaf.shape)): crc(s.data)
                for s in leaf.addressable_shards
                if s.replica_id == 0
            }
        elif primary:
            leaf = np.asarray(leaf)
            blocks = {box_text(whole(leaf.shape)): crc(leaf)}
        else:
            continue
        if blocks or primary:
            records[path] = {
                "dtype": jnp.dtype(leaf.dtype).name, "shape": list(leaf.shape), "blocks": blocks
            }
    return records


def write(ckpt: str, records: dict[str, dict]) -> None:
    """Writes this process's ``records`` into the checkpoint directory ``ckpt``."""
    folder = os.path.join(ckpt, DIGESTS)
    os.makedirs(folder, exist_ok=True)
    doc = {
        "format": 1, "algorithm": "crc32", "process": jax.process_index(),
        "process_count": jax.process_count(), "entries": records,
    }
    with open(os.path.join(folder, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())


# -------------------------------------------------------------------------- read: check
def marker() -> dict[str, Any]:
    """flaxlazy's record in a checkpoint's custom metadata: it carries checksums."""
    return {"digests": DIGESTS, "format": 1, "process_count": jax.process_count()}


def _expected_files(ckpt: str, info: Mapping[str, Any]) -> int | None:
    """How many checksum files the checkpoint must have; None for a plain Orbax one."""
    custom = info.get("custom_metadata") if isinstance(info, Mapping) else None
    record = custom.get(MARKER) if isinstance(custom, Mapping) else None
    if record is None:
        return None
    count = record.get("process_count") if isinstance(record, Mapping) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise damaged(ckpt, f"its _METADATA has a malformed {MARKER!r} record ({record!r}).")
    return count


def load(ckpt: str, info: Mapping[str, Any] | None = None) -> dict[str, Digest] | None:
    """All processes' checksums by entry path; ``None`` for a checkpoint saved without them.

    Args:
      ckpt: the checkpoint directory.
      info: its ``_METADATA`` (the ``custom_metadata`` says whether flaxlazy saved it);
        read from ``ckpt`` if not given.

    Raises:
      ValueError: a checksum file is missing or unreadable (the checkpoint is damaged).
    """
    if info is None:
        try:
            with open(os.path.join(ckpt, "_METADATA")) as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise damaged(ckpt, f"its _METADATA file is unreadable ({e}).") from e
    count = _expected_files(ckpt, info)
    folder = os.path.join(ckpt, DIGESTS)
    if not os.path.isdir(folder):
        if count is None:
            return None  # plain Orbax
        raise damaged(ckpt, f"it was saved by flaxlazy with checksums, but its {DIGESTS}/ "
                            "folder is missing.")
    found = {int(m.group(1)): name for name in os.listdir(folder)
             if (m := _FILE.fullmatch(name))}
    docs = {}
    for i in sorted(found) if count is None else [i for i in range(count) if i in found]:
        name = found[i]
        try:
            with open(os.path.join(folder, name)) as f:
                doc = json.load(f)
            if int(doc["process"]) != i:
                raise ValueError(f"it is process {doc['process']}'s")
            docs[i] = doc
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise damaged(ckpt, f"its checksum file {DIGESTS}/{name} is unreadable ({e}).") from e
    if count is None:  # saved before the record existed: process 0's file says how many
        count = docs[0].get("process_count") if 0 in docs else None
        docs = {i: d for i, d in docs.items() if not isinstance(count, int) or i < count}
    missing = sorted(set(range(count if isinstance(count, int) else 1)) - set(docs))
    if missing or not isinstance(count, int):
        raise damaged(ckpt, f"{DIGESTS}/ lacks the checksum files of processes {missing}.")
    try:
        digests = {p: (r["dtype"], tuple(r["shape"]), {}) for p, r in docs[0]["entries"].items()}
        for doc in docs.values():
            for p, r in doc["entries"].items():
                if p in digests:
                    digests[p][2].update({parse_box(k): int(v) for k, v in r["blocks"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(ckpt, f"its checksum files in {DIGESTS}/ are malformed ({e!r}).") from e
    return digests


def pieces(value: Any, dtype: str) -> dict[Box, Callable[[], np.ndarray]]:
    """The data of ``value`` on this process, as disjoint boxes copied to the host on demand.

    Args:
      value: a ``jax.Array`` (its addressable shards, one per distinct box), or a numpy
        array or Python number (the whole of it).
      dtype: the saved dtype, for Python numbers.
    """
    if isinstance(value, jax.Array):
        value = _key_data(value)
        out = {}
        for s in value.addressable_shards:
            box = box_of(s.index, value.shape)
            if box not in out:
                out[box] = functools.cache(lambda data=s.data: np.asarray(data))
        return out
    array = np.asarray(value, jnp.dtype(dtype))
    return {whole(array.shape): lambda: array}


def verify(
    ckpt: str,
    path: str,
    digest: Digest,
    data: Mapping[Box, Callable[[], np.ndarray]],
    read_box: Callable[[Box], np.ndarray] | None,
) -> None:
    """Checks the saved blocks of one entry that overlap the data read on this process.

    A saved block inside the data read here is checked from that data. A block only partly
    read here (another process reads the rest) is read whole with ``read_box`` and checked;
    blocks not read here at all are left to the processes that read them.

    Args:
      ckpt: the checkpoint, for messages.
      path: the entry, for messages.
      digest: ``(dtype, shape, {block: crc32})`` from ``load``.
      data: the data read here, ``{box: () -> np.ndarray}`` over disjoint boxes (``pieces``).
      read_box: reads one box of the entry from the checkpoint.

    Raises:
      ValueError: a block's checksum differs, or the checksums don't cover the entry.
    """
    dtype, shape, blocks = digest
    if sum(map(volume, blocks)) != math.prod(shape):
        raise damaged(ckpt, f"the checksums in {DIGESTS}/ do not cover entry {path!r}.")
    for block, want in blocks.items():
        overlaps = [(box, cut) for box in data if (cut := _intersect(block, box)) is not None]
        if not overlaps or not volume(block):
            continue
        if sum(volume(cut) for _, cut in overlaps) < volume(block):
            values = read_box(block)
        elif len(overlaps) == 1:
            box, _ = overlaps[0]
            values = data[box]()[_within(block, box)]
        else:
            values = np.empty([b - a for a, b in block], jnp.dtype(dtype))
            for box, cut in overlaps:
                values[_within(cut, block)] = data[box]()[_within(cut, box)]
        got = crc(values)
        if got != want:
            raise damaged(ckpt, CORRUPT.format(path=path, block=box_text(block), got=got,
                                               want=want))


def box_reader(ckpt: str, info: Mapping[str, Any], path: str, name: str) -> Callable:
    """``read_box`` for ``verify``: a box of Orbax array ``name``, straight from TensorStore.

    Args:
      ckpt: the checkpoint directory.
      info: its ``_METADATA`` (``use_zarr3``, ``use_ocdbt``).
      path: the entry, for messages.
      name: Orbax's name of the array (``ArrayMetadata.name``, e.g. ``"params.Dense_0.bias"``).
    """

    def read_box(box: Box) -> np.ndarray:
        import tensorstore as ts

        ts_utils = _compat.orbax_tensorstore_utils()
        use_ocdbt = bool(info.get("use_ocdbt", True))
        spec = ts_utils.ArrayReadSpec(
            ckpt, name, use_zarr3=bool(info.get("use_zarr3")), use_ocdbt=use_ocdbt
        ).json
        context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
        try:
            store = ts.open(spec, open=True, read=True, context=context).result()
            return store[tuple(slice(a, b) for a, b in box)].read().result()
        except Exception as e:  # noqa: BLE001 - TensorStore raises plain ValueErrors
            raise damaged(ckpt, f"entry {path!r}: {reason(e)}") from e

    return read_box
