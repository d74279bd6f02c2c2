"""Atomic writes: an interrupted write leaves the previous file whole and no temp file behind."""

from __future__ import annotations

import json
import os

import pytest

from offload import fileio


def test_write_and_replace(tmp_path):
    target = tmp_path / "result.json"
    fileio.write_json_atomic(target, {"a": 1})
    fileio.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    fileio.write_json_atomic(target, {"old": True})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_json_atomic(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
