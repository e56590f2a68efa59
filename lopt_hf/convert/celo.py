"""Convert a published Celo / Celo-Adam ``theta.state`` (flax msgpack) into a lopt_hf artifact.

The authors' checkpoints (github amoudgl/celo; Hub ``amoudgl/celo``, ``amoudgl/celo-adam``) hold
the haiku tree of the learned scheduler — ``rnn_params/{linear, linear_1, linear_2, rnn/linear,
step_size, rnn_to_controls}/{w, b}`` and ``lstm_init_state/{hidden, cell}`` — and, for Celo, the
per-element MLP ``ff_mod_stack/~/{w0__0 … w0__13, b0, w1, b1, w2, b2}`` with a leading
``param_inits`` axis. The rules :mod:`lopt_hf.rules.celo` keep those names verbatim, so theta is
the flattened tree. Sizes come from the shapes (``lstm_hidden_size`` from ``lstm_init_state``;
Celo's ``param_inits``, MLP width and depth from ``ff_mod_stack``); everything is then checked
against the rule's ``theta_shapes()`` exactly — names, shapes, floating point, finite.

Both run on every tensor (no harness) and carry their step size inside the rule (``step_mult``
0.001 times the scheduler's ``lr_mult``), so the artifact's ``lr`` is 1. Both are *scheduled*: the
optimizer needs the planned number of steps and the loss at every step.

Command line: ``lopt-hf convert celo|celo-adam PATH/theta.state OUT_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..artifact_validation import ArtifactError
from ..rules.celo import Celo, CeloAdam
from .checkpoint import (FF, FORMAT_NAMES, LSTM_INIT, checked_theta, converted_artifact, dim, mismatch_hint,
                         read_flat_checkpoint)

__all__ = ["CELO_VARIANTS", "SCHEDULED_USAGE", "convert_celo", "read_celo_theta", "scheduler_architecture"]

PAPER = "https://arxiv.org/abs/2501.12670"
CODE = "https://github.com/amoudgl/celo"
AUTHORS = "Abhinav Moudgil, Boris Knyazev, Guillaume Lajoie, Eugene Belilovsky"
CITATION = """@article{moudgil2025celo,
      title={Celo: Training Versatile Learned Optimizers on a Compute Diet},
      author={Abhinav Moudgil and Boris Knyazev and Guillaume Lajoie and Eugene Belilovsky},
      journal={Transactions on Machine Learning Research},
      year={2025},
      url={https://arxiv.org/abs/2501.12670},
}"""
# How a scheduled rule is driven (said on every converted card).
SCHEDULED_USAGE = ("A learned scheduler drives this optimizer: it needs the planned number of training steps "
                   "(`optimizer.set_total_steps(num_steps)`) and the training loss at every step "
                   "(`optimizer.step(loss=loss)`; with `transformers.Trainer`, `LearnedOptimizerCallback`).")
OPTIMIZER_DEFAULTS = {"lr": 1.0, "weight_decay": 0.0}

CELO_VARIANTS: dict[str, dict[str, Any]] = {
    "celo": {
        "rule": Celo,
        "name": "Celo",
        "weights": "amoudgl/celo",
        "description": (
            "Celo learned optimizer (Moudgil, Knyazev, Lajoie, Belilovsky — \"Celo: Training Versatile Learned "
            "Optimizers on a Compute Diet\", TMLR 2025, [arXiv 2501.12670](" + PAPER + ")), converted from the "
            "authors' published `theta.state` for PyTorch. A learned LSTM scheduler reads the training loss and "
            "the fraction of training done and sets a per-tensor step multiplier for a learned per-element MLP "
            "update rule, applied to every parameter. Original code: [" + CODE + "](" + CODE + ") (MIT licence)."),
    },
    "celo-adam": {
        "rule": CeloAdam,
        "name": "Celo-Adam",
        "weights": "amoudgl/celo-adam",
        "description": (
            "Celo-Adam learned optimizer (Moudgil, Knyazev, Lajoie, Belilovsky — \"Celo: Training Versatile "
            "Learned Optimizers on a Compute Diet\", TMLR 2025, [arXiv 2501.12670](" + PAPER + ")), converted "
            "from the authors' published `theta.state` for PyTorch. Celo's learned LSTM scheduler sets Adam's "
            "per-tensor learning rate from the training loss and the fraction of training done. Original code: "
            "[" + CODE + "](" + CODE + ") (MIT licence)."),
    },
}


def scheduler_architecture(flat: dict[str, Any], with_mlp: bool) -> dict[str, int]:
    """The sizes the shapes say: ``lstm_hidden_size``, and with the per-element MLP (Celo, VeLO)
    ``param_inits``, ``ff_hidden_size``, ``ff_hidden_layers``. Defaults stand in where a tensor is
    missing or malformed — the exact check against the rule then names it."""
    config = {"lstm_hidden_size": dim(flat, f"{LSTM_INIT}hidden", 1, 64)}
    if with_mlp:
        layers = 0
        while f"{FF}w{layers + 1}" in flat:  # w1, w2, ...: one per hidden layer after the first
            layers += 1
        config |= {"param_inits": dim(flat, f"{FF}b0", 0, 1), "ff_hidden_size": dim(flat, f"{FF}b0", 1, 4),
                   "ff_hidden_layers": max(layers, 1)}
    return config


def read_celo_theta(path: str | os.PathLike[str], variant: str = "celo") -> tuple[dict[str, Tensor], dict[str, int]]:
    """Read and check a Celo (``variant="celo"``) or Celo-Adam (``"celo-adam"``) ``theta.state``.

    Returns:
        ``(theta, rule_config)``: theta under the original haiku names, float32; the sizes found.

    Raises:
        ArtifactError: one line naming the file — not a flax msgpack file, another format (named),
            missing or extra leaves, wrong shapes, non-float or non-finite values.
    """
    if variant not in CELO_VARIANTS:
        raise ValueError(f"unknown Celo variant {variant!r}; choose one of {sorted(CELO_VARIANTS)}")
    source, label = str(path), FORMAT_NAMES[variant]
    flat = read_flat_checkpoint(path)
    headline = f"not a {label} checkpoint{mismatch_hint(flat, variant)}"
    config = scheduler_architecture(flat, with_mlp=variant == "celo")
    try:
        rule = CELO_VARIANTS[variant]["rule"](**config)
    except ValueError as err:
        raise ArtifactError(source, str(err), headline=headline) from None
    return checked_theta(flat, rule.theta_shapes(), source, headline), config


def convert_celo(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                 variant: str = "celo", provenance: dict[str, Any] | None = None, force: bool = False) -> Any:
    """Convert a Celo / Celo-Adam ``theta.state`` into an artifact; write it to ``out_dir`` if given.

    Args:
        checkpoint: path of the flax msgpack ``theta.state``.
        out_dir: folder to create with ``config.json``, ``model.safetensors``, ``README.md`` (all or
            nothing, see :func:`lopt_hf.convert.checkpoint.write_artifact`).
        variant: ``"celo"`` or ``"celo-adam"``.
        provenance: extra provenance entries (merged over the defaults).
        force: replace the artifact files of an existing non-empty ``out_dir``.

    Returns:
        the ``LearnedOptimizerModel``.
    """
    theta, config = read_celo_theta(checkpoint, variant)
    spec = CELO_VARIANTS[variant]
    info = {
        "name": spec["name"],
        "description": spec["description"],
        "license": "mit",
        "tags": [spec["rule"].name, "learned-scheduler", "converted-from-jax"],
        "citation": CITATION,
        "limitations": SCHEDULED_USAGE,
        "source": f"converted by lopt_hf from the flax checkpoint {Path(checkpoint).name} ({variant})",
        "original_authors": AUTHORS,
        "paper": PAPER,
        "original_code": CODE,
        "original_license": "MIT",
        "original_weights": spec["weights"],
        **(provenance or {}),
    }
    return converted_artifact(spec["rule"].name, theta, config, OPTIMIZER_DEFAULTS, None, info, out_dir, force)
