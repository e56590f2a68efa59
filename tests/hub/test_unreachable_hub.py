"""A Hub that cannot be reached fails a load at once, with what to do, instead of ≈ 25 s of retries."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from lopt_hf import ArtifactError, create_artifact, load_artifact


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unreachable_hub_and_nothing_cached_fails_fast(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="could not be reached.*HF_HUB_OFFLINE=1") as info:
        load_artifact("someone/some-lopt", endpoint=endpoint, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for ≈ 25 s
    assert "someone/some-lopt/config.json" in str(info.value) and endpoint in str(info.value)


def test_cached_artifact_still_loads_when_the_hub_is_unreachable(hub_env, tmp_path: Path) -> None:
    repo = hub_env.repo_id("cached")
    create_artifact("small_fc_lopt", seed=3).push_to_hub(repo)
    first = load_artifact(repo, cache_dir=tmp_path / "cache")  # downloads into the cache
    again = load_artifact(repo, cache_dir=tmp_path / "cache", endpoint=f"http://127.0.0.1:{closed_port()}")
    assert all(first.theta()[name].equal(value) for name, value in again.theta().items())
