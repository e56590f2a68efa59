"""Access to the JAX reference vectors copied into ``tests/fixtures/refvectors``.

See ``fixtures/refvectors/SOURCE_README.md`` for how they were produced.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "refvectors"
# Leaves of the parameter tree in every file (JAX layout: kernels (in, out), conv HWIO).
PARAM_NAMES = ("conv/kernel", "dense1/bias", "dense1/kernel", "dense2/bias", "dense2/kernel", "scale")
NUM_STEPS = 6


def load(stem: str) -> dict[str, torch.Tensor]:
    """All arrays of ``<stem>.safetensors`` as torch tensors."""
    return load_file(str(FIXTURES / f"{stem}.safetensors"))


def subtree(arrays: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Arrays under ``prefix/`` with the prefix stripped."""
    start = prefix.rstrip("/") + "/"
    return {key[len(start):]: value for key, value in arrays.items() if key.startswith(start)}
