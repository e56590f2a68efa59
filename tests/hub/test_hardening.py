"""Adversarial artifacts (issue 19): links leaving the folder, values that destroy the model, bombs, odd JSON.

Every test here reproduces one hole the issue lists and checks it is closed: a clear
``ArtifactError`` naming the file (and the key), or — for the optimizer — no non-finite value
ever written into a parameter.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lopt_hf import ArtifactError, create_artifact, load_artifact

RULE = "per_param_mlp"


def saved(tmp_path: Path, rule: str = RULE, name: str = "artifact", **kwargs: Any) -> Path:
    directory = tmp_path / name
    create_artifact(rule, **kwargs).save_pretrained(directory)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def expect_error(directory: Path, filename: str, *needles: str, **load_kwargs: Any) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(directory, **load_kwargs)
    message = str(info.value)
    assert str(directory / filename) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ======================================================================= (1) links and folders


@pytest.mark.parametrize("filename", ["config.json", "model.safetensors"])
def test_symlinked_core_file_leaving_the_folder_is_refused(tmp_path: Path, filename: str) -> None:
    directory = saved(tmp_path)
    outside = saved(tmp_path, name="elsewhere")
    (directory / filename).unlink()
    (directory / filename).symlink_to(outside / filename)
    expect_error(directory, filename, "outside the artifact folder")


def test_symlink_inside_the_folder_and_a_symlinked_folder_still_load(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "weights.bin").write_bytes((directory / "model.safetensors").read_bytes())
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to("weights.bin")
    load_artifact(directory)
    (tmp_path / "alias").symlink_to(directory, target_is_directory=True)
    load_artifact(tmp_path / "alias")


def test_hub_cache_snapshot_folder_still_loads(tmp_path: Path) -> None:
    """huggingface_hub's cache links snapshot files to ../../blobs: loading such a folder stays allowed."""
    repo = tmp_path / "models--user--lopt"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    source = saved(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (repo / "blobs" / name).write_bytes((source / name).read_bytes())
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    load_artifact(snapshot)


def test_subfolder_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "root"
    directory.mkdir()
    saved(tmp_path, name="x")
    with pytest.raises(ArtifactError, match=r"subfolder='\.\./x'"):
        load_artifact(directory, subfolder="../x")
    (directory / "inner").symlink_to(tmp_path / "x", target_is_directory=True)
    with pytest.raises(ArtifactError, match="leading outside"):
        load_artifact(directory, subfolder="inner")
    saved(directory, name="real")
    load_artifact(directory, subfolder="real")


def _stub_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    from types import SimpleNamespace

    import huggingface_hub

    uploaded: dict[str, bytes] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> Any:
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self: Any, *, folder_path: str, **kwargs: Any) -> str:
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploaded[path.relative_to(folder_path).as_posix()] = path.read_bytes()
        return "commit-url"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return uploaded


def test_push_refuses_a_card_image_linking_outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lopt_hf.publish.push import push_artifact_folder

    uploaded = _stub_hub(monkeypatch)
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET")
    directory = saved(tmp_path, provenance={"meta_training": {"plot": "meta_loss.png"}})
    (directory / "meta_loss.png").symlink_to(secret)
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        push_artifact_folder(directory, "someone/x")
    assert not uploaded
    (directory / "meta_loss.png").unlink()
    (directory / "meta_loss.png").write_bytes(b"\x89PNG")
    push_artifact_folder(directory, "someone/x")
    assert uploaded["meta_loss.png"] == b"\x89PNG"


def test_push_to_hub_extra_files_must_be_regular_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uploaded = _stub_hub(monkeypatch)
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET")
    (tmp_path / "plot.png").symlink_to(secret)
    artifact = create_artifact(RULE)
    with pytest.raises(ValueError, match="regular file|link"):
        artifact.push_to_hub("someone/x", extra_files={"plot.png": tmp_path / "plot.png"})
    with pytest.raises(ValueError, match="no '..'"):
        artifact.push_to_hub("someone/x", extra_files={"../plot.png": secret})
    assert not uploaded


def test_card_command_never_writes_through_a_symlinked_readme(tmp_path: Path) -> None:
    from lopt_hf.cli import main

    directory = saved(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (directory / "README.md").unlink()
    (directory / "README.md").symlink_to(victim)
    assert main(["card", str(directory)]) == 0
    assert victim.read_text() == "keep me"
    assert not (directory / "README.md").is_symlink()
    assert "library_name: lopt_hf" in (directory / "README.md").read_text()
