"""Convert a VeLO ``theta.state`` (flax msgpack, learned_optimization's ``HyperV2``) into a lopt_hf artifact.

The tree is Celo's (:mod:`lopt_hf.convert.celo`) — ``ff_mod_stack/~/…`` with a leading
``param_inits`` axis, ``rnn_params/…``, ``lstm_init_state/…`` — with a wider scheduler input
(VeLO's per-tensor statistics). The rule :mod:`lopt_hf.rules.velo` keeps the haiku names verbatim.

**Sizes.** ``lstm_hidden_size``, ``param_inits`` and the MLP's width and depth are read from the
shapes. ``ff_mult`` (the factor on the mixed per-element network) is in no tensor: a checkpoint of
the ``velo_4000`` size (LSTM 512, 256 networks — the architecture of the published VeLO) gets
the 100 that the original hard-codes; any other size gets 1.0, the ``velo_s`` setting of the Celo
paper (LSTM 64, 32 networks). ``ff_mult=`` (``--ff-mult``) overrides it.

Command line: ``lopt-hf convert velo PATH/theta.state OUT_DIR [--ff-mult X]``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..artifact_validation import ArtifactError
from ..rules.velo import Velo
from .celo import SCHEDULED_USAGE, scheduler_architecture
from .checkpoint import checked_theta, converted_artifact, mismatch_hint, read_flat_checkpoint

__all__ = ["VELO_4000_SIZE", "convert_velo", "default_ff_mult", "read_velo_theta"]

PAPER = "https://arxiv.org/abs/2211.09760"
CODE = "https://github.com/google/learned_optimization"
PORT_CODE = "https://github.com/amoudgl/celo"
AUTHORS = ("Luke Metz, James Harrison, C. Daniel Freeman, Amil Merchant, Lucas Beyer, James Bradbury, Naman Agrawal, "
           "Ben Poole, Igor Mordatch, Adam Roberts, Jascha Sohl-Dickstein")
CITATION = """@article{metz2022velo,
      title={VeLO: Training Versatile Learned Optimizers by Scaling Up},
      author={Luke Metz and James Harrison and C. Daniel Freeman and Amil Merchant and Lucas Beyer and
              James Bradbury and Naman Agrawal and Ben Poole and Igor Mordatch and Adam Roberts and
              Jascha Sohl-Dickstein},
      journal={arXiv preprint arXiv:2211.09760},
      year={2022},
      url={https://arxiv.org/abs/2211.09760},
}"""
# (lstm_hidden_size, param_inits) of the published VeLO checkpoint and the ff_mult it runs with.
VELO_4000_SIZE = (512, 256)
VELO_4000_FF_MULT = 100.0
OTHER_FF_MULT = 1.0
OPTIMIZER_DEFAULTS = {"lr": 1.0, "weight_decay": 0.0}
DESCRIPTION = (
    "VeLO learned optimizer (Metz et al., \"VeLO: Training Versatile Learned Optimizers by Scaling Up\", 2022, "
    "[arXiv 2211.09760](" + PAPER + ")), converted from a flax `theta.state` for PyTorch. A per-tensor LSTM reads "
    "the training loss, the fraction of training done and statistics of each tensor, mixes {inits} per-element MLPs "
    "for that tensor and sets its step size. Original code: [learned_optimization](" + CODE + ") (Apache-2.0), as "
    "cloned in [" + PORT_CODE + "](" + PORT_CODE + ")."
)


def default_ff_mult(lstm_hidden_size: int, param_inits: int) -> float:
    """100 for the ``velo_4000`` size, 1.0 otherwise (see the module documentation)."""
    return VELO_4000_FF_MULT if (lstm_hidden_size, param_inits) == VELO_4000_SIZE else OTHER_FF_MULT


def read_velo_theta(path: str | os.PathLike[str],
                    ff_mult: float | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and check a VeLO ``theta.state``.

    Returns:
        ``(theta, rule_config)``: theta under the original haiku names, float32; the sizes found and ``ff_mult``.

    Raises:
        ArtifactError: one line naming the file — not a flax msgpack file, another format (named),
            missing or extra leaves, wrong shapes, non-float or non-finite values.
    """
    source = str(path)
    flat = read_flat_checkpoint(path)
    headline = f"not a VeLO checkpoint{mismatch_hint(flat, 'velo')}"
    config: dict[str, Any] = scheduler_architecture(flat, with_mlp=True)
    if ff_mult is not None and not (isinstance(ff_mult, (int, float)) and math.isfinite(ff_mult) and ff_mult > 0):
        raise ValueError(f"ff_mult must be a positive finite number, got {ff_mult!r}")
    config["ff_mult"] = float(ff_mult if ff_mult is not None
                              else default_ff_mult(config["lstm_hidden_size"], config["param_inits"]))
    try:
        rule = Velo(**config)
    except ValueError as err:
        raise ArtifactError(source, str(err), headline=headline) from None
    return checked_theta(flat, rule.theta_shapes(), source, headline), config


def convert_velo(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                 ff_mult: float | None = None, provenance: dict[str, Any] | None = None, force: bool = False) -> Any:
    """Convert a VeLO ``theta.state`` into an artifact; write it to ``out_dir`` if given (all or nothing).

    Args:
        ff_mult: override the factor the size implies (:func:`default_ff_mult`).
        force: replace the artifact files of an existing non-empty ``out_dir``.

    Returns:
        the ``LearnedOptimizerModel``.
    """
    theta, config = read_velo_theta(checkpoint, ff_mult)
    size = ("velo_4000" if (config["lstm_hidden_size"], config["param_inits"]) == VELO_4000_SIZE
            else f"LSTM {config['lstm_hidden_size']}, {config['param_inits']} networks")
    info = {
        "name": "VeLO",
        "description": DESCRIPTION.format(inits=config["param_inits"]),
        "license": "apache-2.0",
        "tags": ["velo", "learned-scheduler", "converted-from-jax"],
        "citation": CITATION,
        "limitations": (SCHEDULED_USAGE + f" Architecture {size}; `ff_mult` {config['ff_mult']:g} is not stored in "
                        "the checkpoint: lopt_hf uses 100 for the velo_4000 size (as the original) and 1 otherwise."),
        "source": f"converted by lopt_hf from the flax checkpoint {Path(checkpoint).name} (velo, {size})",
        "original_authors": AUTHORS,
        "paper": PAPER,
        "original_code": CODE,
        "original_license": "Apache-2.0",
        **({"original_weights": "amoudgl/velo-4000"} if size == "velo_4000" else {}),
        **(provenance or {}),
    }
    return converted_artifact(Velo.name, theta, config, OPTIMIZER_DEFAULTS, None, info, out_dir, force)
