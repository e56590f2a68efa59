"""Foreign checkpoints: recognise a published ``theta.state``, convert it, cache the converted artifact.

One entry point for ``lopt-hf convert FORMAT`` (:func:`convert_checkpoint`) and one for loading the
authors' Hub repos directly (:func:`cached_conversion`, called by
:meth:`lopt_hf.hub.LearnedOptimizerModel.from_pretrained` when a repo or folder has no
``config.json`` but a ``theta.state``): ``load_lopt("amoudgl/celo", model)``.

**Which optimizer.** The checkpoint's tree says it (:func:`lopt_hf.convert.checkpoint.recognise_tree`):
Celo2 (MLP only), Celo-Adam (scheduler only), Celo or VeLO (both; VeLO's scheduler reads more
inputs); the sizes come from the shapes. One choice is not in the tree: Celo2 and Celo2-base share
their weights' format and differ in how they are run (:data:`lopt_hf.harness.RULE_PRESETS`). It is
taken from the repo's (or folder's) name — a name ending in ``-base`` (``amoudgl/celo2-base``) gets
Celo2-base, any other Celo2 checkpoint (``amoudgl/celo2``) the published Celo2 recipe.

**Cache.** A converted artifact is written once, as a regular artifact folder, under
``$LOPT_HF_CONVERTED_CACHE`` (default ``$HF_HOME/lopt_hf/converted``, i.e.
``~/.cache/huggingface/lopt_hf/converted``), at ``<owner>--<name>/<format>-<sha256 of theta.state>-v<N>``:
keyed by the checkpoint's content, so a new commit of the repo converts again and the same bytes
never do; ``N`` (:data:`CONVERTER_VERSION`) changes when the converters do. The ``theta.state`` itself
stays in the huggingface_hub cache, so with both cached the second load needs no network
(``HF_HUB_OFFLINE=1`` works) and does no conversion. The folder is loaded and validated like any
artifact (its ``config.json`` records the sha256 of its weights).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ..artifact_validation import CONFIG_NAME, ArtifactError
from .celo import convert_celo
from .celo2 import convert_celo2
from .checkpoint import FORMAT_NAMES, read_flat_checkpoint, recognise_tree

__all__ = ["CONVERTER_VERSION", "FOREIGN_CHECKPOINT_NAME", "FORMATS", "cached_conversion", "celo2_variant_for",
           "convert_checkpoint", "converted_cache_root", "load_foreign_checkpoint", "recognise_checkpoint"]

FOREIGN_CHECKPOINT_NAME = "theta.state"
# Formats `lopt-hf convert` accepts (the Celo2 one with two variants).
FORMATS = tuple(FORMAT_NAMES)
# Part of every cache key: bump when a converter's output changes.
CONVERTER_VERSION = 1
CACHE_ENV = "LOPT_HF_CONVERTED_CACHE"


def convert_checkpoint(fmt: str, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                       *, variant: str | None = None, ff_mult: float | None = None,
                       provenance: dict[str, Any] | None = None, force: bool = False) -> Any:
    """Convert ``checkpoint`` as format ``fmt`` (one of :data:`FORMATS`); write it to ``out_dir`` if given.

    ``variant`` only applies to ``celo2`` (``"celo2"`` or ``"celo2-base"``), ``ff_mult`` only to
    ``velo`` (:mod:`lopt_hf.convert.velo`). Returns the ``LearnedOptimizerModel``; raises
    ``ArtifactError`` (one line, nothing written) for anything that is not a valid checkpoint of that format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {list(FORMATS)}")
    if variant is not None and fmt != "celo2":
        raise ValueError(f"variant={variant!r} only applies to the celo2 format")
    if ff_mult is not None and fmt != "velo":
        raise ValueError(f"ff_mult={ff_mult!r} only applies to the velo format")
    if fmt == "celo2":
        return convert_celo2(checkpoint, out_dir, variant=variant or "celo2", provenance=provenance, force=force)
    if fmt == "velo":
        from .velo import convert_velo

        return convert_velo(checkpoint, out_dir, ff_mult=ff_mult, provenance=provenance, force=force)
    return convert_celo(checkpoint, out_dir, variant=fmt, provenance=provenance, force=force)


def recognise_checkpoint(path: str | os.PathLike[str]) -> str:
    """The format of a ``theta.state`` (one of :data:`FORMATS`) from its tree; ``ArtifactError`` if none."""
    found = recognise_tree(read_flat_checkpoint(path))
    if found is None:
        raise ArtifactError(str(path), f"not a checkpoint lopt_hf can convert: its tree is none of "
                                       f"{', '.join(FORMAT_NAMES.values())}")
    return found


def celo2_variant_for(name: str) -> str:
    """Celo2 variant for a repo id or folder name: ``-base`` at the end → ``celo2-base``, else ``celo2``."""
    last = re.split(r"[/\\]", os.fspath(name).rstrip("/\\"))[-1].lower()
    return "celo2-base" if last.endswith("-base") else "celo2"


def converted_cache_root() -> Path:
    """Where converted artifacts are cached (see the module documentation)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "lopt_hf" / "converted"


def _cache_folder_name(name: str) -> str:
    """A repo id or folder path as one safe folder name (``owner/name`` → ``owner--name``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", os.fspath(name).strip("/\\")).strip("-.") or "checkpoint"
    return safe[-96:]


def cached_conversion(checkpoint: str | os.PathLike[str], name: str, source: str | None = None) -> Path:
    """The artifact folder converted from ``checkpoint`` (a foreign ``theta.state`` from ``name``), cached.

    Converts only when the cache does not hold this checkpoint's conversion yet. ``name`` (the repo
    id or folder) picks the Celo2 variant and names the cache entry; ``source`` (where the file came
    from) is recorded in the card.

    Raises:
        ArtifactError: the file is not a checkpoint of a known format, or not a valid one.
    """
    checkpoint = Path(checkpoint)
    data = checkpoint.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    fmt = recognise_checkpoint(checkpoint)
    variant = celo2_variant_for(name) if fmt == "celo2" else fmt
    folder = converted_cache_root() / _cache_folder_name(name) / f"{variant}-{digest}-v{CONVERTER_VERSION}"
    if (folder / CONFIG_NAME).is_file():
        return folder
    provenance = {"source": f"converted by lopt_hf (in memory, on load) from {source or checkpoint} "
                            f"(sha256 {digest}; recognised as {FORMAT_NAMES[fmt]}"
                            + (f", variant {variant} from the name {name!r})" if fmt == "celo2" else ")"),
                  "converted_from": name}
    try:
        convert_checkpoint(fmt, checkpoint, folder, variant=variant if fmt == "celo2" else None,
                           provenance=provenance)
    except ArtifactError:
        if (folder / CONFIG_NAME).is_file():  # another process converted it meanwhile
            return folder
        raise
    return folder


def load_foreign_checkpoint(checkpoint: str | os.PathLike[str], name: str, source: str | None = None) -> Any:
    """Load a foreign ``theta.state`` from ``name`` as a validated ``LearnedOptimizerModel``, via the cache.

    The converted folder is loaded with :func:`lopt_hf.hub.load_artifact` (all its checks); the
    model's ``name_or_path`` is ``name``. Where the cache cannot be written (a read-only home), the
    conversion is used from memory, with a warning.
    """
    from ..hub import load_artifact

    try:
        folder = cached_conversion(checkpoint, name, source)
    except OSError as err:
        import warnings

        warnings.warn(f"lopt_hf: could not cache the conversion of {source or checkpoint} under "
                      f"{converted_cache_root()} ({err}); converting in memory on every load "
                      f"(set {CACHE_ENV} to a writable folder)", stacklevel=3)
        fmt = recognise_checkpoint(checkpoint)
        variant = celo2_variant_for(name) if fmt == "celo2" else None
        artifact = convert_checkpoint(fmt, checkpoint, variant=variant,
                                      provenance={"source": f"converted by lopt_hf on load from {source or checkpoint}",
                                                  "converted_from": name})
    else:
        artifact = load_artifact(folder)
    artifact.config.name_or_path = os.fspath(name)
    return artifact
