"""Readers for the on-disk formats of the built-in benchmarks: IDX, CIFAR pickles, zip archives."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pah_edge.errors import DataError

_IDX_UINT8 = 0x0800  # IDX magic number = 0x0800 + number of dimensions, for uint8 data


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """uint8 array from a gzipped IDX file (the MNIST format): ndim 1 = labels [N], 3 = images [N, H, W]."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt compressed data
        raise DataError(f"cannot read {path} ({e}): re-download it") from e
    header = 4 + 4 * ndim
    if len(data) < header or struct.unpack(">I", data[:4])[0] != _IDX_UINT8 + ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-d uint8 data (bad magic number): re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path} is truncated or padded ({len(data) - header} bytes for shape {shape}): re-download it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles containers and numpy arrays only: a tampered archive cannot run code."""

    _ALLOWED = {
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickles(folder: Path, archive: str, top: str, members: tuple[str, ...]) -> dict[str, Any]:
    """Unpickled `members` of the folder `folder/top`, or else of the tar.gz `folder/archive`
    (read in one streaming pass)."""
    found: dict[str, Any] = {}
    source = folder / top if (folder / top).is_dir() else folder / archive
    try:
        if source.is_dir():
            for member in members:
                if (source / member).is_file():
                    with open(source / member, "rb") as f:
                        found[member] = _ArraysOnly(f, encoding="bytes").load()
        else:
            with tarfile.open(source, "r|gz") as tar:
                for info in tar:
                    member = info.name.removeprefix(f"{top}/")
                    if member in members and info.isfile():
                        found[member] = _ArraysOnly(tar.extractfile(info), encoding="bytes").load()
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {source} ({e}): re-download it") from e
    missing = [m for m in members if m not in found]
    if missing:
        raise DataError(f"{source} lacks {top}/{missing[0]}: re-download it")
    return found


class FileTree:
    """Read-only files below the top folder of a zip archive, or of its extracted copy
    `folder/top` when there is one. Use as a context manager: it closes the archive."""

    def __init__(self, folder: Path, archive: str, top: str):
        self._zip: zipfile.ZipFile | None = None
        self._prefix = f"{top}/"
        if (folder / top).is_dir():
            self.origin = folder / top
            self.names = sorted(p.relative_to(self.origin).as_posix() for p in self.origin.rglob("*") if p.is_file())
        else:
            self.origin = folder / archive
            try:
                self._zip = zipfile.ZipFile(self.origin)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {self.origin} ({e}): re-download it") from e
            inside = [n for n in self._zip.namelist() if n.startswith(self._prefix) and not n.endswith("/")]
            self.names = sorted(n.removeprefix(self._prefix) for n in inside)
        self._known = set(self.names)

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def read(self, name: str) -> bytes:
        """Contents of `name`, a posix path relative to the top folder."""
        if name not in self._known:
            raise DataError(f"{self.origin} lacks {self._prefix}{name}: re-download the dataset")
        try:
            if self._zip is None:
                return (self.origin / name).read_bytes()
            return self._zip.read(self._prefix + name)
        except (OSError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"cannot read {name} in {self.origin} ({e}): re-download the dataset") from e

    def open(self, name: str) -> io.BytesIO:
        """`name` as a file object whose .name says where it came from, for error messages."""
        f = io.BytesIO(self.read(name))
        f.name = f"{self.origin}/{name}"
        return f
