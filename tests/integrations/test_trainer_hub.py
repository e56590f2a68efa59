"""The user's path end to end against a local Hub server: publish → hf download / repo id / offline → Trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import SUBPROCESS_ENV, clipped_momentum_theta, lm_data, tiny_gpt2, train_losses, training_args
from transformers import Trainer

from lopt_hf import LearnedOptimizerCallback, create_artifact, load_lopt, trainer_optimizer
from lopt_hf.trainer import unwrap_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).resolve().parents[1] / "distributed_train.py"


def publish(hub_env, prefix: str) -> str:
    repo = hub_env.repo_id(prefix)
    create_artifact("per_param_mlp", theta=clipped_momentum_theta(),
                    provenance={"source": "tests: hand-built clipped-momentum theta"}).push_to_hub(repo)
    return repo


def learns(losses: list[float]) -> bool:
    return all(math.isfinite(loss) for loss in losses) and sum(losses[-2:]) < 0.95 * sum(losses[:2])


def test_hf_download_then_load_lopt_then_trainer(hub_env, tmp_path) -> None:
    repo = publish(hub_env, "trainer-download")
    local = tmp_path / "lopt"
    subprocess.run([str(BIN / "hf"), "download", repo, "--local-dir", str(local)], check=True, env=hub_env.env,
                   capture_output=True)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in local.iterdir()}

    tokenizer, dataset = lm_data()
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path / "out"), train_dataset=dataset,
                      optimizers=(load_lopt(local, model), None), callbacks=[LearnedOptimizerCallback()])
    trainer.train()
    assert learns(train_losses(trainer)), train_losses(trainer)


def test_repo_id_with_both_trainer_entry_points(hub_env, tmp_path) -> None:
    repo = publish(hub_env, "trainer-repo-id")
    tokenizer, dataset = lm_data()
    losses = []
    for entry in ("optimizers", "optimizer_cls_and_kwargs"):
        model = tiny_gpt2(tokenizer.vocab_size)
        if entry == "optimizers":
            kwargs = {"optimizers": (load_lopt(repo, model), None)}
        else:
            kwargs = {"optimizer_cls_and_kwargs": trainer_optimizer(repo)}
        trainer = Trainer(model=model, args=training_args(tmp_path / entry), train_dataset=dataset,
                          callbacks=[LearnedOptimizerCallback()], **kwargs)
        trainer.train()
        assert unwrap_optimizer(trainer.optimizer).rule.name == "per_param_mlp"
        losses.append(train_losses(trainer))
    assert losses[0] == losses[1] and learns(losses[0])


@pytest.mark.slow
def test_offline_from_the_cache_in_a_fresh_process(hub_env, tmp_path) -> None:
    repo = publish(hub_env, "trainer-offline")
    trainer_optimizer(repo)  # fills the cache (HF_HOME of hub_env)
    requests_before = len(hub_env.server.requests)
    out = tmp_path / "out"
    env = {**hub_env.env, **SUBPROCESS_ENV, "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single, non-distributed process
    result = subprocess.run([sys.executable, str(SCRIPT), "--mode", "trainer", "--artifact", repo, "--out", str(out),
                             "--steps", "6"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    info = json.loads((out / "rank0.json").read_text())
    assert info["world_size"] == 1 and info["optimizer"] == "LearnedOptimizer" and info["total_steps"] == 6
    assert learns(info["losses"]), info["losses"]
    assert len(hub_env.server.requests) == requests_before  # nothing asked of the server
    assert os.environ.get("HF_HUB_OFFLINE") is None  # the test process itself stayed online
