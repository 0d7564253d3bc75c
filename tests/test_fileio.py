"""Atomic writes: the destination holds the old content or the new, and no temp file is left behind."""
import os

import pytest

from lumina_core.fileio import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_text_and_bytes_replace_whole_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "first é")          # creates the missing folder
    assert target.read_bytes() == "first é".encode("utf-8")
    atomic_write_bytes(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert os.listdir(target.parent) == ["a.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.") and tmp.suffix == ".tmp"
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    from PIL import Image

    target = tmp_path / "out.png"
    with atomic_path(target) as tmp:
        Image.new("RGB", (4, 2), (255, 0, 0)).save(tmp, format="PNG")
        assert not target.exists()                 # invisible until the writer has finished
    with Image.open(target) as image:
        assert image.size == (4, 2) and image.getpixel((0, 0)) == (255, 0, 0)
    assert os.listdir(tmp_path) == ["out.png"]


def test_written_files_follow_the_umask_not_mkstemp_0600(tmp_path):
    import importlib
    import os
    import stat

    import lumina_core.fileio as fileio

    mask = os.umask(0o022)
    try:
        importlib.reload(fileio)  # the mode is read from the umask at import
        fileio.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
        importlib.reload(fileio)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
