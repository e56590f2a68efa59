"""Publish an artifact folder to the Hub: the three core files, the re-rendered card and the images it shows.

Used by ``lopt-hf export --push-to-hub``, ``lopt-hf push`` and ``scripts/metatrain.py --push-to-hub``.
The upload itself is ``LearnedOptimizerModel.push_to_hub`` (the one Hub push), with the card's
images as ``extra_files``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from ..hub import LearnedOptimizerModel, file_inside, load_artifact, lopt_hf_version
from ..model_card import card_images

__all__ = ["push_artifact_folder", "lopt_hf_version"]


def _referenced_files(artifact: LearnedOptimizerModel, directory: Path) -> list[str]:
    """Images the card shows (provenance plots), relative to the folder; must stay inside it."""
    names = []
    for plot, _ in card_images(artifact.config.provenance or {}):
        relative = PurePosixPath(plot)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{directory}/config.json: provenance plot {plot!r} must be a path inside "
                             f"the artifact folder")
        if os.path.lexists(directory / relative):
            # a link leaving the folder (or anything but a regular file) is refused, never uploaded
            file_inside(directory, relative, f"{directory / relative} (card image of {directory}/config.json)")
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
    directory = Path(directory)
    artifact = load_artifact(directory)  # validates before anything is uploaded
    assets = _referenced_files(artifact, directory)
    return artifact.push_to_hub(repo_id, private=private, revision=revision, token=token, endpoint=endpoint,
                                commit_message=commit_message,
                                extra_files={name: file_inside(directory, name, str(directory / name))
                                             for name in assets})
