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
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["processes"] == 1 and line["outer_steps_per_s"] > 0
