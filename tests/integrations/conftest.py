"""Fixtures shared by the integration tests: a real artifact that lowers a loss, and the tiny LM data."""

from __future__ import annotations

import pytest
from support import clipped_momentum_artifact, lm_data


@pytest.fixture(scope="module")
def descending(tmp_path_factory) -> str:
    """A real artifact folder whose (hand-built) theta reliably lowers a loss."""
    return str(clipped_momentum_artifact(tmp_path_factory.mktemp("clipped_momentum")))


@pytest.fixture(scope="module")
def lm():
    """The tiny character-level LM's tokenizer and dataset (``support.lm_data``)."""
    return lm_data()
