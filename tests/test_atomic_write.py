"""Tests for src/dgg/atomic_write.py: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from dgg.atomic_write import write_text_atomic


def test_the_new_text_replaces_the_old_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    write_text_atomic(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "experiment.json"
    path.write_text('{"seeds": [0]}')

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, '{"seeds": [0, 1]}')
    assert path.read_text() == '{"seeds": [0]}'
    assert [p.name for p in tmp_path.iterdir()] == ["experiment.json"]
