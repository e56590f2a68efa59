"""Learned optimizers meta-trained with lopt_hf and shipped inside the package.

Each one is an ordinary artifact folder (``config.json`` + ``model.safetensors`` + ``README.md``
model card, plus the images its card shows) under ``lopt_hf/pretrained/<name>/``, so it loads
offline by its short name::

    from lopt_hf import load_lopt
    optimizer = load_lopt("lopt-hf/celo-adam-ns", model)

Short names take precedence over the Hub: ``load_artifact("lopt-hf/small-fc-lolo")`` never
touches the network (a local folder of the same relative path still wins, like everywhere else).
Each card states the meta-training command and seed that reproduce the artifact
(``configs/pretrained/*.yaml`` + ``scripts/package_pretrained.py``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["NAMESPACE", "SHIPPED", "available_pretrained", "pretrained_path"]

NAMESPACE = "lopt-hf"
# Short name (without the namespace) → one-line summary; the folder of the same name holds the artifact.
SHIPPED: dict[str, str] = {
    "celo-adam-ns": "the default: the published Celo-Adam with Newton–Schulz for matrices and per-tensor scheduler "
                    "inputs, fine-tuned by lopt_hf on LMs, wide MLPs and CNNs; beats AdamW 1e-3 on every lopt-hf eval "
                    "task and tuned AdamW on 15 of 16 (see its card)",
    "celo-adam-mix": "the previous default: the published Celo-Adam with per-tensor scheduler inputs (no Newton–Schulz), "
                     "fine-tuned by lopt_hf on LMs, wide MLPs and CNNs; also beats AdamW 1e-3 on every lopt-hf eval "
                     "task (see its card)",
    "small-fc-lolo": "research baseline: small_fc_lopt meta-trained with LoLO on 8×8 image MLPs (digits, "
                     "Fashion-MNIST, MNIST); loses to AdamW outside them (see its card)",
    "celo2-base-mini": "research baseline: Celo2-base architecture meta-trained with LoLO on 8×8 image MLPs "
                       "(digits, Fashion-MNIST, MNIST); loses to AdamW outside them (see its card)",
}


def available_pretrained() -> dict[str, str]:
    """``"lopt-hf/<name>"`` → summary, for every optimizer shipped in this installation."""
    return {f"{NAMESPACE}/{name}": summary for name, summary in SHIPPED.items() if _folder(name) is not None}


def pretrained_path(name: str) -> Path | None:
    """The folder of shipped optimizer ``name`` (``"lopt-hf/small-fc-lolo"``), else ``None``.

    Only the full ``lopt-hf/…`` name counts, so a bare ``"small-fc-lolo"`` keeps meaning a local folder.
    """
    prefix = f"{NAMESPACE}/"
    if not name.startswith(prefix) or name[len(prefix):] not in SHIPPED:
        return None
    return _folder(name[len(prefix):])


def _folder(short: str) -> Path | None:
    folder = Path(str(resources.files(__package__).joinpath(short)))
    return folder if (folder / "config.json").is_file() else None
