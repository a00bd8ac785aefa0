"""Fetching the standard benchmark archives; only called when the user passes --download."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from pah_edge.atomic import fsync_dir
from pah_edge.errors import DataError

log = logging.getLogger("pah_edge")

_CHUNK = 1 << 20  # bytes


def cache_dir(benchmark: str) -> Path:
    """Where downloaded archives of `benchmark` go unless the user names a folder."""
    return Path.home() / ".cache" / "pah-edge" / "datasets" / benchmark


def fetch(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest`, logging progress every 10 %, and check its MD5.

    Writes to a temporary file first, so an interrupted download never looks complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and done >= next_report * total:
                    log.info("%s: %d%% of %.1f MB", dest.name, 100 * done // total, total / 1e6)
                    next_report += 0.1
            out.flush()
            os.fsync(out.fileno())  # on disk before its final name: a power loss leaves no short archive there
        if digest.hexdigest() != md5:
            raise DataError(
                f"download of {url} is corrupt (MD5 mismatch): run again, or download it by hand into {dest.parent}"
            )
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, a connection cut mid-body
        raise DataError(
            f"cannot download {url} ({e}): check the network, or download it by hand into {dest.parent}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
