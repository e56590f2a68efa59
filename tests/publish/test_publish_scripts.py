"""Every meta-training / publishing script runs end to end with its smallest settings (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["--no-progress", "--set", "outer_steps=2", "--set", "estimator.num_tasks=1",
            "--set", "estimator.truncation_length=2", "--set", "estimator.min_unroll=3",
            "--set", "estimator.max_unroll=3", "--set", "log_with=[]", "--set", "checkpoint_every=0",
            "--set", "task.batch_size=16", "--set", "evaluation.steps=3", "--set", "evaluation.seeds=[0]",
            "--set", "evaluation.adamw_lrs=[1e-3]"]


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=env)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scripts/metatrain.py`` on the quickstart config: trains, then exports ``<run>/final`` (evaluated card)."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("metatrain.py", "--config", "configs/quickstart.yaml", "--output-dir", str(run_dir), *TINY_RUN)
    assert f"exported the learned optimizer to {run_dir / 'final'}" in result.stderr
    assert "done: 2 outer steps" in result.stderr
    return run_dir


@pytest.mark.slow
def test_metatrain_script_trains_then_exports(tiny_run: Path) -> None:
    final = tiny_run / "final"
    assert {"config.json", "model.safetensors", "README.md", "meta_loss.png", "evaluation.png"} <= \
        {path.name for path in final.iterdir()}
    provenance = json.loads((final / "config.json").read_text())["provenance"]
    assert provenance["meta_training"]["config"]["outer_steps"] == 2 and "table" in provenance["evaluation"]


@pytest.mark.slow
def test_package_pretrained_script(tiny_run: Path, tmp_path: Path) -> None:
    run_script("package_pretrained.py", "small-fc-lolo", str(tiny_run), "--root", str(tmp_path), "--tasks",
               "digits_mlp", "--seeds", "0", "--multiples", "1")
    target = tmp_path / "lopt_hf" / "pretrained" / "small-fc-lolo"
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in target.iterdir()}
    assert (tmp_path / "docs" / "pretrained" / "small-fc-lolo" / "eval_3" / "results.md").is_file()


@pytest.mark.slow
def test_lolo_ablation_script(tmp_path: Path) -> None:
    run_script("lolo_ablation.py", "--out", str(tmp_path), "--outer-steps", "2", "--num-tasks", "1",
               "--truncation", "2", "--unroll", "3", "--eval-factor", "2", "--eval-seeds", "0")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) >= {"naive PES", "BC only", "LoLO (buffer + BC)"}
    assert (tmp_path / "results.md").is_file() and (tmp_path / "curves.png").is_file()


@pytest.mark.slow
def test_bench_metatrain_script() -> None:
    result = run_script("bench_metatrain.py", "--processes", "1", "--tasks", "1", "--steps", "1", "--repeats", "1",
                        "--warmup", "0", "--unroll", "3", "--truncation-length", "2", "--hidden", "4",
                        "--dataset", "digits", "--no-compile", "--threads", "1", "--json")
    meta, loop = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert meta["processes"] == 1 and meta["outer_steps_per_s"] > 0 and meta["family"] == "tutorial"
    # the plain AdamW loop over as many models: 1 task x 2 antithetic members, 2 steps each
    assert loop["models"] == 2 and loop["steps"] == 2 and loop["adamw_loop_inner_steps_per_s"] > 0
    assert loop["loop_over_metatrain"]["1"] == pytest.approx(loop["adamw_loop_inner_steps_per_s"]
                                                            / meta["inner_steps_per_s"])


@pytest.mark.slow
def test_bench_metatrain_times_a_larger_family_with_a_configured_rule() -> None:
    result = run_script("bench_metatrain.py", "--family", "transformer", "--rule", "celo_adam", "--rule-option",
                        "orthogonalize=true", "--processes", "1", "--tasks", "1", "--steps", "1", "--repeats", "1",
                        "--warmup", "0", "--unroll", "3", "--truncation-length", "2", "--no-compile", "--threads", "1")
    meta, loop = result.stdout.strip().splitlines()[-2:]
    assert "celo_adam, 1 tasks x 2 members x 2 steps, transformer:" in meta and "inner steps/s" in meta
    assert loop.startswith("plain PyTorch loop, AdamW, the same 2 models x 2 steps") and "x with 1 process(es)" in loop
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_metatrain.py"), "--rule-option", "orthogonalize",
                          "--no-adamw-loop"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "--rule-option: override 'orthogonalize': expected KEY=VALUE" in bad.stderr


@pytest.mark.slow
def test_package_pretrained_from_reports_states_the_bar(tiny_run: Path, tmp_path: Path) -> None:
    """``--reports``: the card's evaluation comes from `lopt-hf eval` reports of this checkpoint (checked), and with
    the bar's baselines in them the card opens with the bar's verdict instead of the research-baseline paragraph."""
    from lopt_hf.cli import main as cli_main
    from lopt_hf.metatrain.checkpoint import latest_checkpoint

    exported = tmp_path / "exported"
    checkpoint = latest_checkpoint(tiny_run / "checkpoints")
    # the setup runs the CLI in-process (the scripts under test still run in subprocesses)
    assert cli_main(["export", str(checkpoint), str(exported), "--no-evaluate"]) == 0
    reports = tmp_path / "reports"
    # the candidate is itself the "published" reference here: the bar's third condition then fails, and the card
    # must say research baseline; the verdict table is still in the evaluation
    for label in ("small-fc-lolo", "celo-adam"):
        assert cli_main(["eval", "--tasks", "digits_mlp", "--steps", "3", "--seeds", "0", "--no-progress", "--out",
                         str(reports / label), "--optimizers", f"{label}={exported}",
                         *(["adamw:1e-3", "adamw-grid"] if label == "celo-adam" else [])]) == 0
    run_script("package_pretrained.py", "small-fc-lolo", str(tiny_run), "--root", str(tmp_path), "--multiples", "1",
               "--reports", str(reports / "small-fc-lolo"), str(reports / "celo-adam" / "results.json"))
    config = json.loads((tmp_path / "lopt_hf" / "pretrained" / "small-fc-lolo" / "config.json").read_text())
    sections = config["provenance"]["evaluation"]["sections"]
    assert [section["title"].split(":")[0] for section in sections] == [
        "1× the meta-training horizon", "The shipping bar"]
    assert "| digits_mlp | small-fc-lolo |" in sections[0]["table"] and "**Does not meet the bar.**" in \
        sections[1]["table"]
    assert config["provenance"]["description"].startswith("**A research baseline.**")

    # baselines it beats (their numbers set by hand around the candidate's real one): the card opens with the bar's
    # verdict, and a re-render with --cards-only (a card-builder change) keeps it
    baselines = json.loads((reports / "celo-adam" / "results.json").read_text())
    entries = baselines["tasks"]["digits_mlp"]["optimizers"]
    own = json.loads((reports / "small-fc-lolo" / "results.json").read_text())
    loss = own["tasks"]["digits_mlp"]["optimizers"]["small-fc-lolo"]["final_train_loss"]
    for label, factor in (("adamw:1e-3", 2.0), ("adamw-grid", 1.0), ("celo-adam", 1.5)):
        entries[label]["final_train_loss"] = loss * factor
    (reports / "beaten").mkdir()
    (reports / "beaten" / "results.json").write_text(json.dumps(baselines))
    shipped = tmp_path / "shipped"
    run_script("package_pretrained.py", "small-fc-lolo", str(tiny_run), "--root", str(shipped), "--multiples", "1",
               "--reports", str(reports / "small-fc-lolo"), str(reports / "beaten"))
    card_config = shipped / "lopt_hf" / "pretrained" / "small-fc-lolo" / "config.json"
    for rendering in ("packaged", "--cards-only"):
        if rendering == "--cards-only":
            run_script("package_pretrained.py", "small-fc-lolo", "--cards-only", "--root", str(shipped))
        provenance = json.loads(card_config.read_text())["provenance"]
        assert provenance["description"].startswith("**Meets lopt_hf's shipping bar**"), rendering
        assert "**Meets the bar.**" in provenance["evaluation"]["sections"][1]["table"], rendering

    other = tmp_path / "other"  # a report whose small-fc-lolo is another theta is refused
    assert cli_main(["create", "small_fc_lopt", str(other), "--seed", "5"]) == 0
    assert cli_main(["eval", "--tasks", "digits_mlp", "--steps", "3", "--seeds", "0", "--no-progress", "--out",
                     str(reports / "other"), "--optimizers", f"small-fc-lolo={other}"]) == 0
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "package_pretrained.py"), "small-fc-lolo",
                              str(tiny_run), "--root", str(tmp_path / "refused"), "--multiples", "1", "--reports",
                              str(reports / "other")], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "is not this checkpoint" in refused.stderr
