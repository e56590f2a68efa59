"""Export of a meta-training run: artifact folder, model card, plots, CLI, and publishing to a (local) Hub."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from lopt_hf import load_artifact, load_lopt
from lopt_hf import create_artifact
from lopt_hf.cli import main as cli_main
from lopt_hf.evaluation import markdown_table, run_evaluation
from lopt_hf.metatrain.checkpoint import latest_checkpoint, read_theta
from lopt_hf.metatrain.config import load_config
from lopt_hf.metatrain.trainer import initial_theta
from lopt_hf.publish.card_evaluation import evaluate_for_card
from lopt_hf.publish.metatrain_command import train_and_export

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(run_dir: Path, *extra: str) -> list[str]:
    return [f"output_dir={run_dir}", "name=tiny-lopt", "outer_steps=4", "rule.config.hidden_sizes=[8]",
            "task.hidden_sizes=[8]", "task.batch_size=16", "estimator.name=pes", "estimator.num_tasks=2",
            "estimator.truncation_length=3", "estimator.min_unroll=4", "estimator.max_unroll=8",
            "estimator.compile=false", "num_threads=1", "checkpoint_every=2", "log_every=1",
            "evaluation.steps=5", "evaluation.seeds=[0]", "card.tags=[tiny]", *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real tiny run (TensorBoard on), exported to <run>/final at the end."""
    run_dir = tmp_path_factory.mktemp("run")
    previous = torch.get_num_threads()
    try:
        result = train_and_export(load_config(None, tiny(run_dir)), progress=False)
    finally:
        torch.set_num_threads(previous)
    assert result.artifact_dir == run_dir / "final"
    return run_dir


def card_parts(folder: Path) -> tuple[dict, str]:
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def test_run_folder_contents(trained_run: Path) -> None:
    assert (trained_run / "config.yaml").is_file() and (trained_run / "metrics.csv").is_file()
    assert (trained_run / "meta_loss.png").read_bytes().startswith(PNG_MAGIC)
    assert len((trained_run / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert list((trained_run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert [p.name for p in sorted((trained_run / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]


def test_final_artifact_and_model_card(trained_run: Path) -> None:
    final = trained_run / "final"
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "config.json", "evaluation.png", "meta_loss.png",
                                                       "model.safetensors"]
    artifact = load_artifact(final)
    checkpoint_theta = read_theta(latest_checkpoint(trained_run / "checkpoints"))
    for name, value in artifact.theta().items():
        assert torch.equal(value, checkpoint_theta[name])

    provenance = json.loads((final / "config.json").read_text())["provenance"]
    summary = provenance["meta_training"]["summary"]
    assert summary["Meta-trainer"] == "Persistent Evolution Strategies (PES)"
    assert summary["Outer iterations"] == "4" and summary["Truncation length"] == 3
    assert (summary["Min unroll length"], summary["Max unroll length"]) == (4, 8)
    assert summary["Processes"] == 1 and summary["Task architecture"].startswith("MLP (64-8-10)")
    assert provenance["meta_training"]["config"]["estimator"]["num_tasks"] == 2  # the full config travels along
    evaluation = provenance["evaluation"]
    assert set(evaluation) == {"description", "table", "plot", "summary"} and evaluation["plot"] == "evaluation.png"
    assert "5 steps per run, seeds [0]" in evaluation["description"]
    assert "`digits_mlp`: scikit-learn digits 8×8: MLP 64-32-10" in evaluation["description"]
    labels = ["tiny-lopt", "random init θ₀", "AdamW 0.001", "AdamW 0.01"]
    assert set(evaluation["summary"]["tasks"]["digits_mlp"]) == set(labels)
    assert evaluation["summary"]["settings"]["steps"] == 5 and evaluation["summary"]["settings"]["seeds"] == [0]
    text = (final / "config.json").read_text()
    assert "mean_curve" not in text and "\"train_loss\"" not in text and "\"runs\"" not in text  # no curves
    # The table is the harness's, computed on this artifact and on the rule's initial meta-parameters.
    config = load_config(None, tiny(trained_run))
    with_initial = final.parent / "initial-theta"
    create_artifact(config.rule.name, theta=initial_theta(config), rule_config=config.rule.config).save_pretrained(
        with_initial)
    expected = run_evaluation(["digits_mlp"], [f"tiny-lopt={final}", f"random init θ₀={with_initial}",
                                               "AdamW 0.001=adamw:1e-3", "AdamW 0.01=adamw:1e-2"],
                              steps=5, seeds=[0], progress=False, threads=1)
    assert evaluation["table"] == markdown_table(expected)
    for label in labels:
        row = evaluation["summary"]["tasks"]["digits_mlp"][label]
        assert row["final_train_loss"] == pytest.approx(
            expected["tasks"]["digits_mlp"]["optimizers"][label]["final_train_loss"], abs=1e-5)
    assert evaluation["summary"]["tasks"]["digits_mlp"]["tiny-lopt"] != \
        evaluation["summary"]["tasks"]["digits_mlp"]["random init θ₀"]

    metadata, body = card_parts(final)
    assert metadata["library_name"] == "lopt_hf"
    assert {"learned-optimizer", "per_param_mlp", "meta-trained", "pes", "digits", "tiny"} <= set(metadata["tags"])
    assert body.lstrip().startswith("# tiny-lopt")
    assert 'load_lopt("path/to/this/folder", model)' in body  # usage
    for row in ("| **Update rule** | `per_param_mlp` |", "| **Meta-trainer** | Persistent Evolution Strategies (PES) |",
                "| **Truncation length** | 3 |", "| **Min unroll length** | 4 |", "| **Max unroll length** | 8 |",
                "| **Outer iterations** | 4 |", "| **Processes** | 1 |", "| **Wall time** |",
                "| **Meta-optimizer** | AdamW (lr 0.003, weight decay 0) |",
                "| **Optimizer architecture** | per-element MLP 3→8→2 (1 hidden layer of 8 units, 50 meta-parameters) |"):
        assert row in body, row
    assert "![meta-loss during meta-training](meta_loss.png)" in body and "![evaluation](evaluation.png)" in body
    assert "| `meta_loss.png` | meta-loss curve of meta-training |" in body
    assert "| `evaluation.png` | evaluation plot |" in body
    assert evaluation["table"].strip() in body  # the lopt-hf eval table, as it is
    for row in ("| task | optimizer | train loss | test loss | test acc |", "| digits_mlp | tiny-lopt | ",
                "| digits_mlp | random init θ₀ | ", "| digits_mlp | AdamW 0.01 | ", "5 steps, mean over seeds [0]"):
        assert row in body, row
    assert (final / "evaluation.png").read_bytes().startswith(PNG_MAGIC)
    assert "num_tasks: 2" in body  # the folded full config


def test_exported_optimizer_trains_a_model(trained_run: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    optimizer = load_lopt(trained_run / "final", model)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, labels = torch.rand(16, 64), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_export_from_a_checkpoint_and_card(trained_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "from_step_2"
    assert cli_main(["export", str(trained_run / "checkpoints" / "step-00000002"), str(out), "--no-evaluate"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "meta_loss.png", "model.safetensors"]
    _, body = card_parts(out)
    assert "| **Outer iterations** | 2 (of 4 configured) |" in body and "## Evaluation" not in body
    # A run folder means its newest checkpoint.
    assert cli_main(["export", str(trained_run), str(tmp_path / "newest"), "--no-evaluate"]) == 0
    assert "| **Outer iterations** | 4 |" in card_parts(tmp_path / "newest")[1]
    assert cli_main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    # The card's license and base model, chosen at export.
    assert cli_main(["export", str(trained_run), str(tmp_path / "licensed"), "--no-evaluate", "--license", "mit",
                     "--base-model", "someone/base-lopt"]) == 0
    metadata, _ = card_parts(tmp_path / "licensed")
    assert (metadata["license"], metadata["base_model"]) == ("mit", "someone/base-lopt")
    assert cli_main(["export", str(trained_run), str(tmp_path / "y"), "--base-model", "not/a/repo"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # `lopt-hf card` re-renders README.md from config.json.
    (out / "README.md").unlink()
    assert cli_main(["card", str(out), "--repo-id", "someone/tiny"]) == 0
    assert 'load_lopt("someone/tiny"' in (out / "README.md").read_text()


def test_evaluation_settings_and_checkpoints_of_older_versions(trained_run: Path, tmp_path: Path) -> None:
    config = load_config(None, tiny(trained_run, "evaluation.adamw_lrs=[]", "evaluation.tasks=[digits_cnn]",
                                    "evaluation.seeds=[3]", "card.name=mine"))
    artifact = load_artifact(trained_run / "final")
    evaluation = evaluate_for_card(artifact, config, steps=2, plot_path=tmp_path / "eval.png")
    assert list(evaluation["summary"]["tasks"]) == ["digits_cnn"] and evaluation["plot"] == "eval.png"
    assert set(evaluation["summary"]["tasks"]["digits_cnn"]) == {"tiny-lopt", "random init θ₀"}  # no AdamW
    assert "2 steps, mean over seeds [3]" in evaluation["table"] and "AdamW" not in evaluation["description"]
    assert (tmp_path / "eval.png").read_bytes().startswith(PNG_MAGIC)

    # A checkpoint written when evaluation had hidden_sizes / batch_size still exports.
    old = tmp_path / "step-old"
    shutil.copytree(trained_run / "checkpoints" / "step-00000002", old)
    state = json.loads((old / "trainer_state.json").read_text())
    state["config"]["evaluation"].update(hidden_sizes=[32], batch_size=128)
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert cli_main(["export", str(old), str(tmp_path / "out"), "--no-evaluate"]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())["provenance"]["meta_training"]["config"]
    assert "hidden_sizes" not in exported["evaluation"] and exported["evaluation"]["tasks"] == ["digits_mlp"]


def test_push_to_the_local_hub(trained_run: Path, hub_env, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    # `lopt-hf push DIR REPO`: the card is re-rendered for the repo and its images travel with it.
    repo = hub_env.repo_id("tiny-lopt")
    assert cli_main(["push", str(trained_run / "final"), repo]) == 0
    files = set(HfApi().list_repo_files(repo))
    assert {"config.json", "model.safetensors", "README.md", "meta_loss.png", "evaluation.png"} <= files
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert f'load_lopt("{repo}"' in card and "| **Meta-trainer** | Persistent Evolution Strategies (PES) |" in card
    assert Path(hf_hub_download(repo, "meta_loss.png")).read_bytes().startswith(PNG_MAGIC)
    model = nn.Linear(64, 10)
    assert load_lopt(repo, model).param_groups

    # push_to_hub in the config (what --push-to-hub sets) publishes at the end of training.
    repo_end = hub_env.repo_id("pushed-at-end")
    run = train_and_export(load_config(None, tiny(tmp_path / "run2", "outer_steps=2", "evaluation.steps=0",
                                                  "log_with=[]", f"push_to_hub={repo_end}")), progress=False)
    assert run.artifact_dir is not None
    assert {"config.json", "model.safetensors", "README.md", "meta_loss.png"} <= set(HfApi().list_repo_files(repo_end))
    pushed = load_artifact(repo_end)
    for name, value in pushed.theta().items():
        assert torch.equal(value, run.theta[name])


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else "<dir>"
            for path in sorted(folder.rglob("*"))}


def test_a_failed_export_leaves_the_folder_as_it_was(trained_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19 item 2: export writes all or nothing (real failures: ENOSPC from the OS calls, a folder in the way)."""
    import os

    from lopt_hf.publish.export import export_checkpoint

    older, newest = trained_run / "checkpoints" / "step-00000002", latest_checkpoint(trained_run / "checkpoints")
    assert newest is not None and newest != older
    out = tmp_path / "exported"

    def fail_when(name: str, target: Callable[[Path], bool], call: int = 1) -> None:
        original, calls = getattr(os, name), [0]

        def failing(source: Any, destination: Any, *args: Any, **kwargs: Any) -> Any:
            if target(Path(destination)):
                calls[0] += 1
                if calls[0] == call:
                    raise OSError(28, "No space left on device (simulated)", os.fspath(destination))
            return original(source, destination, *args, **kwargs)

        monkeypatch.setattr(os, name, failing)

    # A new folder: the staging folder is renamed to it last; a failure there leaves no folder and no staging.
    fail_when("rename", lambda destination: destination == out)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(older, out, evaluate=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []

    export_checkpoint(older, out, evaluate=False)
    before = _snapshot(out)
    # Over an existing export: ENOSPC on the 2nd of the four replacements; the first is undone.
    fail_when("replace", lambda destination: destination.parent == out, call=2)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(newest, out, evaluate=False)
    monkeypatch.undo()
    assert _snapshot(out) == before
    # A folder in the way of model.safetensors: refused before anything is replaced (CLI: one line, exit 2).
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").mkdir()
    before = _snapshot(out)
    assert cli_main(["export", str(newest), str(out), "--no-evaluate"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert _snapshot(out) == before
    (out / "model.safetensors").rmdir()
    assert cli_main(["export", str(newest), str(out), "--no-evaluate"]) == 0
    assert "| **Outer iterations** | 4 |" in card_parts(out)[1]


@pytest.mark.parametrize("seconds", [0.0, 0.05, 7.3, 95.3, 1063.0, 7384.0, 3 * 86400 + 7200.0, float("nan")])
def test_parse_duration_reads_back_what_format_duration_wrote(seconds: float) -> None:
    from lopt_hf.publish.export import format_duration, parse_duration

    text = format_duration(seconds)
    assert format_duration(parse_duration(text)) == text
    with pytest.raises(ValueError, match="not a duration written by format_duration"):
        parse_duration("about a minute")
