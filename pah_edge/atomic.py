"""Crash-safe file writes: write a temporary file, fsync it, rename it over the target.

A reader (or a process restarted after kill -9 or a power loss) sees either the old file or the
new one, never a torn mix. Torch-free: the device side uses it for its bundle writes.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from pah_edge.errors import StorageError

_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"  # a temporary file is ".<name>.<random>.tmp" beside its target


def umask_mode(mode: int) -> int:
    """``mode`` (0o666 for a file, 0o777 for a folder) less the process's umask, as open() and mkdir()
    apply it; tempfile's files (0600) and folders (0700) need it set by hand, or a bundle written by
    one user is unreadable to the service that runs it."""
    return mode & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it, which other threads creating files would notice
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def is_temporary(file: Path) -> bool:
    """Whether ``file`` is named as an atomic write's temporary file (one a crash may leave behind)."""
    return file.name.startswith(_TEMP_PREFIX) and file.name.endswith(_TEMP_SUFFIX)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (same-directory temp file, fsync, rename, fsync dir).

    A failed write (full disk, file-size limit, read-only or failing storage) leaves ``path`` as it
    was and no temporary file, and raises StorageError naming the fix.
    """
    path = Path(path)
    tmp = staged(path, data)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from None
        raise


def staged(path: Path, data: bytes) -> Path:
    """``data`` written and fsynced to a temporary file beside ``path``, which is untouched; the caller
    renames it into place (or deletes it). A failed write leaves no file and raises StorageError."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from None
        raise


def json_bytes(obj) -> bytes:
    """``obj`` as the indented JSON every record is written in."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_bytes(path, json_bytes(obj))


# Faults of the storage, not of pah-edge: errno -> the fix.
STORAGE_ERRNOS = {errno.ENOSPC: "free space on its file system", errno.EDQUOT: "free space within your disk quota",
                  errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EROFS: "make {folder} writable",
                  errno.EACCES: "make {folder} writable", errno.EPERM: "make {folder} writable",
                  errno.EIO: "check the storage device (an I/O error)"}


# Only a write raises these; a denied access (EACCES, EPERM) or an I/O error may come from a read too.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def storage_error(exc: OSError, path: Path, *, writing: bool = True) -> StorageError:
    """``exc`` from writing ``path`` (``writing=False``: from reading or writing it, which the caller
    cannot tell) as one line that names the fix."""
    why = f"({exc.strerror or exc})"
    if writing or exc.errno in _WRITE_ERRNOS:
        fix = STORAGE_ERRNOS.get(exc.errno, "check the file system").format(folder=path.parent)
        return StorageError(f"could not write {path} {why}: {fix}, then run the command again")
    fix = STORAGE_ERRNOS[errno.EIO] if exc.errno == errno.EIO else f"check you may read it and write to {path.parent}"
    return StorageError(f"could not read or write {path} {why}: {fix}, then run the command again")


def fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; without this a power loss can undo it.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
