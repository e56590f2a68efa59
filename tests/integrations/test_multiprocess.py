"""Two processes on CPU (gloo): `accelerate launch` and `torchrun` with DDP, each rank with its own data shard.

After N steps every rank must hold bit-identical parameters (same all-reduced gradients, same
deterministic learned rule) and the losses must be finite. Each launch trains the tiny GPT-2 of
``support`` tasks for a few steps (``distributed_train.py``) and takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import SUBPROCESS_ENV, lm_data, load_refvectors, subtree, tiny_gpt2

from lopt_hf import create_artifact

BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).resolve().parents[1] / "distributed_train.py"
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, **SUBPROCESS_ENV, "HF_HOME": str(tmp_path / "hf_home"),  # no user accelerate config
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def check_ranks(out: Path, world_size: int = 2) -> list[dict]:
    infos = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    params = [load_file(str(out / f"rank{rank}.safetensors")) for rank in range(world_size)]
    for info in infos:
        assert info["world_size"] == world_size and info["backend"] == "gloo"
        assert info["wrapped"] == "DistributedDataParallel" and info["optimizer"] == "LearnedOptimizer"
        assert len(info["losses"]) == STEPS and all(math.isfinite(loss) for loss in info["losses"])
    for other in params[1:]:
        assert other.keys() == params[0].keys()
        assert all(torch.equal(other[name], params[0][name]) for name in params[0])  # bit-identical on every rank
    tokenizer, _ = lm_data()
    initial = dict(tiny_gpt2(tokenizer.vocab_size, dropout=0.0).named_parameters())
    trained = ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight")
    assert all(not torch.equal(params[0][name], initial[name].detach()) for name in trained)
    return infos



@pytest.mark.slow
def test_accelerate_launch_trainer(descending: str, tmp_path) -> None:
    out = tmp_path / "out"
    launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(SCRIPT), "--mode", "trainer", "--artifact", descending, "--out", str(out), "--steps", str(STEPS)],
           tmp_path)
    infos = check_ranks(out)
    assert infos[0]["distributed_type"] == "DistributedType.MULTI_CPU" and infos[0]["total_steps"] == STEPS
    losses = infos[0]["losses"]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_torchrun_plain_ddp_loop(descending: str, tmp_path) -> None:
    out = tmp_path / "out"
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--mode", "ddp",
            "--artifact", descending, "--out", str(out), "--steps", str(STEPS)], tmp_path)
    losses = check_ranks(out)[0]["losses"]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_torchrun_trainer_with_a_harness(tmp_path) -> None:
    """small_fc_lopt with Celo2's harness: the learned rule and the AdamW route both run under DDP."""
    artifact = tmp_path / "artifact"
    create_artifact("small_fc_lopt", seed=0, harness={"type": "celo2"},  # AdamW route at lr·20 = 2e-2
                    optimizer_defaults={"lr": 1e-3, "weight_decay": 0.0}).save_pretrained(artifact)
    out = tmp_path / "out"
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--mode", "trainer",
            "--artifact", str(artifact), "--out", str(out), "--steps", str(STEPS)], tmp_path)
    check_ranks(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "ddp"])
def test_published_celo_in_two_processes(mode: str, tmp_path) -> None:
    """A scheduled rule under DDP: every rank's scheduler gets the same (averaged) loss and the planned
    steps, so the ranks stay bit-identical."""
    artifact = tmp_path / "celo"
    create_artifact("celo", theta=subtree(load_refvectors("celo_published"), "theta"),
                    optimizer_defaults={"lr": 1.0, "weight_decay": 0.0}).save_pretrained(artifact)
    out = tmp_path / "out"
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--mode", mode,
            "--artifact", str(artifact), "--out", str(out), "--steps", str(STEPS)], tmp_path)
    check_ranks(out)
