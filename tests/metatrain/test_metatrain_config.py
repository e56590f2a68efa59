"""Meta-training config: YAML → typed dataclass, strict keys, command-line overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lopt_hf.metatrain.config import ConfigError, MetaTrainConfig, config_from_dict, load_config
from lopt_hf.metatrain.trainer import task_block
from lopt_hf.publish.metatrain_command import main as metatrain_main
from lopt_hf.publish.metatrain_command import parse_args

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_becomes_typed_sections(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "name": "x", "outer_steps": 1e3, "seed": 3,
        "rule": {"name": "small_fc_lopt", "config": {"hidden_size": 16, "exp_mult": "1e-3"}},
        "task": {"dataset": ["digits"], "hidden_sizes": [16, 8], "reparam_scale_range": [0.1, 10]},
        "estimator": {"name": "truncated_es", "num_tasks": 4, "std": "1e-2"},  # PyYAML reads 1e-2 as a string
        "meta_optimizer": {"lr": 1e-3, "grad_clip": 1},
    })
    config = load_config(path)
    assert isinstance(config, MetaTrainConfig)
    assert config.outer_steps == 1000 and isinstance(config.outer_steps, int)
    assert config.rule.config == {"hidden_size": 16, "exp_mult": 0.001}  # typed like the rule's default
    assert config.task.hidden_sizes == [16, 8] and config.task.reparam_scale_range == [0.1, 10.0]
    assert config.estimator.std == 0.01 and config.estimator.num_tasks == 4
    assert config.meta_optimizer.grad_clip == 1.0 and isinstance(config.meta_optimizer.grad_clip, float)
    assert config.task.family_options()["param_scale_range"] == [0.1, 10.0]
    assert config.run_dir == Path("runs/x")
    # to_dict round-trips (it is what checkpoints and the model card store).
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("values, needle", [
    ({"estimator": {"num_task": 4}}, "estimator.num_task: unknown key; did you mean 'num_tasks'?"),
    ({"outer_step": 4}, "outer_step: unknown key; did you mean 'outer_steps'?"),
    ({"meta_optimizer": {"learning_rate": 1}}, "meta_optimizer.learning_rate: unknown key"),
    ({"estimator": {"num_tasks": "many"}}, "estimator.num_tasks: expected an integer, got 'many'"),
    ({"estimator": {"num_tasks": True}}, "estimator.num_tasks: expected an integer"),
    ({"task": {"hidden_sizes": 32}}, "task.hidden_sizes: expected a list"),
    ({"estimator": {"name": "pez"}}, "estimator.name: unknown estimator 'pez'"),
    ({"estimator": {"min_unroll": 50, "max_unroll": 10}}, "need 1 <= min_unroll <= max_unroll"),
    ({"rule": {"name": "nope"}}, "rule: unknown rule 'nope'"),
    ({"rule": {"name": "per_param_mlp", "config": {"hidden": 3}}}, "has no hyper-parameter(s) ['hidden']"),
    ({"estimator": "pes"}, "estimator must be a mapping"),
    ({"lolo": {"buffer": 10}}, "lolo.buffer: unknown key"),
    ({"lolo": {"p_threshold": 2.0}}, "lolo: lolo.p_threshold must be in [0, 1]"),
    ({"estimator": {"name": "es"}, "lolo": {}}, "lolo: LoLO needs estimator.name: pes"),
    ({"evaluation": {"tasks": []}}, "evaluation.tasks: name at least one task"),
    ({"evaluation": {"seeds": [0, 0]}}, "evaluation.seeds: must be distinct seeds"),
    ({"evaluation": {"adamw_lrs": [0.001, 1e-3]}}, "evaluation.adamw_lrs: must be distinct positive"),
    # Removed keys (the harness task fixes model and batch size) say what to do instead.
    ({"evaluation": {"steps": 10, "hidden_sizes": [32]}},
     "evaluation.hidden_sizes: removed: the evaluation now runs lopt_hf.evaluation tasks"),
    ({"evaluation": {"batch_size": 128}}, "choose tasks with evaluation.tasks"),
])
def test_invalid_configs_name_the_key(tmp_path: Path, values: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, values))
    assert needle in str(error.value)
    assert str(tmp_path / "run.yaml") in str(error.value)  # and the file


def test_command_line_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "estimator": {"num_tasks": 8}})
    args, config = parse_args(["--config", str(path), "--set", "estimator.num_tasks=2",
                               "--meta_optimizer.lr", "1e-4", "--task.hidden_sizes=[8,4]",
                               "--set", "meta_optimizer.grad_clip=null", "--steps", "7", "--resume",
                               "--push-to-hub", "me/lopt", "--set", "rule.config.hidden_sizes=[16]"])
    assert config.estimator.num_tasks == 2 and config.meta_optimizer.lr == 1e-4
    assert config.task.hidden_sizes == [8, 4] and config.meta_optimizer.grad_clip is None
    assert config.outer_steps == 7 and config.push_to_hub == "me/lopt" and args.resume is True
    assert config.rule.config == {"hidden_sizes": [16]}


def test_exponent_floats_without_a_dot_are_numbers_everywhere(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads ``3e-3`` as a string; configs and overrides read it as the float a user means."""
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nestimator: {name: pes}\nlolo: {expert_lr: 3e-3}\nmeta_optimizer: {lr: 1E-4}\n")
    config = load_config(path, ["rule.config.exp_mult=2e-2", "lolo.psi_eps=1e-6"])
    assert config.lolo["expert_lr"] == 3e-3 and config.meta_optimizer.lr == 1e-4
    assert config.rule.config["exp_mult"] == 2e-2 and config.lolo["psi_eps"] == 1e-6


def test_bad_overrides_are_errors_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--set", "estimator.num_tasx=2"])
    assert "estimator.num_tasx: unknown key; did you mean 'num_tasks'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--bogus"])
    assert "unrecognized argument '--bogus'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["estimator.num_tasks"])
    with pytest.raises(ConfigError, match=r"evaluation\.batch_size: removed: .* evaluation\.tasks"):
        load_config(None, ["evaluation.batch_size=16"])


def test_evaluation_section_and_configs_stored_by_older_versions() -> None:
    config = load_config(None, ["evaluation.steps=50", "evaluation.tasks=[digits_mlp, digits_cnn]",
                                "evaluation.adamw_lrs=[3e-3]", "evaluation.seeds=[1]"])
    assert (config.evaluation.steps, config.evaluation.tasks) == (50, ["digits_mlp", "digits_cnn"])
    assert config.evaluation.adamw_lrs == [3e-3] and config.evaluation.seeds == [1]
    assert MetaTrainConfig().evaluation.tasks == ["digits_mlp"]
    # A checkpoint's trainer_state.json written before the keys were removed still loads (they are dropped)...
    old = config.to_dict()
    old["evaluation"] = {**old["evaluation"], "hidden_sizes": [32], "batch_size": 128}
    assert config_from_dict(old, stored=True) == config
    assert "hidden_sizes" in old["evaluation"]  # (the caller's dict is left alone)
    # ... but a config file with them does not.
    with pytest.raises(ConfigError, match="evaluation.hidden_sizes: removed"):
        config_from_dict(old)


def test_task_blocks_are_contiguous_and_cover_every_id() -> None:
    assert task_block(8, 0, 2) == [0, 1, 2, 3] and task_block(8, 1, 2) == [4, 5, 6, 7]
    blocks = [task_block(7, rank, 3) for rank in range(3)]
    assert sum(blocks, []) == list(range(7)) and all(blocks)
    with pytest.raises(ConfigError, match="at least one task slot"):
        task_block(2, 0, 3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.name == path.stem


def test_shipped_configs_exist() -> None:
    assert {"quickstart", "small_fc_pes", "celo2_base", "small_fc_lolo", "celo2_base_mini", "celo", "velo_s"} <= {
        p.stem for p in CONFIGS}


def test_celo2_base_config_mirrors_the_published_table() -> None:
    config = load_config(ROOT / "configs" / "celo2_base.yaml")
    assert config.rule.name == "celo2"
    assert config.rule.config["hidden_size"] == 8 and config.rule.config["hidden_layers"] == 2
    assert config.rule.config["orthogonalize"] is False
    assert len(config.task.dataset) == 4 and config.task.hidden_sizes == [32]
    assert config.estimator.name == "pes" and config.estimator.truncation_length == 50
    assert (config.estimator.min_unroll, config.estimator.max_unroll) == (100, 2000)
    assert config.outer_steps == 100_000


def test_script_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (the script is a thin wrapper of this main; tests/publish/test_publish_scripts.py runs the script).
    with pytest.raises(SystemExit) as exit_info:
        metatrain_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for needle in ("--config", "--resume", "--push-to-hub", "--set", "accelerate launch", "checkpoints/"):
        assert needle in help_text


def test_final_fraction_is_checked_and_only_pes_takes_it() -> None:
    assert load_config(None, ["estimator.final_fraction=0.25"]).estimator.final_fraction == 0.25
    with pytest.raises(ConfigError, match=r"estimator.final_fraction: must be in \(0, 1\], got 0.0"):
        load_config(None, ["estimator.final_fraction=0"])
    with pytest.raises(ConfigError, match="estimator.final_fraction.*truncated_es needs 1.0"):
        load_config(None, ["estimator.name=truncated_es", "estimator.final_fraction=0.5"])
