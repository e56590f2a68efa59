"""Artifacts through the Hub HTTP API (local server): push, from_pretrained, hf download, load_lopt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import AutoModel

import lopt_hf
from lopt_hf import create_artifact, load_artifact, load_lopt
from lopt_hf.cli import main as cli_main

BIN = Path(sys.executable).parent


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def one_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    optimizer.zero_grad()
    model(torch.randn(3, 4)).pow(2).mean().backward()
    optimizer.step()


def assert_same_theta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_push_then_from_pretrained_with_revision(hub_env) -> None:
    repo = hub_env.repo_id("small-fc")
    first = create_artifact("small_fc_lopt", seed=1)
    first_commit = first.push_to_hub(repo)
    second = create_artifact("small_fc_lopt", seed=2, optimizer_defaults={"lr": 0.5, "weight_decay": 0.0})
    second.push_to_hub(repo)

    assert_same_theta(AutoModel.from_pretrained(repo).theta(), second.theta())
    pinned = lopt_hf.LearnedOptimizerModel.from_pretrained(repo, revision=first_commit.oid)
    assert_same_theta(pinned.theta(), first.theta())
    assert load_lopt(repo, tiny_model()).param_groups[0]["lr"] == 0.5
    assert load_lopt(repo, tiny_model(), revision=first_commit.oid).param_groups[0]["lr"] == 1.0

    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert "library_name: lopt_hf" in card and "small_fc_lopt" in card


def test_cli_push_and_hf_download_then_load_lopt(hub_env, tmp_path) -> None:
    repo = hub_env.repo_id("per-param")
    local = tmp_path / "artifact"
    assert cli_main(["create", "per_param_mlp", str(local), "--seed", "3"]) == 0
    assert cli_main(["push", str(local), repo]) == 0

    downloaded = tmp_path / "downloaded"
    subprocess.run([str(BIN / "hf"), "download", repo, "--local-dir", str(downloaded)], check=True, env=hub_env.env,
                   capture_output=True)
    for name in ("config.json", "model.safetensors"):
        assert (downloaded / name).read_bytes() == (local / name).read_bytes()
    card = (downloaded / "README.md").read_text()  # re-rendered on push: usage names the repo id
    assert "library_name: lopt_hf" in card and f'load_lopt("{repo}"' in card

    model = tiny_model()
    optimizer = load_lopt(downloaded, model)
    assert_same_theta(optimizer.theta, load_artifact(local).theta())
    one_step(optimizer, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_load_lopt_offline_from_cache(hub_env) -> None:
    repo = hub_env.repo_id("offline")
    create_artifact("mlp_lopt", seed=4).push_to_hub(repo)
    load_lopt(repo, tiny_model())  # fills the cache
    requests_before = len(hub_env.server.requests)
    script = ("import json, lopt_hf, torch; "
              f"opt = lopt_hf.load_lopt({repo!r}, [torch.nn.Parameter(torch.zeros(3))]); "
              "print(json.dumps({'rule': opt.rule.name}))")
    env = {**hub_env.env, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rule": "mlp_lopt"}
    assert len(hub_env.server.requests) == requests_before  # nothing asked of the server
