"""The user-facing scripts (demo, demo_opt2vec, finetune, trainer_settings, bench_trainer, device_check,
diagnose_step_sizes, select_checkpoint) run end to end with their smallest settings, each in a subprocess like a
user would start it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_demo_trains_with_the_shipped_optimizer(tmp_path: Path) -> None:
    run_script("demo.py", "--steps", "5", "--out", str(tmp_path))
    assert (tmp_path / "demo_loss.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert list(metrics["optimizers"]) == ["learned: lopt-hf/celo-adam-ns", "AdamW lr=1e-3", "AdamW lr=1e-2"]
    for run in metrics["optimizers"].values():
        # the step cost is measured in the same run: every step timed, the optimizer's share within it
        assert len(run["train_loss"]) == len(run["elapsed_s"]) == 5 and run["eval_steps"][-1] == 5
        assert 0 < run["ms_per_optimizer_step"] <= run["ms_per_step"]
        assert run["elapsed_s"] == sorted(run["elapsed_s"]) and 0 <= run["test_accuracy"] <= 1


def test_demo_opt2vec_creates_saves_and_trains(tmp_path: Path) -> None:
    result = run_script("demo_opt2vec.py", "--steps", "5", "--out", str(tmp_path / "artifact"))
    assert "test accuracy" in result.stdout
    assert (tmp_path / "artifact" / "opt2vec-init" / "config.json").is_file()


def test_finetune_compares_the_learned_optimizer_with_adamw(tmp_path: Path) -> None:
    run_script("finetune.py", "--steps", "3", "--out", str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "loss_curves.png").is_file()
    runs = [value for value in metrics.values() if isinstance(value, dict) and "eval_loss" in value]
    assert len(runs) == 2 and all(math.isfinite(run["eval_loss"]) for run in runs)  # learned optimizer and AdamW
    # the README's recommended Trainer settings: the default (Celo-Adam's learned schedule) runs at a constant lr,
    # a rule without a learned schedule with linear decay
    constant = {"lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 0.0}
    assert metrics["lopt_trainer_settings"] == constant
    run_script("finetune.py", "--steps", "3", "--out", str(tmp_path / "lolo"), "--lopt", "lopt-hf/small-fc-lolo")
    metrics = json.loads((tmp_path / "lolo" / "metrics.json").read_text())
    assert metrics["lopt_trainer_settings"] == {"lr_scheduler_type": "linear", "warmup_steps": 0, "max_grad_norm": 0.0}


def test_trainer_settings_runs_the_grid_and_reports_it(tmp_path: Path) -> None:
    run_script("trainer_settings.py", "--steps", "2", "--seeds", "0", "--optimizers", "lopt-hf/small-fc-lolo",
               "adamw:1e-3", "--schedules", "constant", "cosine", "--warmups", "0", "0.5", "--clips", "0", "1",
               "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    assert len(report["runs"]) == 2 * 2 * 2 * 2
    assert {run["setting"].split(",")[0] for run in report["runs"]} == {"constant", "constant_with_warmup", "cosine"}
    summary = report["summary"]
    assert sorted(summary) == ["adamw:1e-3", "lopt-hf/small-fc-lolo"]
    assert all(len(rows) == 8 for rows in summary.values())
    table = (tmp_path / "results.md").read_text()
    assert "| cosine, 50% warmup, clip 1 |" in table and table.count("**") == 2 * 2  # the best cell per optimizer
    # another seed of one setting, then both reports together: only what both measured
    run_script("trainer_settings.py", "--steps", "2", "--seeds", "1", "--optimizers", "adamw:1e-3", "--schedules",
               "constant", "--warmups", "0", "--clips", "0", "--out", str(tmp_path / "seed1"))
    run_script("trainer_settings.py", "--combine", str(tmp_path), str(tmp_path / "seed1"), "--out",
               str(tmp_path / "both"))
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert both["seeds"] == [0, 1] and list(both["summary"]) == ["adamw:1e-3"]
    assert both["summary"]["adamw:1e-3"]["constant, no warmup, no clipping"]["seeds"] == 2


def test_bench_trainer_times_every_optimizer(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_script("bench_trainer.py", "--warmup", "1", "--steps", "2", "--rounds", "1", "--n-layer", "1", "--n-embd", "16",
               "--n-head", "2", "--vocab-size", "64", "--seq-len", "16", "--batch-size", "2", "--threads", "1",
               "--json", str(out))
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert sorted(summary) == ["adamw", "celo2", "celo2-base", "lopt-hf/celo-adam-ns"]  # + the default
    # the floor: the step's matrix products at the sgemm rate of the run; Newton–Schulz ones count their matrices
    assert results["sgemm_gflops"] > 0 and summary["adamw"]["floor_ms"] == 0 and "ratio_at_floor" not in summary["adamw"]
    assert summary["celo2"]["floor_ms"] > summary["celo2-base"]["floor_ms"] > 0  # + Newton–Schulz of the matrices
    assert all(0 < summary[name]["ratio_at_floor"] for name in ("celo2", "celo2-base", "lopt-hf/celo-adam-ns"))


@pytest.mark.slow
def test_bench_trainer_times_the_compiled_default_beside_the_eager_one(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_script("bench_trainer.py", "--warmup", "1", "--steps", "2", "--rounds", "1", "--n-layer", "1", "--n-embd", "16",
               "--n-head", "2", "--vocab-size", "64", "--seq-len", "16", "--batch-size", "2", "--threads", "1",
               "--optimizers", "adamw", "celo2-base", "lopt-hf/celo-adam-ns", "--compile", "--json", str(out))
    summary = json.loads(out.read_text())["summary"]
    # the converted Celo2-base and the default (Celo-Adam) compiled, each as a row of its own
    assert sorted(summary) == ["adamw", "celo2-base", "celo2-base+compile", "lopt-hf/celo-adam-ns",
                               "lopt-hf/celo-adam-ns+compile"]
    assert summary["lopt-hf/celo-adam-ns+compile"]["samples_per_s_median"] > 0
    assert summary["celo2-base+compile"]["samples_per_s_median"] > 0


def test_device_check_runs_every_rule_and_times_the_optimizers(tmp_path: Path) -> None:
    """On the CPU (tiny GPT-2): every rule steps, 'device' (here the CPU again) equals the CPU, bf16 stays finite."""
    run_script("device_check.py", "--tiny", "--device", "cpu", "--out", str(tmp_path))
    report = json.loads((tmp_path / "device_check.json").read_text())
    for name, row in report["correctness"].items():
        assert "error" not in row, (name, row)
        assert row["max_abs_diff_fp32"] == 0.0 and row["bf16_finite"], (name, row)
    assert all("error" not in row and row["params_finite"] for row in report["speed"].values())
    assert (tmp_path / "device_check.md").read_text().count("|") > 20


def test_diagnose_step_sizes_records_every_tensor(tmp_path: Path) -> None:
    run_script("diagnose_step_sizes.py", "--optimizers", "lolo=lopt-hf/small-fc-lolo", "adamw:1e-3", "--task",
               "digits_mlp", "--steps", "4", "--planned-steps", "40", "--out", str(tmp_path))
    report = json.loads((tmp_path / "step_sizes.json").read_text())
    assert report["planned_steps"] == 40
    for result in report["results"].values():
        assert set(result["relative_steps"]) == set(result["param_rms"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert all(len(values) == 4 and all(value > 0 for value in values)
                   for values in result["relative_steps"].values())
    assert (tmp_path / "step_sizes.png").stat().st_size > 0 and "0.weight" in (tmp_path / "step_sizes.md").read_text()


def test_select_checkpoint_ranks_a_runs_checkpoints_on_the_validation_tasks(tmp_path: Path) -> None:
    from lopt_hf.data import FASHION_MNIST_DIR
    from lopt_hf.metatrain.config import load_config
    from lopt_hf.metatrain.trainer import MetaTrainer

    if not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed (a validation task needs it)")
    run = tmp_path / "run"
    config = load_config(None, [f"output_dir={run}", "task.dataset=digits", "task.hidden_sizes=[8]",
                                "task.batch_size=16", "estimator.num_tasks=2", "estimator.truncation_length=3",
                                "estimator.min_unroll=4", "estimator.max_unroll=6", "estimator.compile=false",
                                "log_with=[]", "num_threads=1", "outer_steps=3", "checkpoint_every=1",
                                "keep_checkpoints=3", "evaluation.steps=0"])
    MetaTrainer(config, progress=False).train()
    out = tmp_path / "select"
    result = run_script("select_checkpoint.py", str(run), "--every", "2", "--steps", "2", "--seeds", "0",
                        "--out", str(out), "--no-progress")
    assert result.stdout.strip().splitlines()[-1] == str(out / "step-2")  # the only multiple of 2 kept
    assert (out / "step-2" / "config.json").is_file() and not (out / "step-1").exists()
    report = json.loads((out / "validation" / "results.json").read_text())
    assert set(report["tasks"]) == {"fashion_mnist_mlp_wide", "docs_lm"}
    assert set(report["tasks"]["docs_lm"]["optimizers"]) == {"adamw:1e-3", "step-2"}
    assert "| step-2 |" in (out / "selection.md").read_text()
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "select_checkpoint.py"), str(run), "--every",
                              "7", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
