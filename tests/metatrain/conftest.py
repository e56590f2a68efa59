"""Fixtures shared by the estimator and LoLO tests: a small float64 image task family and rule."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.metatrain.tasks import MLPImageTaskFamily
from lopt_hf.rules import build_rule


@pytest.fixture(scope="module")
def image_family() -> MLPImageTaskFamily:
    return MLPImageTaskFamily(hidden_sizes=(8,), batch_size=8, param_scale_range=(0.5, 2.0), dtype=torch.float64)


@pytest.fixture(scope="module")
def small_rule():
    return build_rule("per_param_mlp", hidden_sizes=(4,), step_mult=0.1)
