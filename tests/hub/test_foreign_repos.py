"""The authors' own Hub repos load directly: ``load_lopt("amoudgl/celo", model)``.

The local Hub holds repos laid out like the authors' (a ``theta.state`` and their README, no
lopt_hf ``config.json``), with the reference checkpoints of ``tests/fixtures/refvectors``. Loading
recognises the checkpoint by its tree, converts it once, caches the converted artifact and loads
that — online, and offline from the caches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from torch import nn

import lopt_hf.convert.foreign as foreign
from lopt_hf import load_artifact, load_lopt, trainer_optimizer
from lopt_hf.artifact_validation import ArtifactError
from lopt_hf.cli import main as cli_main
from lopt_hf.convert.foreign import convert_checkpoint
from support import FIXTURES

# repo → (checkpoint fixture, convert format, celo2 variant, rule)
AUTHORS_REPOS = {
    "amoudgl/celo": ("celo_published_theta.state", "celo", None, "celo"),
    "amoudgl/celo-adam": ("celo_adam_published_theta.state", "celo-adam", None, "celo_adam"),
    "amoudgl/velo-4000": ("velo_4000_random_perturbed_theta.state", "velo", None, "velo"),
    "amoudgl/celo2": ("celo2_theta1.state", "celo2", "celo2", "celo2"),
    "amoudgl/celo2-base": ("celo2_theta1.state", "celo2", "celo2-base", "celo2"),
}


def upload(repo: str, files: dict[str, bytes]) -> str:
    """Create ``repo`` on the local Hub (if new) and commit ``files``; the commit id."""
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
    return api.create_commit(repo, operations=operations, commit_message="upload").oid


@pytest.fixture(scope="module")
def authors_repos(hub_server) -> dict[str, str]:
    """The five repos, laid out like the authors' (README + theta.state); repo → commit."""
    return {repo: upload(repo, {"README.md": f"# {repo}\n\nThe authors' flax checkpoint.\n".encode(),
                                "theta.state": (FIXTURES / fixture).read_bytes()})
            for repo, (fixture, _, _, _) in AUTHORS_REPOS.items()}


@pytest.fixture
def conversions(monkeypatch, tmp_path: Path) -> list[str]:
    """A fresh conversion cache for the test, and the list of conversions done (format per call)."""
    monkeypatch.setenv(foreign.CACHE_ENV, str(tmp_path / "converted"))
    done: list[str] = []
    original = foreign.convert_checkpoint

    def counting(fmt: str, *args, **kwargs):
        done.append(fmt)
        return original(fmt, *args, **kwargs)

    monkeypatch.setattr(foreign, "convert_checkpoint", counting)
    return done


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("repo", sorted(AUTHORS_REPOS))
def test_load_lopt_recognises_and_converts_the_authors_repo(repo: str, authors_repos, conversions) -> None:
    fixture, fmt, variant, rule = AUTHORS_REPOS[repo]
    optimizer = load_lopt(repo, tiny_model())
    assert optimizer.rule.name == rule and conversions == [fmt]
    expected = convert_checkpoint(fmt, FIXTURES / fixture, variant=variant)
    assert optimizer.theta.keys() == expected.theta().keys()
    assert all(torch.equal(optimizer.theta[name], value) for name, value in expected.theta().items())
    assert optimizer.rule.hyperparameters() == expected.rule.hyperparameters()
    routes = {group.get("route") for group in optimizer.param_groups}
    assert routes == ({"learned", "adamw"} if variant == "celo2" else {"learned"})  # Celo2's AdamW harness
    artifact = load_artifact(repo)
    assert artifact.config.name_or_path == repo
    assert repo in artifact.config.provenance["converted_from"]
    assert conversions == [fmt]  # the second load used the cached conversion


def test_second_load_converts_nothing_and_works_offline(authors_repos, conversions, hub_env, monkeypatch) -> None:
    model = tiny_model()
    first = load_lopt("amoudgl/celo-adam", model)
    assert conversions == ["celo-adam"]
    cached = sorted(Path(foreign.converted_cache_root()).glob("*/*/config.json"))
    assert [path.parent.parent.name for path in cached] == ["amoudgl--celo-adam"]
    assert cached[0].parent.name.startswith("celo-adam-")

    requests = len(hub_env.server.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = load_lopt("amoudgl/celo-adam", model)
    assert conversions == ["celo-adam"] and len(hub_env.server.requests) == requests  # no conversion, no request
    assert all(torch.equal(again.theta[name], value) for name, value in first.theta.items())
    # offline and never fetched: the usual cache-miss error, naming the missing config.json
    with pytest.raises(ArtifactError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        load_lopt("amoudgl/not-uploaded", model)


@pytest.mark.slow
def test_offline_process_loads_and_steps_from_the_caches(authors_repos, hub_env, tmp_path: Path) -> None:
    cache = tmp_path / "converted"
    env = {**hub_env.env, foreign.CACHE_ENV: str(cache)}
    script = ("import json, torch, lopt_hf; p = torch.nn.Parameter(torch.ones(3, 2)); "
              "opt = lopt_hf.load_lopt('amoudgl/celo', [p]); opt.set_total_steps(4); "
              "[(opt.zero_grad(), (p ** 2).sum().backward(), opt.step(loss=(p ** 2).sum().detach())) "
              "for _ in range(3)]; "
              "print(json.dumps({'rule': opt.rule.name, 'moved': bool((p != 1).any()), "
              "'finite': bool(torch.isfinite(p).all())}))")
    online = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert online.returncode == 0, online.stderr
    requests = len(hub_env.server.requests)
    offline = subprocess.run([sys.executable, "-c", script], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout.strip().splitlines()[-1]) == {"rule": "celo", "moved": True, "finite": True}
    assert len(hub_env.server.requests) == requests


def test_scheduled_optimizer_from_the_hub_steps(authors_repos, conversions) -> None:
    model = tiny_model()
    optimizer = load_lopt("amoudgl/celo", model)
    optimizer.set_total_steps(5)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = torch.randn(16, 4), torch.randn(16, 2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).pow(2).mean()
        loss.backward()
        optimizer.step(loss=loss.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_trainer_optimizer_takes_the_authors_repo(authors_repos, conversions) -> None:
    optimizer_cls, kwargs = trainer_optimizer("amoudgl/velo-4000")
    assert kwargs["artifact"].rule.name == "velo" and kwargs["artifact"].rule.ff_mult == 100.0
    optimizer = optimizer_cls(tiny_model().parameters(), **kwargs)
    assert optimizer.rule.name == "velo" and conversions == ["velo"]


def test_eval_takes_the_authors_repo(authors_repos, conversions, tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["eval", "--optimizers", "amoudgl/celo-adam", "--tasks", "digits_mlp", "--steps", "4",
                         "--seeds", "0", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "amoudgl/celo-adam" in capsys.readouterr().out
    assert conversions == ["celo-adam"]


def test_a_repo_that_is_neither_fails_as_before_and_caches_nothing(hub_server, conversions) -> None:
    repo = hub_server.repo_id("not-an-optimizer")
    upload(repo, {"README.md": b"# nothing here\n"})
    with pytest.raises(ArtifactError, match="missing file: a learned-optimizer artifact needs config.json"):
        load_lopt(repo, tiny_model())
    corrupt = hub_server.repo_id("corrupt-theta")
    upload(corrupt, {"theta.state": (FIXTURES / "celo_published_theta.state").read_bytes()[:1500]})
    with pytest.raises(ArtifactError, match="theta.state.*not a flax msgpack checkpoint") as info:
        load_lopt(corrupt, tiny_model())
    assert "\n" not in str(info.value)
    other = hub_server.repo_id("other-lopt")
    upload(other, {"theta.state": (FIXTURES / "small_fc_lopt_theta0_theta.state").read_bytes()})
    with pytest.raises(ArtifactError, match="not a checkpoint lopt_hf can convert"):
        load_lopt(other, tiny_model())
    assert conversions == [] and not list(Path(foreign.converted_cache_root()).glob("*/*"))


def test_a_new_commit_converts_again_and_revisions_stay_pinned(hub_server, conversions) -> None:
    repo = hub_server.repo_id("celo-fork")
    first = upload(repo, {"theta.state": (FIXTURES / "celo_published_theta.state").read_bytes()})
    upload(repo, {"theta.state": (FIXTURES / "celo_random_perturbed_theta.state").read_bytes()})
    published = convert_checkpoint("celo", FIXTURES / "celo_published_theta.state").theta()
    perturbed = convert_checkpoint("celo", FIXTURES / "celo_random_perturbed_theta.state").theta()
    latest, pinned = load_artifact(repo).theta(), load_artifact(repo, revision=first).theta()
    assert all(torch.equal(latest[name], perturbed[name]) for name in perturbed)
    assert all(torch.equal(pinned[name], published[name]) for name in published)
    assert conversions == ["celo", "celo"]  # one per revision


def test_a_downloaded_folder_loads_too(authors_repos, conversions, tmp_path: Path) -> None:
    folder = tmp_path / "celo2-base"
    folder.mkdir()
    (folder / "theta.state").write_bytes((FIXTURES / "celo2_theta1.state").read_bytes())
    optimizer = load_lopt(folder, tiny_model())
    assert optimizer.rule.name == "celo2" and optimizer.rule.orthogonalize is False  # the name says -base
    assert {group.get("route") for group in optimizer.param_groups} == {"learned"}


def test_cached_authors_repo_loads_when_the_hub_is_unreachable(authors_repos, conversions, tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once the block ends
    first = load_artifact("amoudgl/celo-adam", cache_dir=tmp_path / "cache")  # fills both caches
    start = time.perf_counter()
    again = load_artifact("amoudgl/celo-adam", cache_dir=tmp_path / "cache", endpoint=closed)
    assert time.perf_counter() - start < 10  # no ≈ 25 s of retries
    assert all(first.theta()[name].equal(value) for name, value in again.theta().items())
    assert conversions == ["celo-adam"]
    with pytest.raises(ArtifactError, match="could not be reached.*HF_HUB_OFFLINE=1"):  # never fetched: fails fast
        load_artifact("amoudgl/celo", cache_dir=tmp_path / "cache", endpoint=closed)
