"""medsearch._files: atomic writes leave the old file or the whole new one, never a half, and no temporary."""

from __future__ import annotations

import hashlib
import io
import stat

import numpy as np
import pytest

from medsearch._files import (
    fsync_dir,
    public_mode,
    sha256_file,
    sha256_stream,
    write_bytes,
    write_file_with,
    write_text,
    write_with,
)

PAYLOADS = [b"", b"abc", bytes(range(256)) * 4096]


@pytest.mark.parametrize("data", PAYLOADS, ids=lambda d: f"{len(d)}B")
def test_write_bytes_returns_the_checksum_and_size_of_what_it_wrote(tmp_path, data):
    digest, size = write_bytes(tmp_path / "f.bin", data)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sha256_file(tmp_path / "f.bin") == digest


def test_write_bytes_takes_chunks(tmp_path):
    chunks = [b"ab", memoryview(b"cd"), b"e"]
    digest, size = write_bytes(tmp_path / "f.bin", iter(chunks))
    assert (tmp_path / "f.bin").read_bytes() == b"abcde"
    assert (digest, size) == (hashlib.sha256(b"abcde").hexdigest(), 5)


def test_files_are_owner_only_unless_a_mode_is_given(tmp_path):
    write_text(tmp_path / "private.txt", "x")
    write_text(tmp_path / "shared.txt", "x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    write_text(target, "old")

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_with(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_write_with_takes_a_file_writer(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_with(tmp_path / "a.npy", lambda f: np.save(f, array))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)


def test_write_file_with_takes_a_path_writer_and_hashes_from_disk(tmp_path):
    digest, size = write_file_with(tmp_path / "out.bin", lambda p: open(p, "wb").write(b"from a path"))
    assert (tmp_path / "out.bin").read_bytes() == b"from a path"
    assert (digest, size) == (hashlib.sha256(b"from a path").hexdigest(), 11)
    with pytest.raises(OSError):
        write_file_with(tmp_path / "bad.bin", lambda p: (_ for _ in ()).throw(OSError("no space")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_sha256_stream_reads_from_the_position_on():
    f = io.BytesIO(b"skip-this:keep")
    f.seek(10)
    assert sha256_stream(f) == (hashlib.sha256(b"keep").hexdigest(), 4)


def test_fsync_dir_of_a_missing_folder_is_a_no_op(tmp_path):
    fsync_dir(tmp_path / "missing")
    fsync_dir(tmp_path)


def test_public_mode_follows_the_umask(tmp_path):
    import os

    before = os.umask(0o027)
    try:
        write_text(tmp_path / "report.csv", "a,b\n", mode=public_mode())
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "report.csv").stat().st_mode) == 0o640
