"""Atomic file writes: a temp file in the destination folder, fsync, then os.replace.

Readers, other ranks and a crash mid-write see the old file or the new one, never half of one
(checkpoints, caches, manifests, images). The temp file lives in the same folder so that
os.replace is a rename on one file system, and it is named `.<name>.<random>.tmp` so that it is
hidden and never matches the final name's pattern.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _file_mode() -> int:
    """Permissions of a normally created file under the current umask (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for an API that writes a path itself; on success fsync it and
    os.replace it onto `path`, on any error remove it. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _FILE_MODE)  # outputs (images, models) readable like any other file the user writes
    try:
        yield tmp
        # The writer has closed the file; flush it to disk before the rename makes it visible.
        # "r+b" because Windows cannot fsync a read-only handle.
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` encoded as UTF-8, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
