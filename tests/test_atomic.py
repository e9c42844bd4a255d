"""Atomic writes: a reader or a crash never sees half a file."""
import os

import pytest

from bench import atomic


def test_replaces_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temp file left behind
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_new_files_get_the_users_default_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
