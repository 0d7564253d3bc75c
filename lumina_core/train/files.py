"""Writing training outputs: a refused write becomes one clear error, folders get the umask's modes.

Training writes big files (checkpoints of tens of GB, shards, exported folders). When the disk is
full, torch reports "[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598" and
safetensors "I/O error: ... (os error 28)": neither names the file or the cause. `writing(path)`
turns those into a `WriteFailed` that says which file, why, and how much space is left.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

# Errors the file system gives when it takes no more bytes (disk full, quota, file-size limit).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(InputError):
    """A training output could not be written (full disk, quota, permissions): the file and the cause."""


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                return "unknown space"
            return f"{free / 2**30:.2f} GiB free in {folder}"
    return "unknown space"


def _refused_write(error: BaseException) -> tuple[int, str] | None:
    """(errno, cause) of a refused write, also when a library wrapped it in its own error text; else None."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno, os.strerror(error.errno)
    text = str(error)
    if "inline_container.cc" in text or "PytorchStreamWriter failed" in text:
        # torch's zip writer lost bytes and kept no errno: a full disk, a quota or a file-size limit.
        return errno.ENOSPC, "torch's writer lost bytes: full disk, quota or file-size limit"
    for code in _NO_SPACE | {errno.EACCES, errno.EROFS}:
        if f"os error {code})" in text or f"[Errno {code}]" in text:  # safetensors (Rust), DCP's wrapped errors
            return code, os.strerror(code)
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a refused write of `path` (a file or the folder being filled) into `WriteFailed`."""
    try:
        yield
    except Exception as error:  # OSError, torch's RuntimeError, safetensors' own SafetensorError
        refused = _refused_write(error)
        if refused is None or isinstance(error, WriteFailed):
            raise
        code, cause = refused
        path = Path(path)
        if code in _NO_SPACE:
            raise WriteFailed(f"could not write {path}: the disk took no more bytes ({cause}; "
                              f"{_free_space(path)}); free some space or write to another disk") from None
        raise WriteFailed(f"could not write {path}: {cause}") from None


def folder_mode() -> int:
    """Permissions of a normally created folder under the current umask (mkdtemp alone gives 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def file_mode() -> int:
    """Permissions of a normally created file under the current umask."""
    return folder_mode() & 0o666


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the umask's permissions (it creates its files 0600 itself)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def copy_file(source: Path, target: Path) -> None:
    """Copy the bytes only: the copy gets the umask's permissions, not the source's (shutil.copy2 keeps 0600)."""
    with writing(target):
        shutil.copyfile(source, target)


def remove_stale_temp_folders(root: Path, prefix: str = ".step_") -> list[Path]:
    """Remove `<root>/.step_*.tmp` folders a killed save left behind (tens of GB at 7B); returns them."""
    removed = []
    if root.is_dir():
        for stale in root.glob(f"{prefix}*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed
