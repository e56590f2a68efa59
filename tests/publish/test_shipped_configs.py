"""Meta-training without a checkout: the configs ship in the package, by name, and `-m lopt_hf.metatrain` runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lopt_hf.cli import main as cli_main
from lopt_hf.metatrain.config import ConfigError, load_config
from lopt_hf.publish.card_evaluation import check_evaluation_tasks
from lopt_hf.publish.shipped_configs import CONFIG_ROOT, resolve_config, shipped_configs

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TINY = ["--no-progress", "--set", "outer_steps=2", "--set", "estimator.num_tasks=1",
        "--set", "estimator.truncation_length=2", "--set", "estimator.min_unroll=3", "--set", "estimator.max_unroll=3",
        "--set", "log_with=[]", "--set", "checkpoint_every=0", "--set", "task.batch_size=16",
        "--set", "evaluation.steps=0", "--set", "num_threads=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_every_shipped_config_is_found_by_name_and_loads() -> None:
    configs = shipped_configs()
    assert {"quickstart", "celo", "pretrained/small_fc_lolo", "pretrained/celo2_base_mini"} <= set(configs)
    assert CONFIG_ROOT == ROOT / "lopt_hf" / "configs"
    for name, path in configs.items():
        assert path.is_file() and path.is_relative_to(CONFIG_ROOT)
        for spelling in (name, f"{name}.yaml", f"configs/{name}.yaml"):
            assert resolve_config(spelling).resolve() == path, spelling
        check_evaluation_tasks(load_config(path), source=name)
    # the checkout's configs/ is the same files (a link), so its paths keep working
    assert (ROOT / "configs" / "quickstart.yaml").resolve() == configs["quickstart"]


def test_a_path_wins_and_an_unknown_name_lists_the_shipped_configs(tmp_path: Path, monkeypatch) -> None:
    mine = tmp_path / "quickstart"  # a local file of a shipped config's name is the file
    mine.write_text("name: mine\nouter_steps: 3\n")
    assert resolve_config(mine) == mine
    monkeypatch.chdir(tmp_path)
    assert load_config(resolve_config("quickstart")).name == "mine"
    with pytest.raises(ConfigError) as err:
        resolve_config("quickstrat.yaml")
    message = str(err.value)
    assert "no config file quickstrat.yaml" in message and "did you mean 'quickstart'?" in message
    assert "pretrained/small_fc_lolo" in message and "--list-configs" in message
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_config(str(tmp_path))


def test_list_configs_and_unknown_name_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["metatrain", "--list-configs"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_configs())
    assert any(line.startswith("quickstart") and "Quickstart" in line for line in lines)
    with pytest.raises(SystemExit) as done:
        cli_main(["metatrain", "--config", "no_such_config"])
    assert done.value.code == 2
    assert "no shipped config of that name" in capsys.readouterr().err


def test_print_config_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["metatrain", "--config", "pretrained/small_fc_lolo", "--print-config", "--steps", "7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "small_fc_lolo" and printed["outer_steps"] == 7


def test_module_entry_point_help_outside_the_checkout(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lopt_hf.metatrain", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m lopt_hf.metatrain") and "--list-configs" in result.stdout


@pytest.mark.slow
def test_metatrain_a_shipped_config_from_outside_the_checkout(tmp_path: Path) -> None:
    """`lopt-hf metatrain --config quickstart` in an empty folder: trains, exports runs/quickstart/final."""
    result = subprocess.run([str(VENV_BIN / "lopt-hf"), "metatrain", "--config", "quickstart", *TINY],
                            capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(config {CONFIG_ROOT / 'quickstart.yaml'})" in result.stderr  # the start line names the file
    assert "2 outer steps of pes" in result.stderr and "done: 2 outer steps" in result.stderr
    final = tmp_path / "runs" / "quickstart" / "final"
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in final.iterdir()}
    card = (final / "README.md").read_text()
    assert "2 outer iterations of Persistent Evolution Strategies (PES)" in card and "about a minute" not in card


@pytest.mark.slow
def test_accelerate_launch_module_entry(tmp_path: Path) -> None:
    result = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "lopt_hf.metatrain",
                             "--config", "quickstart", *TINY, "--no-export"],
                            capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 outer steps" in result.stderr
    assert (tmp_path / "runs" / "quickstart" / "checkpoints").is_dir()


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("lopt_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lopt_hf/configs/{name}.yaml" for name in shipped_configs()}
    assert expected <= names, sorted(expected - names)
