"""Shapes build checkpoints: a finished model folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

from eclipse_prior.shapes.checkpoint import replacing_dir


def test_replacing_dir_swaps_the_whole_folder_on_success(tmp_path):
    out = tmp_path / "clip"
    out.mkdir()
    (out / "stale.json").write_text("old")
    with replacing_dir(out) as tmp:
        assert tmp.parent == out.parent and not any(tmp.iterdir())
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary or old folder left behind


def test_replacing_dir_leaves_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "judge"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with pytest.raises(OSError, match="disk full"), replacing_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise OSError("disk full")
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge"]


def test_replacing_dir_creates_a_missing_folder(tmp_path):
    with replacing_dir(tmp_path / "a" / "prior") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "a" / "prior" / "config.json").read_text() == "{}"
