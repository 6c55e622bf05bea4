"""The package's one way of writing a file: the target is replaced whole or left as it was."""
from __future__ import annotations

import pytest
from test_bad_inputs import no_temporaries, small_disk

from medtransfer.utils.atomic import DiskFullError, atomic_open, write_bytes_atomic, write_csv_atomic, write_text_atomic


def test_writers_replace_the_target_whole(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01" * 10)
    write_text_atomic(tmp_path / "sub" / "b.txt", "été\n")  # the folder is created
    write_csv_atomic(tmp_path / "c.csv", [{"x": 1, "y": float("nan")}], ["x", "y"])
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" * 10
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "été\n"
    assert (tmp_path / "c.csv").read_text(encoding="utf-8").splitlines() == ["x,y", "1,"]
    assert not no_temporaries(tmp_path)


def test_a_failure_inside_the_block_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(ValueError, match="writer failed"):
        with atomic_open(target, "w") as fh:
            fh.write("half of the new content")
            raise ValueError("writer failed")
    assert target.read_text() == "old"
    assert not no_temporaries(tmp_path)


def test_a_full_disk_is_a_disk_full_error_and_leaves_the_old_file(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        write_bytes_atomic(disk / "kept.bin", b"first")
        with pytest.raises(DiskFullError, match="No space left on device"):
            write_bytes_atomic(disk / "kept.bin", b"x" * (1 << 20))
        assert (disk / "kept.bin").read_bytes() == b"first"
        assert not no_temporaries(disk)
