"""The learned optimizers shipped inside lopt_hf (``lopt_hf/pretrained/``): offline loading by
short name, complete model cards, and that they actually train what they were meta-trained for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lopt_hf
from lopt_hf import ArtifactError, load_artifact, load_lopt
from lopt_hf.cli import main as cli_main
from lopt_hf.data import load_image_dataset
from lopt_hf.pretrained import SHIPPED, available_pretrained, pretrained_path

NAMES = [f"lopt-hf/{short}" for short in SHIPPED]
DEFAULT = "lopt-hf/celo-adam-ns"  # the default of make demo, scripts/finetune.py and the README
MEETS_BAR = {DEFAULT, "lopt-hf/celo-adam-mix"}  # shipped because they meet the bar; the others: research baselines


def test_every_registered_optimizer_is_shipped() -> None:
    assert sorted(available_pretrained()) == sorted(NAMES)
    for name in NAMES:
        folder = pretrained_path(name)
        assert folder is not None and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        # the artifact proper is small: a few KB, 154 KB for Celo-Adam's LSTM scheduler (the card's plots come along)
        assert (folder / "model.safetensors").stat().st_size < 200_000
    assert pretrained_path("lopt-hf/no-such-optimizer") is None
    assert pretrained_path(NAMES[0].split("/")[1]) is None  # a bare name means a local folder


def test_cli_lists_the_shipped_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["pretrained"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_by_short_name_from_any_directory(name: str, tmp_path: Path) -> None:
    code = ("import torch, lopt_hf\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
            f"opt = lopt_hf.load_lopt({name!r}, model)\n"
            "loss = model(torch.randn(5, 4)).square().mean(); loss.backward()\n"
            "opt.set_total_steps(10); opt.step(loss=loss.detach())\n"
            "print(type(opt).__name__, opt.artifact_defaults)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LearnedOptimizer")


@pytest.mark.parametrize("name", NAMES)
def test_short_name_works_with_every_entry_point(name: str) -> None:
    artifact = load_artifact(name)
    assert artifact.config.provenance["shipped_as"] == name
    # (transformers' AutoModel reads config.json itself before lopt_hf's code runs: it only knows folders/Hub ids)
    assert lopt_hf.LearnedOptimizerModel.from_pretrained(name).theta().keys() == artifact.theta().keys()
    optimizer_cls, kwargs = lopt_hf.trainer_optimizer(name)
    assert callable(optimizer_cls)


def test_hub_only_options_with_a_shipped_name_are_rejected() -> None:
    with pytest.raises(ArtifactError, match="shipped inside lopt_hf.*revision"):
        load_artifact(NAMES[0], revision="main")
    with pytest.raises(ArtifactError, match="force_download"):
        load_lopt(NAMES[0], [nn.Parameter(torch.zeros(3))], force_download=True)


def test_a_local_folder_of_the_same_path_still_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = lopt_hf.create_artifact("per_param_mlp", seed=0)
    other.save_pretrained(tmp_path / NAMES[0])
    monkeypatch.chdir(tmp_path)
    assert load_artifact(NAMES[0]).config.rule == "per_param_mlp"


@pytest.mark.parametrize("name", NAMES)
def test_model_card_is_complete(name: str) -> None:
    folder = pretrained_path(name)
    card = (folder / "README.md").read_text(encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    provenance = config["provenance"]
    meta = provenance["meta_training"]
    # meta-training config table, and the plot it shows is in the folder
    assert "## Meta-training config" in card and "| **Meta-trainer** |" in card
    assert (folder / meta["plot"]).is_file() and f"]({meta['plot']})" in card
    # evaluation at 1x and 10x the meta-training horizon, each with a table and a plot in the folder
    horizon = meta["config"]["estimator"]["max_unroll"]
    sections = provenance["evaluation"]["sections"]
    default = name in MEETS_BAR  # its card leads with the shipping bar; the others are research baselines
    assert [section["title"].split(":")[0] for section in sections] == [
        "1× the meta-training horizon", "10× the meta-training horizon",
        *(["The shipping bar"] if default else []), "Outside the meta-training family"]
    for section, steps in zip(sections[:2], (horizon, 10 * horizon)):
        assert f"{steps} steps" in section["title"]
        assert "| task | optimizer |" in section["table"] and "adamw" in section["table"].lower()
        assert (folder / section["plot"]).is_file() and f"]({section['plot']})" in card
    assert "## Limitations" in card and len(provenance["limitations"]) > 100
    # the command and the seed that reproduce it
    assert "## Reproduce" in card and "scripts/metatrain.py --config configs/pretrained/" in card
    assert f"seed {meta['config']['seed']}" in card
    config_file = Path(__file__).resolve().parents[2] / provenance["reproduce"].split("--config ")[1].split()[0]
    assert config_file.is_file()
    assert f'load_lopt("{name}", model)' in card
    body = card.split("---\n", 2)[2]
    if default:  # the bar's verdict, said first, with the table it rests on and the held-out test losses
        assert body.split("\n\n")[1].startswith("**Meets lopt_hf's shipping bar** on every `lopt-hf eval` task")
        assert "**Meets the bar.**" in sections[2]["table"] and "| tiny_lm | 2000 |" in sections[2]["table"]
        assert "| tiny_lm | 200 |" in sections[3]["table"]
    else:  # a research baseline, said first, with the held-out comparison it rests on
        assert body.split("\n\n")[1].startswith("**A research baseline.** Meta-training showed it only MLPs")
        assert "Outside that family it loses to AdamW" in card and "| mnist_mlp_wide | 200 |" in card
    # the card is what the current builder renders from config.json (re-render: package_pretrained.py --cards-only)
    assert card == str(load_artifact(name).model_card())


def _train_digits(make_optimizer, steps: int = 200, seed: int = 0) -> float:
    train = load_image_dataset("digits", image_size=8, split="train")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = make_optimizer(model)
    learned = isinstance(optimizer, lopt_hf.LearnedOptimizer)
    if learned:
        optimizer.set_total_steps(steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(train), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(train.images[batch]), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        if learned:
            optimizer.step(loss=loss.detach())  # a learned scheduler's loss features (ignored by other rules)
        else:
            optimizer.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


@pytest.mark.parametrize("name", NAMES)
def test_shipped_optimizer_trains_its_meta_training_task_better_than_adamw_default(name: str) -> None:
    """On a digits MLP for 200 steps (the meta-training family and horizon of the research baselines; unseen by
    the default) it beats AdamW at lr 1e-3 by far."""
    torch.set_num_threads(1)
    learned = _train_digits(lambda model: load_lopt(name, model))
    adamw = _train_digits(lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert learned < 0.8 * adamw, (learned, adamw)


def test_a_shipped_optimizer_publishes_to_the_hub_with_its_plots(hub_env) -> None:
    """`lopt-hf push lopt_hf/pretrained/NAME user/repo`: card re-rendered for the repo, every plot uploaded."""
    from huggingface_hub import HfApi, hf_hub_download

    from lopt_hf.cli import main as cli_main

    folder = pretrained_path(NAMES[0])
    repo = hub_env.repo_id("shipped")
    assert cli_main(["push", str(folder), repo]) == 0
    files = set(HfApi().list_repo_files(repo))
    plots = {path.name for path in folder.glob("*.png")}
    assert len(plots) == 3 and {"config.json", "model.safetensors", "README.md", *plots} <= files
    card = Path(hf_hub_download(repo, "README.md")).read_text(encoding="utf-8")
    assert f'load_lopt("{repo}", model)' in card and "## Limitations" in card
    pushed = load_artifact(repo)
    shipped = load_artifact(NAMES[0])
    assert all(torch.equal(pushed.theta()[key], value) for key, value in shipped.theta().items())
