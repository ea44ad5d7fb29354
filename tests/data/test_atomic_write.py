"""Whole-or-nothing writes: what the leaderboard, export, split files and caches go through."""

import os
import stat

import pytest

from data.atomic_write import write_atomically, write_text_atomically


def test_text_is_written_exactly_with_the_permissions_of_a_plain_open(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    write_text_atomically(target, "a,b\r\n1,2\n")
    assert target.read_bytes() == b"a,b\r\n1,2\n"  # no newline translation, parent created
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")

    def half_then_fail(tmp):
        assert tmp.parent == target.parent and tmp.suffix == ".onnx"  # same filesystem, same format
        tmp.write_text("half a model")
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError, match="check failed"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "leaderboard.md"
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []
