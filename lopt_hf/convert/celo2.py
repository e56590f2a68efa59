"""Convert a published Celo2 / Celo2-base ``theta.state`` (flax msgpack) into a lopt_hf artifact.

The original checkpoints (``hf download amoudgl/celo2`` / ``amoudgl/celo2-base``) hold the
haiku tree ``ff_mod_stack/~/{w0__0 … w0__13, b0, w1, b1, w2, b2}`` as written by
``flax.serialization.to_bytes``. This module reads it with ``msgpack`` only
(:mod:`lopt_hf.convert.flax_msgpack`), checks that it is exactly a Celo2 theta (tree, names,
shapes, finite float values) and writes ``config.json`` + ``model.safetensors`` + a model card
with ``create_artifact(...).save_pretrained(out_dir)``.

The two variants share the rule (``celo2``) and differ in its ``orthogonalize`` flag and the
harness (see :mod:`lopt_hf.harness`):

* ``celo2``: ``orthogonalize=True``; harness ``{"type": "celo2", "mult_1d": 20, "adamw_betas":
  [0.9, 0.95], "adamw_eps": 1e-8, "embedding_patterns": []}`` — hidden matrices and conv
  kernels through the learned rule, biases/1-D tensors/embeddings through AdamW(lr·20);
* ``celo2-base``: ``orthogonalize=False``; no harness — every tensor through the learned rule.

Command line: ``lopt-hf convert celo2 PATH/theta.state OUT_DIR --variant celo2|celo2-base``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..artifact_validation import ArtifactError
from ..harness import RULE_PRESETS
from ..rules.celo2 import HAIKU_PREFIX, Celo2
from .checkpoint import checked_theta, converted_artifact, mismatch_hint
from .flax_msgpack import FlaxMsgpackError, flatten_tree, read_flax_msgpack

__all__ = ["VARIANTS", "convert_celo2", "read_celo2_theta"]

PAPER = "https://arxiv.org/abs/2602.19142"
CODE = "https://github.com/amoudgl/celo2"
AUTHORS = "Abhinav Moudgil, Boris Knyazev, Eugene Belilovsky"
CITATION = """@misc{moudgil2026celo2,
      title={Celo2: Towards Learned Optimization Free Lunch},
      author={Abhinav Moudgil and Boris Knyazev and Eugene Belilovsky},
      year={2026},
      eprint={2602.19142},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/2602.19142},
}"""
# Meta-training setup of the published checkpoints (from the authors' model cards).
META_TRAINING = {
    "optimizer_architecture": "MLP, 2 hidden layers, 8 units each",
    "meta_training_tasks": "4 image classification tasks (MNIST, FMNIST, CIFAR-10, SVHN)",
    "task_architecture": "MLP (64-32-10)",
    "meta_trainer": "Persistent Evolution Strategies (PES)",
    "outer_iterations": "100K",
    "truncation_length": 50,
    "min_unroll_length": 100,
    "max_unroll_length": 2000,
    "step_mult": 0.001,
}
# The learned step has unit RMS; the meta-training step multiplier was 1e-3.
OPTIMIZER_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0}

VARIANTS: dict[str, dict[str, Any]] = {
    "celo2": {
        "rule_config": RULE_PRESETS["celo2"][1],
        "harness": RULE_PRESETS["celo2"][2],
        "name": "Celo2",
        "weights": "amoudgl/celo2",
        "description": (
            "Celo2 learned optimizer (Moudgil, Knyazev, Belilovsky — [arXiv 2602.19142](" + PAPER + ")), "
            "converted from the authors' published `theta.state` for PyTorch. The learned MLP update rule, "
            "followed by Newton–Schulz orthogonalisation, updates hidden matrices and conv kernels; biases, "
            "other 1-D parameters and embeddings use AdamW with a 20× learning rate and betas (0.9, 0.95), "
            "as in the authors' optax recipe. Original code: [" + CODE + "](" + CODE + ") (MIT licence)."),
    },
    "celo2-base": {
        "rule_config": RULE_PRESETS["celo2-base"][1],
        "harness": RULE_PRESETS["celo2-base"][2],
        "name": "Celo2-base",
        "weights": "amoudgl/celo2-base",
        "description": (
            "Celo2-base learned optimizer (Moudgil, Knyazev, Belilovsky — [arXiv 2602.19142](" + PAPER + ")), "
            "converted from the authors' published `theta.state` for PyTorch. The learned MLP update rule "
            "updates every parameter, without orthogonalisation or AdamW harness; for better performance the "
            "authors recommend Celo2. Original code: [" + CODE + "](" + CODE + ") (MIT licence)."),
    },
}

def read_celo2_theta(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Read and check a Celo2 ``theta.state``; return ``(theta, architecture)``.

    ``theta`` has lopt_hf names (the haiku prefix ``ff_mod_stack/~/`` removed), float32;
    ``architecture`` is ``{"hidden_size": ..., "hidden_layers": ...}`` as found in the file.

    Raises:
        ArtifactError: the file is not msgpack, not a flax tree of arrays, not the Celo2 tree,
            or holds wrong shapes, non-float or non-finite values.
    """
    source = str(path)
    try:
        tree = read_flax_msgpack(path)
    except FlaxMsgpackError as err:
        raise ArtifactError(source, f"not a flax msgpack checkpoint: {err.reason}") from None
    stack = tree.get("ff_mod_stack")
    if set(tree) != {"ff_mod_stack"} or not isinstance(stack, dict) or set(stack) != {"~"} \
            or not isinstance(stack["~"], dict):
        top = sorted(map(str, tree))
        hint = mismatch_hint(flatten_tree(tree), "celo2")
        raise ArtifactError(source, f"not a Celo2 checkpoint{hint}: expected the tree ff_mod_stack/~/{{w0__0, ..., "
                                    f"b2}}, found top-level key(s) {top}")
    flat = {name[len(HAIKU_PREFIX):]: value for name, value in flatten_tree(tree).items()}
    problems = [f"{HAIKU_PREFIX}{name}: not an array ({type(value).__name__})"
                for name, value in flat.items() if not isinstance(value, np.ndarray)]
    if problems:
        raise ArtifactError(source, problems, headline="not a Celo2 checkpoint")

    # The architecture as stored: hidden width from b0, depth from the w1, w2, ... present.
    hidden_layers = 0
    while f"w{hidden_layers + 1}" in flat:  # w1, w2, ... : one per layer after the first
        hidden_layers += 1
    has_b0 = "b0" in flat and flat["b0"].ndim == 1 and flat["b0"].shape[0] > 0
    hidden_size = int(flat["b0"].shape[0]) if hidden_layers and has_b0 else 8
    try:
        rule = Celo2(hidden_size=hidden_size, hidden_layers=hidden_layers)
    except ValueError as err:
        raise ArtifactError(source, f"not a Celo2 checkpoint: {err}") from None
    expected = {HAIKU_PREFIX + name: shape for name, shape in rule.theta_shapes().items()}
    checked = checked_theta({HAIKU_PREFIX + name: value for name, value in flat.items()}, expected, source,
                            "not a valid Celo2 checkpoint")
    theta = {name[len(HAIKU_PREFIX):]: value for name, value in checked.items()}
    return theta, {"hidden_size": hidden_size, "hidden_layers": hidden_layers}


def convert_celo2(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                  variant: str = "celo2", provenance: dict[str, Any] | None = None, force: bool = False) -> Any:
    """Convert a Celo2 ``theta.state`` into an artifact; write it to ``out_dir`` if given.

    Args:
        checkpoint: path of the flax msgpack ``theta.state``.
        out_dir: folder to create with ``config.json``, ``model.safetensors``, ``README.md`` (all or
            nothing, see :func:`lopt_hf.convert.checkpoint.write_artifact`).
        variant: ``"celo2"`` (orthogonalisation + AdamW harness) or ``"celo2-base"``.
        provenance: extra provenance entries (merged over the defaults).
        force: replace the artifact files of an existing non-empty ``out_dir``.

    Returns:
        the ``LearnedOptimizerModel``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Celo2 variant {variant!r}; choose one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    theta, architecture = read_celo2_theta(checkpoint)
    meta_training = dict(META_TRAINING)
    if architecture != {"hidden_size": 8, "hidden_layers": 2}:
        meta_training.pop("optimizer_architecture")
    info = {
        "name": spec["name"],
        "description": spec["description"],
        "license": "mit",
        "tags": ["celo2", "converted-from-jax"],
        "citation": CITATION,
        "meta_training": meta_training,
        "source": f"converted by lopt_hf from the flax checkpoint {Path(checkpoint).name} ({variant})",
        "original_authors": AUTHORS,
        "paper": PAPER,
        "original_code": CODE,
        "original_license": "MIT",
        "original_weights": spec["weights"],
        **(provenance or {}),
    }
    return converted_artifact("celo2", theta, {**architecture, **spec["rule_config"]}, OPTIMIZER_DEFAULTS,
                              spec["harness"], info, out_dir, force)
