"""The pieces of the issue-15 recipe in the meta-trainer: frozen theta (Celo's two phases), fine-tunes that change
how an artifact's theta is used (``lr_schedule``, ``orthogonalize``), and LoLO on a mixture of task families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopt_hf.hub import create_artifact
from lopt_hf.metatrain.config import ConfigError, load_config
from lopt_hf.metatrain.estimators import build_estimator
from lopt_hf.metatrain.tasks import build_task_family
from lopt_hf.metatrain.trainer import MetaTrainer, initial_theta
from lopt_hf.publish.metatrain_command import train_and_export
from lopt_hf.rules import build_rule
from support import metatrain_cli

pytestmark = pytest.mark.usefixtures("single_torch_thread")
SCHEDULER = ["rnn_params/", "lstm_init_state/"]


def tiny(run_dir: Path, *extra: str) -> list[str]:
    """A few-second PES run of a small Celo on digits MLPs 16-4-10."""
    return [f"output_dir={run_dir}", "rule.name=celo", "rule.config.lstm_hidden_size=8", "task.dataset=digits",
            "task.image_size=4", "task.hidden_sizes=[4]", "task.batch_size=8", "estimator.num_tasks=2",
            "estimator.truncation_length=2", "estimator.min_unroll=3", "estimator.max_unroll=5",
            "estimator.compile=false", "log_with=[]", "num_threads=1", "checkpoint_every=2", "evaluation.steps=0",
            "meta_optimizer.lr=0.01", "meta_optimizer.weight_decay=0.1", *extra]


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in before if not torch.equal(before[key], after[key])}


@pytest.mark.parametrize("estimator", ["pes", "truncated_bptt"])
def test_frozen_theta_stays_as_it_was_and_the_rest_is_trained(tmp_path: Path, estimator: str) -> None:
    """Celo's phase 1: the scheduler frozen (not perturbed, no update, no weight decay), the update rule trained;
    also under BPTT, whose meta-gradient does reach the frozen keys."""
    frozen = f"meta_optimizer.frozen=[{', '.join(SCHEDULER)}]"
    config = load_config(None, tiny(tmp_path / "run", frozen, f"estimator.name={estimator}", "outer_steps=3",
                                    "rule.config.lr_schedule=constant"))
    trainer = MetaTrainer(config, progress=False)
    start = {key: value.clone() for key, value in trainer.theta.items()}
    trainer.train()
    changed = changed_keys(start, trainer.theta)
    assert changed and all(key.startswith("ff_mod_stack/") for key in changed)
    assert trainer.frozen == [key for key in start if key.startswith(tuple(SCHEDULER))]
    if estimator == "pes":  # a frozen key is never perturbed
        noise = trainer.estimator._perturbations(start, [0, 1], 0)
        assert all(not noise[key].any() for key in trainer.frozen)
        assert all(noise[key].any() for key in start if key not in trainer.frozen)


def test_frozen_must_name_some_but_not_all_of_the_theta(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"meta_optimizer\.frozen: 'rnn/' is no theta key \(prefix\) of rule 'celo'"):
        load_config(None, tiny(tmp_path, "meta_optimizer.frozen=[rnn/]"))
    with pytest.raises(ConfigError, match="meta_optimizer.frozen: freezes every theta key"):
        load_config(None, tiny(tmp_path, "meta_optimizer.frozen=[rnn_params/, lstm_init_state/, ff_mod_stack/]"))
    rule = build_rule("celo", lstm_hidden_size=8)
    family = build_task_family("linear_regression", num_features=3, batch_size=4)
    with pytest.raises(ValueError, match=r"frozen: \['nope'\] are not theta keys of rule 'celo'"):
        build_estimator("pes", family, rule, frozen=("nope",))


def test_two_phases_chain_through_artifacts(tmp_path: Path) -> None:
    """Phase 1 (constant schedule, scheduler frozen) exports an artifact; phase 2 starts from it with the learned
    schedule and the rule frozen: its start is phase 1's theta, and only the scheduler moves."""
    phase1 = load_config(None, tiny(tmp_path / "p1", "rule.config.lr_schedule=constant", "outer_steps=2",
                                    f"meta_optimizer.frozen=[{', '.join(SCHEDULER)}]"))
    train_and_export(phase1, progress=False)
    exported = load_file(tmp_path / "p1" / "final" / "model.safetensors")
    phase2 = load_config(None, tiny(tmp_path / "p2", f"rule.init_from={tmp_path / 'p1' / 'final'}", "outer_steps=2",
                                    "meta_optimizer.frozen=[ff_mod_stack/]"))
    start = initial_theta(phase2)
    assert not changed_keys(exported, start)
    trainer = MetaTrainer(phase2, progress=False)
    trainer.train()
    changed = changed_keys(start, trainer.theta)
    assert changed and not any(key.startswith("ff_mod_stack/") for key in changed)
    assert trainer.rule.lr_schedule == "learned" and build_rule("celo", **phase1.rule.config).lr_schedule == "constant"


def test_a_fine_tune_may_change_how_theta_is_used_but_not_the_optimizer(tmp_path: Path) -> None:
    theta = build_rule("celo_adam", lstm_hidden_size=8).init_theta(torch.Generator().manual_seed(0))
    source = tmp_path / "adam"
    create_artifact("celo_adam", theta=theta, rule_config={"lstm_hidden_size": 8}).save_pretrained(source)
    base = tiny(tmp_path / "run", "rule.name=celo_adam", f"rule.init_from={source}")
    start = initial_theta(load_config(None, base + ["rule.config.orthogonalize=true",
                                                    "rule.config.lr_schedule=warmup_cosine"]))
    assert not changed_keys(theta, start)
    with pytest.raises(ConfigError, match="beta1: artifact 0.9, config 0.8"):
        initial_theta(load_config(None, base + ["rule.config.beta1=0.8"]))


def test_lolo_meta_trains_a_mixture_and_resumes_exactly(tmp_path: Path) -> None:
    """LoLO's replay buffer per slot of every family of a mixture; checkpointed and resumed bit for bit."""
    overrides = ["estimator.num_tasks=2", "lolo={buffer_size: 2, p_threshold: 0.0, behaviour_cloning: false}",
                 "extra_tasks=[{family: cnn_image, channels: [2], batch_size: 8, image_size: 8}]"]

    def run(run_dir: Path, steps: int, *flags: str) -> int:
        return metatrain_cli(run_dir, steps, tiny(run_dir, "rule.name=celo_adam", *overrides), *flags)

    assert run(tmp_path / "straight", 6) == 0
    assert run(tmp_path / "resumed", 2) == 0
    assert run(tmp_path / "resumed", 6, "--resume") == 0
    states = [json.loads((tmp_path / name / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
              for name in ("straight", "resumed")]
    assert states[0]["history"]["meta_loss"] == states[1]["history"]["meta_loss"]
    estimator = load_file(tmp_path / "straight" / "checkpoints" / "step-00000006" / "rank0.safetensors")
    for family in (0, 1):  # both families keep a buffer, and it holds states by now (trajectories of <= 5 steps)
        counts = [value for key, value in estimator.items() if key == f"estimator/family{family}/lolo_buffer/count"]
        assert counts and int(counts[0].sum()) > 0
    thetas = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("straight", "resumed")]
    assert not changed_keys(thetas[0], thetas[1])
