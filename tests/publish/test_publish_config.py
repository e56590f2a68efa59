"""The evaluation section's task names are checked by publishing, which runs the evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lopt_hf.metatrain.config import ConfigError, load_config
from lopt_hf.publish.card_evaluation import check_evaluation_tasks
from lopt_hf.publish.metatrain_command import parse_args

NEEDLE = "evaluation.tasks: unknown task 'digit_mlp'; did you mean 'digits_mlp'?"


def test_unknown_evaluation_task_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"evaluation": {"tasks": ["digit_mlp"]}}))
    config = load_config(path)  # meta-training itself does not know the evaluation harness
    with pytest.raises(ConfigError) as error:
        check_evaluation_tasks(config, source=str(path))
    assert NEEDLE in str(error.value) and str(path) in str(error.value)
    check_evaluation_tasks(load_config(None))  # the default (digits_mlp) is fine


def test_metatrain_command_refuses_an_unknown_evaluation_task(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"evaluation": {"tasks": ["digit_mlp"]}}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert NEEDLE in err and str(path) in err
