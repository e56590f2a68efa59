"""Shared steps of the flax-checkpoint converters: read, recognise, check against a rule, write atomically.

Every published learned optimizer of the Celo family is one ``theta.state``: a haiku parameter
tree serialised with ``flax.serialization.to_bytes``. The trees tell the optimizers apart:

=============  ================================================================================
``celo2``      only ``ff_mod_stack/~/…`` (the per-element MLP)
``celo-adam``  only the scheduler: ``rnn_params/…`` and ``lstm_init_state/…``
``celo``       both, the scheduler's input width (``rnn_params/linear/w`` rows) 18 — the loss and
               fraction-of-training features alone
``velo``       both, a wider scheduler input (18 + VeLO's per-tensor statistics)
=============  ================================================================================

:func:`recognise_tree` names the format of a flattened tree; each converter then infers its sizes
from the shapes, builds the rule and checks the tree against the rule's ``theta_shapes()`` exactly
(:func:`checked_theta`). :func:`write_artifact` writes the finished artifact into a fresh temporary
folder and renames it into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..artifact_validation import ArtifactError
from ..rules.scheduler import NUM_GLOBAL_FEATURES
from .flax_msgpack import FlaxMsgpackError, flatten_tree, read_flax_msgpack, to_torch

__all__ = ["FORMAT_NAMES", "checked_theta", "one_line_problems", "read_flat_checkpoint", "recognise_tree",
           "write_artifact"]

FF = "ff_mod_stack/~/"
RNN = "rnn_params/"
LSTM_INIT = "lstm_init_state/"
# What each format is called in messages and on the command line.
FORMAT_NAMES = {"celo2": "Celo2", "celo": "Celo", "celo-adam": "Celo-Adam", "velo": "VeLO"}
# Problems listed in a one-line error before "(and N more)".
MAX_LISTED = 3


def read_flat_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The leaves of a flax msgpack file by ``/``-joined name (arrays, or whatever else the file holds).

    Raises:
        ArtifactError: the file is missing, too large, not msgpack or not a flax tree.
    """
    try:
        tree = read_flax_msgpack(path)
    except FlaxMsgpackError as err:
        raise ArtifactError(str(path), f"not a flax msgpack checkpoint: {err.reason}") from None
    return flatten_tree(tree)


def recognise_tree(flat: dict[str, Any]) -> str | None:
    """Which published format a flattened tree looks like (a key of :data:`FORMAT_NAMES`), or ``None``.

    Only the names (and the scheduler's input width) are looked at; the converter checks the rest.
    """
    tops = {name.split("/", 1)[0] for name in flat}
    has_ff, has_scheduler = "ff_mod_stack" in tops, bool(tops & {"rnn_params", "lstm_init_state"})
    if tops - {"ff_mod_stack", "rnn_params", "lstm_init_state"} or not (has_ff or has_scheduler):
        return None
    if not has_scheduler:
        return "celo2"
    if not has_ff:
        return "celo-adam"
    width = flat.get(f"{RNN}linear/w")
    if isinstance(width, np.ndarray) and width.ndim == 2 and width.shape[0] > NUM_GLOBAL_FEATURES:
        return "velo"
    return "celo"


def mismatch_hint(flat: dict[str, Any], wanted: str) -> str:
    """`` (it looks like a … checkpoint: use lopt-hf convert …)`` when the tree is another known format."""
    found = recognise_tree(flat)
    if found is None or found == wanted:
        return ""
    return f" (it looks like a {FORMAT_NAMES[found]} checkpoint: use `lopt-hf convert {found}`)"


def dim(flat: dict[str, Any], name: str, axis: int, default: int) -> int:
    """``flat[name].shape[axis]`` when that exists and is positive, else ``default`` (the check reports it)."""
    value = flat.get(name)
    if isinstance(value, np.ndarray) and value.ndim > axis and value.shape[axis] > 0:
        return int(value.shape[axis])
    return default


def one_line_problems(problems: list[str]) -> str:
    """Problems joined on one line, the first :data:`MAX_LISTED` of them."""
    shown = "; ".join(problems[:MAX_LISTED])
    return shown + (f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else "")


def checked_theta(flat: dict[str, Any], expected: dict[str, tuple[int, ...]], source: str,
                  headline: str) -> dict[str, Tensor]:
    """Check that ``flat`` holds exactly ``expected`` (names, shapes, floating point, finite) → float32 theta.

    Raises:
        ArtifactError: one line naming ``source``, ``headline`` and the first few problems.
    """
    problems = [f"missing {name} (shape {shape})" for name, shape in expected.items() if name not in flat]
    for name, value in flat.items():
        if not isinstance(value, np.ndarray):
            problems.append(f"{name}: not an array ({type(value).__name__})")
        elif name not in expected:
            problems.append(f"unexpected array {name} {tuple(value.shape)}")
        elif tuple(value.shape) != expected[name]:
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {expected[name]}")
        elif value.dtype.kind != "f":
            problems.append(f"{name}: dtype {value.dtype}, expected floating point")
        elif not np.isfinite(value).all():
            problems.append(f"{name}: {int((~np.isfinite(value)).sum())} non-finite value(s)")
    if problems:
        raise ArtifactError(source, one_line_problems(problems), headline=headline)
    return {name: to_torch(flat[name]).to(torch.float32) for name in expected}


def converted_artifact(rule: str, theta: dict[str, Tensor], rule_config: dict[str, Any],
                       optimizer_defaults: dict[str, Any], harness: dict[str, Any] | None, provenance: dict[str, Any],
                       out_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Any:
    """The artifact of a converted checkpoint (``create_artifact``: validated like any other), written to
    ``out_dir`` by :func:`write_artifact` when given — the last step of every converter."""
    from ..hub import create_artifact

    artifact = create_artifact(rule, theta=theta, rule_config=rule_config, optimizer_defaults=dict(optimizer_defaults),
                               harness=harness, provenance=provenance)
    if out_dir is not None:
        write_artifact(artifact, out_dir, force=force)
    return artifact


def write_artifact(artifact: Any, out_dir: str | os.PathLike[str], force: bool = False) -> Path:
    """Save ``artifact`` (a ``LearnedOptimizerModel``) as the folder ``out_dir``, all or nothing.

    ``save_pretrained`` stages the files and renames them into place: an interrupted or failed save
    leaves no half-written artifact. An existing non-empty ``out_dir`` is refused unless ``force``,
    which replaces the artifact files in it (undone if one fails) and leaves other files alone.

    Raises:
        ArtifactError: ``out_dir`` is a file, or a non-empty folder without ``force``.
    """
    out = Path(out_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise ArtifactError(str(out), "exists and is not a folder; choose a new output folder")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not force:
        raise ArtifactError(str(out), "exists and is not empty; choose a new output folder (or --force to "
                                      "replace the artifact files in it)")
    # save_pretrained writes all or nothing: a new folder appears complete, an existing one has every
    # artifact file replaced (each by rename, undone if a later one fails) and its other files left alone.
    artifact.save_pretrained(out)
    return out
