"""`lopt-hf metatrain` with each task family: a few PES outer steps end to end (train, checkpoint, export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lopt_hf.cli import main as cli_main
from lopt_hf.evaluation.lm import DEFAULT_TEXT
from lopt_hf.metatrain.config import ConfigError, load_config

TINY = ["estimator.name=pes", "estimator.num_tasks=2", "estimator.truncation_length=2", "estimator.min_unroll=3",
        "estimator.max_unroll=4", "estimator.compile=false", "outer_steps=3", "log_with=[]", "num_threads=1",
        "checkpoint_every=0", "evaluation.steps=0", "task.batch_size=8", "meta_optimizer.lr=0.01",
        "rule.name=per_param_mlp", "rule.config.hidden_sizes=[4]"]


def metatrain(run_dir: Path, *overrides: str) -> dict:
    argv = ["metatrain", "--no-progress", *[arg for item in [f"output_dir={run_dir}", *TINY, *overrides]
                                            for arg in ("--set", item)]]
    assert cli_main(argv) == 0
    state = json.loads((run_dir / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (run_dir / "final" / "model.safetensors").is_file()
    return state


def test_cnn_image_family_meta_trains(tmp_path: Path) -> None:
    state = metatrain(tmp_path / "run", "task.family=cnn_image", "task.channels=[4,8]")
    assert state["extra"]["task_family"]["name"] == "cnn_image"
    assert state["extra"]["task_family"]["channels"] == [4, 8]
    losses = state["history"]["meta_loss"]
    assert len(losses) == 3 and all(0 < loss < 1.5 for loss in losses)
    card = (tmp_path / "run" / "final" / "README.md").read_text(encoding="utf-8")
    assert "training runs of CNN classifiers of digits" in card and "CNN (3×3 stride-2 convolutions of 4-8" in card
    assert "MLP classifiers" not in card and "MLP (" not in card  # (the rule itself is a per-element MLP)


def test_char_lm_family_meta_trains(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_TEXT, encoding="utf-8")
    state = metatrain(tmp_path / "run", "task.family=char_lm", f"task.text_file={text}", "task.context_length=16",
                      "task.model_dim=16", "task.segment_length=500")
    family = state["extra"]["task_family"]
    assert family["name"] == "char_lm" and family["vocab_size"] == len(set(DEFAULT_TEXT))
    assert (family["context_length"], family["model_dim"], family["num_layers"]) == (16, 16, 1)
    losses = state["history"]["meta_loss"]
    assert len(losses) == 3 and all(0.5 < loss < 1.5 for loss in losses)  # normalised by ln(vocab): ~1 at first
    card = (tmp_path / "run" / "final" / "README.md").read_text(encoding="utf-8")
    assert "character-level transformer language models on text.txt" in card
    assert "character-level language modelling (text.txt)" in card and "transformer LM (1 layer, width 16" in card
    assert "MLP classifiers" not in card and "MLP (" not in card
    assert "image classification" not in card and "grayscale" not in card


def test_a_missing_text_file_is_one_line_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"task\.text_file: char_lm needs exactly one text to model"):
        load_config(None, ["task.family=char_lm"])
    argv = ["metatrain", "--no-progress", "--set", f"output_dir={tmp_path / 'run'}", "--set", "task.family=char_lm",
            "--set", f"task.text_file={tmp_path / 'missing.txt'}", "--set", "log_with=[]"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "task: text_file" in err and "missing.txt: cannot read it as UTF-8 text" in err and "Traceback" not in err


def test_an_unknown_family_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"task\.family: unknown task family 'cnn'; choose one of \['mlp_image'"):
        load_config(None, ["task.family=cnn"])
    with pytest.raises(ConfigError, match=r"task\.channels: must be one or more positive numbers"):
        load_config(None, ["task.family=cnn_image", "task.channels=[]"])
    config = load_config(None, ["task.family=cnn_image", "task.channels=[4]"])
    assert config.task.family_options()["channels"] == [4] and "hidden_sizes" not in config.task.family_options()
    assert "channels" not in load_config(None).task.family_options()
