"""Export refuses what is not a causal LM directory with one clean line."""

from __future__ import annotations

from pathlib import Path

import pytest

from specbridge.export import ExportError, export_draft


def export_error(model_dir: Path, tmp_path: Path) -> str:
    with pytest.raises(ExportError) as caught:
        export_draft(model_dir, tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path: Path) -> None:
    assert "not found" in export_error(tmp_path / "nowhere", tmp_path)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    assert "not a directory" in export_error(tmp_path / "model.bin", tmp_path)


def test_directory_without_model_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no config.json" in export_error(tmp_path / "empty", tmp_path)


def test_several_gguf_files(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    assert "several .gguf" in export_error(tmp_path, tmp_path)


def test_corrupt_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{")
    assert "cannot read the model config" in export_error(tmp_path, tmp_path)


def test_config_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "resnet"}')
    assert "not a causal LM" in export_error(tmp_path, tmp_path)


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}')
    assert "cannot load the weights" in export_error(tmp_path, tmp_path)
