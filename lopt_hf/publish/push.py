"""Publish an artifact folder to the Hub: the three core files, the re-rendered card and the images it shows.

Used by ``lopt-hf export --push-to-hub``, ``lopt-hf push`` and ``scripts/metatrain.py --push-to-hub``.
(``LearnedOptimizerModel.push_to_hub`` only knows the three core files.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

from ..hub import LearnedOptimizerModel, load_artifact
from ..model_card import card_images

__all__ = ["push_artifact_folder", "lopt_hf_version"]


def lopt_hf_version() -> str:
    """The installed lopt_hf version (``"unknown"`` when it is not installed as a package)."""
    try:
        return version("lopt_hf")
    except PackageNotFoundError:
        return "unknown"


def _referenced_files(artifact: LearnedOptimizerModel, directory: Path) -> list[str]:
    """Images the card shows (provenance plots), relative to the folder; must stay inside it."""
    names = []
    for plot, _ in card_images(artifact.config.provenance or {}):
        relative = PurePosixPath(plot)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{directory}/config.json: provenance plot {plot!r} must be a path inside "
                             f"the artifact folder")
        if (directory / relative).is_file():
            names.append(str(relative))
    return names


def push_artifact_folder(directory: str | os.PathLike[str], repo_id: str, *, private: bool | None = None,
                         revision: str | None = None, commit_message: str | None = None,
                         token: str | None = None, endpoint: str | None = None) -> Any:
    """Validate an artifact folder and upload it to a Hub model repo in one commit.

    Uploads ``config.json``, ``model.safetensors``, a ``README.md`` re-rendered for ``repo_id``
    (usage snippets name the repo) and the images the card references. Returns the
    ``CommitInfo`` (a str: the commit URL).
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    artifact = load_artifact(directory)  # validates before anything is uploaded
    assets = _referenced_files(artifact, directory)
    api = HfApi(endpoint=endpoint, token=token, library_name="lopt_hf", library_version=lopt_hf_version())
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifact.save_pretrained(tmp, repo_id=repo_id)
        for name in assets:
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / name, target)
        return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp,
                                 allow_patterns=["config.json", "model.safetensors", "README.md", *assets],
                                 commit_message=commit_message or f"Upload learned optimizer ({artifact.config.rule})",
                                 revision=revision)
