"""Where ``save`` writes: refused paths, private staging folders, and the final rename.

``save`` never writes at ``path`` itself. Each save makes a folder of its own beside it,
``<path>.flaxlazy-tmp-<pid>-<random>`` (with several processes, process 0's name,
shared by all), Orbax writes the checkpoint into it (``<folder>/ckpt``), and only the
complete checkpoint is moved to ``path``, by one rename on the same filesystem:

* ``path`` absent: renamed in without replacing anything (Linux ``renameat2`` with
  ``RENAME_NOREPLACE``), so of two writers racing to create ``path`` exactly one wins;
  the other gets ``FileExistsError`` and ``path`` holds the winner's checkpoint, whole.
* ``path`` a checkpoint and ``force``: swapped with the new one in one step
  (``RENAME_EXCHANGE``); the old one, now in the private folder, is deleted with it.
  ``path`` holds a complete checkpoint at every instant, so concurrent writers end with
  the last one placed, whole. Where the filesystem cannot swap, the old one is first
  moved into the private folder (``old-<n>``), the new one renamed in, then the old
  one deleted; a save killed between those two renames leaves the old checkpoint in
  its folder, and the next ``save`` to ``path`` moves it back.

A writer deletes only its own private folder. Folders left by a writer that was killed
stay (``<path>.flaxlazy-tmp-*``): nothing reads them, and removing them is safe once
no save to ``path`` is running.

Examples:
  >>> import os, tempfile
  >>> target(os.path.join(tempfile.gettempdir(), "run", "ckpt")).endswith("ckpt")
  True
  >>> target("")
  Traceback (most recent call last):
  ValueError: save: refusing to write a checkpoint at '': the path is empty...
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import secrets
import shutil
from typing import Any

import numpy as np

STAGING = ".flaxlazy-tmp"  # <path>.flaxlazy-tmp-<token>/: one save's private folder
NEW = "ckpt"  # <private folder>/ckpt: the checkpoint being written
OLD = "old"  # <private folder>/old-<n>: a replaced checkpoint, until it is deleted
# Files only an Orbax checkpoint has at its top level (PyTree metadata, the OCDBT
# manifest, Checkpointer's step metadata and commit marker).
MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "commit_success.txt")

REFUSED = (
    "save: refusing to write a checkpoint at {raw!r}{resolved}: {why}. A save replaces "
    "the whole folder at its path; name a folder of its own, e.g. {example!r}."
)
NOT_A_CHECKPOINT = (
    "save: {path} exists and is {what}, not a checkpoint (it has none of {markers}). "
    "flaxlazy replaces only checkpoints, even with force=True; choose another path, or "
    "remove it yourself."
)
EXISTS = "Checkpoint directory {path} already exists; pass force=True to overwrite it."
LOST_RACE = (
    "Checkpoint directory {path} was created by another save while this one was being "
    "written; this one is discarded. Pass force=True to replace it (the last save wins)."
)
_ATTEMPTS = 100  # writers racing with force: renames tried before giving up


# ----------------------------------------------------------------------------- checks
def target(path: str | os.PathLike) -> str:
    """The absolute path a checkpoint may be saved at.

    Raises:
      ValueError: ``path`` is empty, the working directory or a folder containing it, a
        filesystem root, or the home directory or a folder containing it.
    """
    raw = os.fspath(path)
    absolute = os.path.abspath(raw) if raw.strip() else ""
    why = _refusal(absolute)
    if why is None:
        return absolute
    parent = absolute if absolute and os.path.dirname(absolute) != absolute else os.getcwd()
    raise ValueError(REFUSED.format(
        raw=raw, resolved=f" ({absolute})" if absolute and absolute != raw else "", why=why,
        example=os.path.join(parent, "checkpoints", "ckpt"),
    ))


def _refusal(absolute: str) -> str | None:
    """Why a save must not replace the folder at ``absolute``; None if it may."""
    if not absolute:
        return "the path is empty (it would be the current working directory)"
    real = os.path.realpath(absolute)
    if os.path.dirname(real) == real:
        return "it is a filesystem root"
    for name, folder in (("the current working directory", os.getcwd()),
                         ("the home directory", os.path.expanduser("~"))):
        folder = os.path.realpath(folder)
        if real == folder:
            return f"it is {name}"
        if folder.startswith(real.rstrip(os.sep) + os.sep):
            return f"it contains {name}"
    return None


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder (not a link) holding an Orbax checkpoint's files."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return any(m in names for m in MARKERS)


def check_existing(path: str, *, force: bool) -> None:
    """Raises unless ``path`` is free, or a checkpoint that ``force`` may replace.

    Raises:
      FileExistsError: ``path`` is a checkpoint and ``force`` is false, or anything else
        (a file, a link, a folder without checkpoint files), whatever ``force``.
    """
    if not os.path.lexists(path):
        return
    if not is_checkpoint(path):
        what = ("a symbolic link" if os.path.islink(path) else
                "a folder" if os.path.isdir(path) else "a file")
        raise FileExistsError(NOT_A_CHECKPOINT.format(path=path, what=what,
                                                      markers=", ".join(MARKERS)))
    if not force:
        raise FileExistsError(EXISTS.format(path=path))


# ---------------------------------------------------------------------------- staging
def token_numbers() -> np.ndarray:
    """A new save's name part as numbers (process id, 31 random bits), to broadcast."""
    return np.asarray([os.getpid(), secrets.randbits(31)], np.int32)


def token_text(numbers: Any) -> str:
    pid, bits = (int(n) for n in np.asarray(numbers).reshape(-1))
    return f"{pid}-{bits:08x}"


def private_folder(path: str, tag: str, *, create: bool) -> str:
    """``<path>.flaxlazy-tmp-<tag>``; ``create``: made now (an error if it exists)."""
    folder = f"{path}{STAGING}-{tag}"
    if create:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(folder)
    return folder


def remove(path: str) -> None:
    """Deletes a folder or file; nothing if it is gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_quietly(path: str) -> None:
    """``remove``, leaving what cannot be removed (the new checkpoint is in place)."""
    try:
        remove(path)
    except OSError:  # pragma: no cover - permissions changed under us
        pass


def discard(private: str, path: str) -> None:
    """Removes a failed save's folder, unless it holds the only copy of the old checkpoint."""
    if not os.path.lexists(path) and any(p.startswith(private + os.sep)
                                         for p in stranded(path)):
        return  # the next save moves it back (``recover``)
    remove(private)


def stranded(path: str) -> list[str]:
    """Old checkpoints that saves killed mid-replace left in their private folders."""
    pattern = os.path.join(glob.escape(path) + STAGING + "-*", OLD + "-*")
    found = [p for p in glob.glob(pattern) if is_checkpoint(p)]
    return sorted(found, key=lambda p: os.lstat(p).st_ctime)


def recover(path: str) -> str | None:
    """Moves the newest stranded old checkpoint back to a missing ``path``; returns it."""
    found = stranded(path)
    if os.path.lexists(path) or not found:
        return None
    try:
        _rename_noreplace(found[-1], path)
    except (FileExistsError, FileNotFoundError):  # another save got there first
        return None
    return found[-1]


# --------------------------------------------------------------------------- renames
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _libc_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux, or glibc older than 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()  # None: two plain renames instead of one swap


def _rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2``; False where this system or filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), src, None, dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists."""
    try:
        if _rename2(src, dst, _RENAME_NOREPLACE):
            return
        os.rename(src, dst)  # fails on a folder that is not empty, as we need
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, e.strerror, dst) from None
        raise


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def place(new: str, path: str, *, force: bool) -> None:
    """Moves the complete checkpoint ``new`` (in this save's private folder) to ``path``.

    With ``force`` the checkpoint at ``path`` ends in ``new``'s private folder, which the
    caller deletes. If this fails, ``path`` holds what it held before (or what another
    save placed meanwhile).

    Raises:
      FileExistsError: ``path`` appeared meanwhile and ``force`` is false, or it is no
        longer a checkpoint.
    """
    private = os.path.dirname(new)
    moved = None  # the checkpoint this call moved out of ``path``, while it is aside
    try:
        for attempt in range(_ATTEMPTS):
            try:
                _rename_noreplace(new, path)
                moved = None
                break
            except FileExistsError:
                if not force:
                    raise FileExistsError(LOST_RACE.format(path=path)) from None
            check_existing(path, force=True)
            try:
                if _rename2(new, path, _RENAME_EXCHANGE):
                    break
            except FileNotFoundError:  # another save moved it just now: try again
                continue
            aside = os.path.join(private, f"{OLD}-{attempt}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = aside
        else:
            raise OSError(f"save: {path} kept being replaced by other saves; gave up after "
                          f"{_ATTEMPTS} tries.")
    except BaseException:
        if moved is not None:  # put the old one back, unless a newer one is there
            try:
                _rename_noreplace(moved, path)
            except OSError:
                pass
        raise
    _fsync_dir(os.path.dirname(path))
