"""Atomic file writes (a temp file in the destination folder, fsync, then os.replace) and the one
safe reader of torch `.ckpt`/`.pt` files.

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
from typing import Any

from .errors import InputError


def _file_mode() -> int:
    """Permissions of a normally created file under the current umask (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` for an API that writes a path itself; on success fsync it and
    os.replace it onto `path`, on any error remove it. Creates the parent folder. `mode`: the file's
    permissions (default: what the umask gives a new file), set before anything is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    mode = _FILE_MODE if mode is None else mode  # by default readable like any file the user writes
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file with a 0600 one
        # The writer has closed the file; flush it to disk before the rename makes it visible.
        # "r+b" because Windows cannot fsync a read-only handle.
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically (see the module docstring), with permissions `mode` if given."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` encoded as UTF-8, atomically (permissions `mode` if given)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def load_torch_file(path: str | os.PathLike, expected: str, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` onto the CPU; an empty, truncated, foreign or object-holding file
    is an InputError that names it and says what was `expected` (the caller checks the file exists).
    `mmap`: map the tensors from the file instead of reading them (for a look at shapes only)."""
    import pickle

    import torch

    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"{path} is empty (0 bytes: an interrupted copy or download?); expected {expected}")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except InputError:
        raise
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}; expected {expected}") from error
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's message is a page of advice; the line naming the refused class is the news.
        refused = next((line for line in lines if "Unsupported global" in line), None)
        if refused:
            raise InputError(f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it "
                             f"({refused}). We never unpickle arbitrary objects; expected {expected}") from error
        raise InputError(f"{path} is not a PyTorch checkpoint (it does not unpickle as tensors); "
                         f"expected {expected}") from error
    except Exception as error:  # torch reports a bad file as RuntimeError, EOFError, KeyError, IndexError...
        with open(path, "rb") as handle:
            zip_archive = handle.read(4) == b"PK\x03\x04"
        if zip_archive:
            raise InputError(f"{path} is truncated or corrupted ({size} bytes; its zip archive cannot be read): "
                             f"copy or download it again; expected {expected}") from error
        raise InputError(f"{path} is not a PyTorch checkpoint (torch.load failed with {type(error).__name__}); "
                         f"expected {expected}") from error
