"""Several task families in one meta-training run (``extra_tasks``, ``lopt_hf.metatrain.mixture``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lopt_hf.metatrain.config import ConfigError, load_config
from lopt_hf.metatrain.estimators import build_estimator
from lopt_hf.data.corpora import BUILTIN_CORPORA, builtin_corpus
from lopt_hf.metatrain.lm_tasks import CharLMTaskFamily
from lopt_hf.metatrain.mixture import TaskMixture, family_of_slot
from lopt_hf.metatrain.tasks import build_task_family
from lopt_hf.rules import build_rule
from support import metatrain_cli

OPTIONS = {"truncation_length": 2, "min_unroll": 3, "max_unroll": 5, "std": 0.01, "compile": False}


def _families():
    return [build_task_family("linear_regression", num_features=3, batch_size=4),
            build_task_family("mlp_image", datasets=["digits"], hidden_sizes=[4], batch_size=8, image_size=4)]


def test_slots_are_dealt_to_the_families_in_turn() -> None:
    assert [family_of_slot(slot, 3) for slot in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="at least two estimators"):
        TaskMixture([object()])  # type: ignore[list-item]


def test_the_mixture_sums_what_each_family_estimates_for_its_own_slots() -> None:
    rule = build_rule("per_param_mlp", hidden_sizes=[4])
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    task_ids = [4, 5, 6, 7, 8]  # a process's block: family 0 gets 4, 6, 8 and family 1 gets 5, 7
    alone = [build_estimator("pes", family, rule, seed=3, **OPTIONS) for family in _families()]
    mixture = TaskMixture([build_estimator("pes", family, rule, seed=3, **OPTIONS) for family in _families()])
    state = mixture.init_state(theta, task_ids, 0)
    assert {key.split("/")[0] for key in state} == {"family0", "family1"}
    assert state["family0/step"].shape[0] == 3 and state["family1/step"].shape[0] == 2
    states = [alone[0].init_state(theta, [4, 6, 8], 0), alone[1].init_state(theta, [5, 7], 0)]
    for outer_step in range(3):  # the persistent state advances per family exactly as it would alone
        result = mixture.estimate(theta, state, task_ids, outer_step)
        parts = [estimator.estimate(theta, own, ids, outer_step)
                 for estimator, own, ids in zip(alone, states, ([4, 6, 8], [5, 7]))]
        assert result.num_tasks == 5
        for name in theta:
            torch.testing.assert_close(result.grad_sum[name], parts[0].grad_sum[name] + parts[1].grad_sum[name],
                                       rtol=0, atol=0)
        assert float(result.meta_loss_sum) == pytest.approx(float(parts[0].meta_loss_sum + parts[1].meta_loss_sum))
        assert result.stats["meta_loss/0"] == pytest.approx(float(parts[0].meta_loss_sum) / 3)
        assert result.stats["meta_loss/1"] == pytest.approx(float(parts[1].meta_loss_sum) / 2)
        assert result.stats["inner_steps"] == parts[0].stats["inner_steps"] + parts[1].stats["inner_steps"]
        state, states = result.new_state, [part.new_state for part in parts]
        for family, own in enumerate(states):
            for key, value in own.items():
                torch.testing.assert_close(state[f"family{family}/{key}"], value, rtol=0, atol=0)


def test_builtin_corpus_is_python_docs_and_not_the_evaluation_text() -> None:
    from lopt_hf.evaluation.lm import DEFAULT_TEXT

    text = builtin_corpus("python_docs")
    assert len(text) > 100_000 and DEFAULT_TEXT[:200] not in text
    family = CharLMTaskFamily(corpus="python_docs", context_length=8, model_dim=8, segment_length=1000)
    assert family.config()["corpus"] == "python_docs" and family.vocab_size == len(set(text))
    with pytest.raises(ValueError, match="unknown corpus 'shakespeare'"):
        builtin_corpus("shakespeare")
    with pytest.raises(ValueError, match="exactly one of text=, text_file= and corpus="):
        CharLMTaskFamily(text="abc", corpus="python_docs")
    assert list(BUILTIN_CORPORA) == ["python_docs"]


def test_extra_tasks_config_is_checked_key_by_key() -> None:
    config = load_config(None, ["extra_tasks=[{family: char_lm, corpus: python_docs}, {family: cnn_image}]",
                                "estimator.num_tasks=3"])
    assert [extra.family for extra in config.extra_tasks] == ["char_lm", "cnn_image"]
    saved = config.to_dict()["extra_tasks"]
    assert "hidden_sizes" not in saved[0] and saved[0]["corpus"] == "python_docs" and "channels" in saved[1]
    with pytest.raises(ConfigError, match=r"extra_tasks\[1\]\.chanels: unknown key; did you mean 'channels'"):
        load_config(None, ["extra_tasks=[{family: mlp_image}, {family: cnn_image, chanels: [4]}]"])
    with pytest.raises(ConfigError, match=r"extra_tasks\[0\]\.corpus: unknown corpus 'shakespeare'"):
        load_config(None, ["extra_tasks=[{family: char_lm, corpus: shakespeare}]"])
    with pytest.raises(ConfigError, match=r"extra_tasks\[0\]\.text_file: char_lm needs exactly one text"):
        load_config(None, ["extra_tasks=[{family: char_lm}]"])
    with pytest.raises(ConfigError, match=r"estimator\.num_tasks: must give every task family a slot: >= 3"):
        load_config(None, ["extra_tasks=[{family: mlp_image}, {family: cnn_image}]", "estimator.num_tasks=2"])


def test_a_mixture_run_trains_checkpoints_resumes_exactly_and_describes_every_family(tmp_path: Path) -> None:
    tiny = ["estimator.name=pes", "estimator.num_tasks=3", "estimator.truncation_length=2", "estimator.min_unroll=3",
            "estimator.max_unroll=4", "estimator.compile=false", "log_with=[]", "num_threads=1",
            "checkpoint_every=2", "evaluation.steps=0", "task.batch_size=8", "meta_optimizer.lr=0.01",
            "rule.name=per_param_mlp", "rule.config.hidden_sizes=[4]", "task.image_size=4", "task.hidden_sizes=[4]",
            "extra_tasks=[{family: cnn_image, channels: [2], batch_size: 8, image_size: 8},"
            " {family: char_lm, corpus: python_docs, context_length: 8, model_dim: 8, batch_size: 4,"
            " segment_length: 500}]"]

    def run(run_dir: Path, steps: int, *flags: str) -> int:
        return metatrain_cli(run_dir, steps, tiny, *flags)

    assert run(tmp_path / "straight", 4) == 0
    assert run(tmp_path / "resumed", 2) == 0
    assert run(tmp_path / "resumed", 4, "--resume") == 0
    states = [json.loads((tmp_path / name / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
              for name in ("straight", "resumed")]
    assert states[0]["history"]["meta_loss"] == states[1]["history"]["meta_loss"]
    assert [family["name"] for family in states[0]["extra"]["extra_task_families"]] == ["cnn_image", "char_lm"]
    history = states[0]["history"]
    assert all(len(history[f"meta_loss/{family}"]) == 4 for family in range(3))
    for step in range(4):  # one slot per family: the mean of the three is the step's meta-loss
        families = [history[f"meta_loss/{family}"][step] for family in range(3)]
        assert sum(families) / 3 == pytest.approx(history["meta_loss"][step], rel=1e-5)
    metrics = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "step,meta_loss,grad_norm,meta_loss/0,meta_loss/1,meta_loss/2" and len(metrics) == 5
    assert (tmp_path / "resumed" / "meta_loss.png").stat().st_size > 10_000
    from safetensors.torch import load_file

    thetas = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("straight", "resumed")]
    for key in thetas[0]:
        torch.testing.assert_close(thetas[0][key], thetas[1][key], rtol=0, atol=0)
    card = (tmp_path / "straight" / "final" / "README.md").read_text(encoding="utf-8")
    assert "a mixture, task slots dealt in turn: MLP classification of digits at 4×4; CNN classification" in card
    assert "transformer LM (1 layer, width 8" in card and "Python's built-in python_docs text" in card
    assert "MLP (16-4-10)" in card and "CNN (3×3 stride-2 convolutions of 2 channels" in card
