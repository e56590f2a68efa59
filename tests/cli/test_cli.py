"""The ``lopt-hf`` parser and its light sub-commands, in-process (``lopt_hf.cli.main([...])``).

One subprocess test (``test_startup.py``) runs the installed ``lopt-hf`` entry point itself; the
heavy sub-commands are tested where their modules are (eval, push, convert, export, card).
"""

from __future__ import annotations

import json

import pytest

from lopt_hf.cli import build_parser, main
from lopt_hf.pretrained import available_pretrained
from lopt_hf.rules import available_rules

COMMANDS = ("bench", "card", "convert", "create", "eval", "export", "pretrained", "push", "rules", "metatrain")


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(["--help"], capsys)
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize(("command", "options"), [
    ("eval", ("--optimizers", "--tasks", "--steps", "--seeds", "--out", "--threads", "--no-progress")),
    ("bench", ("--rules", "--layers", "--device", "--warmup", "--repeats", "--threads", "--no-memory", "--json",
               "--compile")),
    ("create", ("rule", "out_dir", "--seed", "--rule-config")),
    ("convert", ("format", "checkpoint", "out_dir", "--variant")),
    ("export", ("checkpoint", "out_dir", "--evaluate", "--push-to-hub")),
    ("card", ("directory", "--repo-id", "--stdout")),
    ("push", ("directory", "repo_id", "--private", "--revision", "--message")),
])
def test_sub_command_help_lists_its_options(command: str, options: tuple[str, ...],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text([command, "--help"], capsys)
    for option in options:
        assert option in text


def test_a_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: lopt-hf" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["eval"])
    assert (args.steps, args.seeds, args.out, args.threads) == (200, [0, 1], "eval_out", 1)
    args = build_parser().parse_args(["create", "per_param_mlp", "out"])
    assert (args.rule, args.out_dir, args.seed, args.rule_config) == ("per_param_mlp", "out", 0, None)


def test_rules_lists_every_rule_with_its_hyperparameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == available_rules()
    for line in lines:
        assert "meta-parameters" in line
        json.loads(line.split("meta-parameters", 1)[1])


def test_pretrained_lists_the_shipped_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    for name in available_pretrained():
        assert name in out


def test_create_then_card_to_stdout(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", "per_param_mlp", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    capsys.readouterr()
    assert main(["card", str(tmp_path / "a"), "--stdout", "--repo-id", "user/name"]) == 0
    card = capsys.readouterr().out
    assert "library_name: lopt_hf" in card and 'load_lopt("user/name"' in card


def test_eval_help_names_the_default_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    """`lopt-hf eval` without --optimizers evaluates the shipped learned optimizers against AdamW; its help says so."""
    from lopt_hf.evaluation import DEFAULT_OPTIMIZERS

    assert set(available_pretrained()) <= set(DEFAULT_OPTIMIZERS) and "adamw" in DEFAULT_OPTIMIZERS
    text = "".join(help_text(["eval", "--help"], capsys).split())  # (argparse wraps lines at hyphens too)
    assert f"(default:{''.join(DEFAULT_OPTIMIZERS)})" in text
