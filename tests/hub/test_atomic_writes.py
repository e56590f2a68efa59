"""Folders are written all or nothing (issue 19, item 2): ``save_pretrained`` and ``lopt-hf card``.

Each failure is real — a folder where a file should go, or the standard library's own file
operations made to fail mid-way (``Path.write_bytes`` / ``os.replace`` / ``os.rename`` raising on
their n-th call) — and each test checks that the old folder is left byte for byte as it was (or
that no folder appears), with no temporary files left behind. (The export command's counterpart
is in tests/publish/test_publish_export.py.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lopt_hf import create_artifact, load_artifact
from lopt_hf.cli import main as cli_main
from lopt_hf.hub import staged_folder

RULE = "per_param_mlp"


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry of ``folder`` (recursively, hidden ones included): file bytes, or the target of a link."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            entries[key] = path.read_bytes()
        else:
            entries[key] = "<dir>"
    return entries


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int,
                 when: Callable[..., bool] = lambda *args: True) -> list[int]:
    """Make ``owner.name`` raise ``OSError(ENOSPC)`` on its ``call``-th call (counting calls where ``when``).

    The first argument (a path) is the error's ``filename``, as in the real error."""
    original = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            calls[0] += 1
            if calls[0] == call:
                raise OSError(28, "No space left on device (simulated)", os.fspath(args[0]))  # as the real one
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def other_artifact(seed: int) -> Any:
    artifact = create_artifact(RULE, seed=seed)
    assert not torch.equal(artifact.theta()["w0"], create_artifact(RULE, seed=0).theta()["w0"])
    return artifact


# =========================================================================== save_pretrained


def test_a_failed_save_into_a_new_folder_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fail_on_call(monkeypatch, Path, "write_bytes", 2)  # the second of the three files
    with pytest.raises(OSError, match="simulated"):
        create_artifact(RULE).save_pretrained(tmp_path / "new" / "artifact")
    assert calls[0] == 2
    assert not (tmp_path / "new" / "artifact").exists()
    assert list((tmp_path / "new").iterdir()) == []  # no staging folder left behind


def test_a_failed_final_rename_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_call(monkeypatch, os, "rename", 1)
    with pytest.raises(OSError, match="simulated"):
        create_artifact(RULE).save_pretrained(tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing, call", [("write_bytes", 2), ("write_bytes", 3), ("replace", 1), ("replace", 2),
                                           ("replace", 3)])
def test_a_failed_save_over_an_artifact_leaves_it_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            failing: str, call: int) -> None:
    directory = tmp_path / "artifact"
    create_artifact(RULE, seed=0).save_pretrained(directory)
    (directory / "notes.txt").write_text("mine")
    before = snapshot(directory)
    owner = Path if failing == "write_bytes" else os
    # os.replace: count only the renames into the artifact folder (the commit of the staged files)
    fail_on_call(monkeypatch, owner, failing, call,
                 when=lambda *args: failing == "write_bytes" or Path(args[1]).parent == directory)
    with pytest.raises(OSError, match="simulated"):
        other_artifact(seed=1).save_pretrained(directory)
    monkeypatch.undo()
    assert snapshot(directory) == before
    assert torch.equal(load_artifact(directory).theta()["w0"], create_artifact(RULE, seed=0).theta()["w0"])


def test_a_folder_in_the_way_of_the_second_file_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "artifact"
    create_artifact(RULE, seed=0).save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").mkdir()
    before = snapshot(directory)
    with pytest.raises(IsADirectoryError, match="model.safetensors"):
        other_artifact(seed=1).save_pretrained(directory)
    assert snapshot(directory) == before  # config.json, the first file written, is still the old one


def test_a_save_over_an_artifact_replaces_its_files_and_keeps_the_others(tmp_path: Path) -> None:
    directory = tmp_path / "artifact"
    create_artifact(RULE, seed=0).save_pretrained(directory)
    (directory / "notes.txt").write_text("mine")
    victim = tmp_path / "victim.md"
    victim.write_text("keep me")
    (directory / "README.md").unlink()
    (directory / "README.md").symlink_to(victim)
    artifact = other_artifact(seed=1)
    artifact.save_pretrained(directory)
    assert torch.equal(load_artifact(directory).theta()["w0"], artifact.theta()["w0"])
    assert victim.read_text() == "keep me" and not (directory / "README.md").is_symlink()
    assert sorted(snapshot(directory)) == ["README.md", "config.json", "model.safetensors", "notes.txt"]


def test_a_save_into_an_empty_or_linked_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    create_artifact(RULE).save_pretrained(tmp_path / "empty")
    load_artifact(tmp_path / "empty")
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    create_artifact(RULE).save_pretrained(tmp_path / "alias")
    assert sorted(snapshot(tmp_path / "real")) == ["README.md", "config.json", "model.safetensors"]


def test_staged_folder_changes_nothing_when_its_block_raises(tmp_path: Path) -> None:
    directory = tmp_path / "folder"
    directory.mkdir()
    (directory / "a.txt").write_text("old")
    with pytest.raises(KeyError):
        with staged_folder(directory) as staging:
            (staging / "a.txt").write_text("new")
            raise KeyError("boom")
    assert snapshot(directory) == {"a.txt": b"old"}
    with pytest.raises(NotADirectoryError):
        with staged_folder(directory / "a.txt"):
            pass


# ============================================================================== lopt-hf card


def test_card_failing_mid_write_keeps_the_old_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "artifact"
    create_artifact(RULE).save_pretrained(directory)
    (directory / "README.md").write_text("old card")
    before = snapshot(directory)
    fail_on_call(monkeypatch, os, "replace", 1)
    assert cli_main(["card", str(directory)]) == 2
    assert "simulated" in capsys.readouterr().err
    monkeypatch.undo()
    assert snapshot(directory) == before  # the old README.md, and no temporary file


def test_card_with_a_folder_in_the_way_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "artifact"
    create_artifact(RULE).save_pretrained(directory)
    (directory / "README.md").unlink()
    (directory / "README.md").mkdir()
    (directory / "README.md" / "keep.txt").write_text("keep")
    before = snapshot(directory)
    assert cli_main(["card", str(directory)]) == 2
    assert "README.md" in capsys.readouterr().err
    assert snapshot(directory) == before
