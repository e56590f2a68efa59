"""LoLO (lopt_hf.metatrain.lolo): replay buffer semantics, α_t, ψ, reduction to PES, checkpoint/resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lopt_hf.metatrain.config import ConfigError, config_from_dict, load_config
from lopt_hf.metatrain.estimators import build_estimator
from lopt_hf.metatrain.lolo import (
    LoLOOptions,
    LoLOPES,
    ReplayBuffer,
    alpha_schedule,
    psi,
)
from lopt_hf.metatrain.tasks import LinearRegressionTaskFamily
from lopt_hf.metatrain.trainer import MetaTrainer
from lopt_hf.rules import build_rule
from support import theta_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------- buffer
def test_buffer_capacity_and_fifo() -> None:
    buffer = ReplayBuffer(3)
    state = buffer.empty_state({"x": torch.zeros(2), "step": torch.zeros((), dtype=torch.int64)}, num_slots=2)
    assert buffer.head(state, 0) is None and buffer.count(state, 1) == 0
    for value in range(5):  # slot 0 gets 0..4, slot 1 nothing
        state = buffer.push(state, 0, {"x": torch.full((2,), float(value)), "step": torch.tensor(value)})
        assert buffer.count(state, 0) == min(value + 1, 3)
        assert int(buffer.head(state, 0)["step"]) == max(0, value - 2)  # the oldest surviving entry
    assert [int(entry["step"]) for entry in buffer.entries(state, 0)] == [2, 3, 4]  # FIFO: 0, 1 dropped
    assert [float(entry["x"][0]) for entry in buffer.entries(state, 0)] == [2.0, 3.0, 4.0]
    assert buffer.count(state, 1) == 0 and buffer.head(state, 1) is None  # slots are independent
    head = buffer.head(state, 0)
    head["x"] += 100  # a copy: reading the head neither removes nor aliases it
    assert buffer.count(state, 0) == 3 and float(buffer.head(state, 0)["x"][0]) == 2.0


def reset_every_step_estimator(p_threshold: float, buffer_size: int = 4) -> tuple[LoLOPES, dict]:
    """Trajectories of one step and truncations of one step: every estimate starts a new trajectory per slot."""
    family = LinearRegressionTaskFamily(num_features=2, batch_size=4, dtype=torch.float64)
    rule = build_rule("per_param_mlp", hidden_sizes=(4,), step_mult=0.1)
    estimator = LoLOPES(family, rule, lolo={"buffer_size": buffer_size, "p_threshold": p_threshold,
                                            "behaviour_cloning": False},
                        total_outer_steps=100, truncation_length=1, min_unroll=1, max_unroll=1, compile=False,
                        stagger=False, std=0.1)
    return estimator, theta_for(rule)


def test_buffer_reuse_probability_and_never_at_first_outer_step() -> None:
    p_threshold = 0.3
    estimator, theta = reset_every_step_estimator(p_threshold)
    task_ids = list(range(8))
    state = estimator.init_state(theta, task_ids, 0)
    # One step in: every slot pushed its state (N_push is the only step) and ends its trajectory.
    state = estimator.estimate(theta, state, task_ids, 0).new_state
    assert state["lolo_buffer/count"].tolist() == [1] * len(task_ids)
    greedy, _ = reset_every_step_estimator(0.0)
    first = greedy.estimate(theta, state, task_ids, 0)  # P_th = 0 but the first outer step: fresh starts only
    assert first.stats["resets"] == len(task_ids) and first.stats["buffer_starts"] == 0
    assert greedy.estimate(theta, state, task_ids, 1).stats["buffer_starts"] == len(task_ids)
    never, _ = reset_every_step_estimator(1.0)
    assert never.estimate(theta, state, task_ids, 1).stats["buffer_starts"] == 0
    starts = draws = 0
    for outer_step in range(1, 61):
        result = estimator.estimate(theta, state, task_ids, outer_step)
        assert result.stats["resets"] == len(task_ids)
        starts += result.stats["buffer_starts"]
        draws += len(task_ids)
        state = result.new_state
        assert int(state["lolo_buffer/count"].max()) <= 4
    rate = starts / draws  # 480 Bernoulli(0.7) draws: std ≈ 0.021
    assert abs(rate - (1 - p_threshold)) < 0.08, rate


def test_buffer_started_trajectory_continues_at_the_stored_step(image_family, small_rule) -> None:
    estimator = LoLOPES(image_family, small_rule, lolo={"buffer_size": 2, "p_threshold": 0.0,
                                                        "behaviour_cloning": True},
                        total_outer_steps=10, truncation_length=4, min_unroll=5, max_unroll=5, compile=False,
                        stagger=False, std=0.1)
    theta = theta_for(small_rule)
    state = estimator.init_state(theta, [0], 0)
    assert {k for k in state if k.startswith("lolo_buffer/")} >= {"lolo_buffer/count", "lolo_buffer/step"}
    pushed = []
    for outer_step in range(6):
        result = estimator.estimate(theta, state, [0], outer_step)
        state = result.new_state
        pushed.append(int(state["lolo_buffer/count"][0]))
        assert int(state["step"][0]) <= int(state["length"][0])
    assert pushed[-1] >= 1 and max(pushed) <= 2
    # a trajectory started from an entry at step K runs to K + N: lengths beyond N = 5 appear
    entries = estimator.buffer.entries(state, 0)
    assert all(int(entry["step"]) < int(state["length"].max()) + 5 for entry in entries)
    assert result.stats["buffer_starts"] >= 0 and 0 <= result.stats["alpha"] <= 1


# --------------------------------------------------------------------------- α and ψ
def test_alpha_schedule(image_family, small_rule) -> None:
    total = 11
    assert [alpha_schedule(t, total) for t in range(total)] == pytest.approx([t / 10 for t in range(total)])
    assert alpha_schedule(0, 1) == 1.0 and alpha_schedule(50, 11) == 1.0
    estimator = LoLOPES(image_family, small_rule, lolo={"buffer_size": 0}, total_outer_steps=total, compile=False)
    assert estimator.alpha(0) == 0.0 and estimator.alpha(5) == pytest.approx(0.5) and estimator.alpha(10) == 1.0
    fixed = LoLOPES(image_family, small_rule, lolo={"buffer_size": 0, "alpha": 0.25}, total_outer_steps=total,
                    compile=False)
    assert fixed.alpha(0) == fixed.alpha(9) == 0.25
    no_bc = LoLOPES(image_family, small_rule, lolo={"buffer_size": 0, "behaviour_cloning": False},
                    total_outer_steps=total, compile=False)
    assert no_bc.alpha(0) == 1.0  # without cloning the trajectory and the signal are the learned optimizer's


def test_psi_is_second_moment_normalisation() -> None:
    x = torch.tensor([[1.0, -4.0], [3.0, 0.5], [-2.0, 2.0]], dtype=torch.float64)  # (N, columns)
    y = psi(x, dim=0, eps=0.0)
    assert torch.allclose(y.square().mean(0), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(y, x / torch.sqrt((x ** 2).mean(0)))
    assert torch.allclose(psi(1e4 * x, eps=0.0), y) and torch.equal(torch.sign(y), torch.sign(x))
    assert torch.allclose(psi(torch.zeros(3, dtype=torch.float64), eps=1e-12), torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------------ reduces to PES
@pytest.mark.parametrize("lolo", [{"buffer_size": 0, "behaviour_cloning": False},
                                  {"buffer_size": 0, "behaviour_cloning": True, "alpha": 1.0},
                                  {"buffer_size": 4, "p_threshold": 1.0, "behaviour_cloning": False}])
def test_alpha_one_without_buffer_is_exactly_pes(image_family, small_rule, lolo) -> None:
    options = {"truncation_length": 4, "min_unroll": 5, "max_unroll": 9, "compile": False, "std": 0.1,
               "num_antithetic": 2, "seed": 3}
    pes = build_estimator("pes", image_family, small_rule, **options)
    lo = LoLOPES(image_family, small_rule, lolo=lolo, total_outer_steps=7, **options)
    theta = theta_for(small_rule)
    task_ids = [0, 1, 2]
    pes_state, lo_state = pes.init_state(theta, task_ids, 0), lo.init_state(theta, task_ids, 0)
    for outer_step in range(7):  # several resets happen
        a, b = pes.estimate(theta, pes_state, task_ids, outer_step), lo.estimate(theta, lo_state, task_ids, outer_step)
        for key in a.grad_sum:
            assert torch.equal(a.grad_sum[key], b.grad_sum[key]), (outer_step, key)
        assert torch.equal(a.meta_loss_sum, b.meta_loss_sum)
        pes_state, lo_state = a.new_state, b.new_state
        for key, value in pes_state.items():
            assert torch.equal(value, lo_state[key]), key


def test_behaviour_cloning_changes_the_estimate_before_alpha_reaches_one(image_family, small_rule) -> None:
    options = {"truncation_length": 4, "min_unroll": 5, "max_unroll": 9, "compile": False, "std": 0.1}
    pes = build_estimator("pes", image_family, small_rule, **options)
    lo = LoLOPES(image_family, small_rule, lolo={"buffer_size": 0, "alpha": 0.5}, total_outer_steps=7, **options)
    theta = theta_for(small_rule)
    a = pes.estimate(theta, pes.init_state(theta, [0], 0), [0], 0)
    b = lo.estimate(theta, lo.init_state(theta, [0], 0), [0], 0)
    assert b.stats["bc_loss"] > 0
    assert not all(torch.equal(a.grad_sum[key], b.grad_sum[key]) for key in a.grad_sum)
    assert all(torch.isfinite(value).all() for value in b.grad_sum.values())


# ------------------------------------------------------------------ checkpoint and config
def test_state_round_trips_through_safetensors_and_splits_by_slot(image_family, small_rule) -> None:
    lo = LoLOPES(image_family, small_rule, lolo={"buffer_size": 2, "p_threshold": 0.2}, total_outer_steps=8,
                 truncation_length=3, min_unroll=4, max_unroll=6, compile=False, std=0.1)
    theta = theta_for(small_rule)
    state = lo.init_state(theta, [0, 1], 0)
    for outer_step in range(4):
        state = lo.estimate(theta, state, [0, 1], outer_step).new_state
    assert all(value.shape[0] == 2 for value in state.values())  # leading slot axis: checkpointable and splittable
    loaded = load_safetensors(save_safetensors({key: value.contiguous() for key, value in state.items()}))
    a, b = lo.estimate(theta, state, [0, 1], 4), lo.estimate(theta, loaded, [0, 1], 4)
    for key in a.grad_sum:  # equal up to float rounding (safetensors' buffers may be aligned differently)
        assert torch.allclose(a.grad_sum[key], b.grad_sum[key], rtol=1e-12, atol=1e-12)
    alone = lo.estimate(theta, {key: value[1:] for key, value in state.items()}, [1], 4)
    for key in a.grad_sum:  # slot 1 alone contributes its part of the sum
        slot0 = lo.estimate(theta, {k: v[:1] for k, v in state.items()}, [0], 4).grad_sum[key]
        assert torch.allclose(slot0 + alone.grad_sum[key], a.grad_sum[key])


def test_config_and_trainer_resume_with_the_buffer(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "lolo_small_fc.yaml")
    assert config.lolo == {"buffer_size": 4, "p_threshold": 0.5, "behaviour_cloning": True, "expert_lr": 1e-3}
    assert LoLOOptions(**config.lolo).buffer_size == 4
    with pytest.raises(ConfigError, match="lolo.buffer: unknown key"):
        config_from_dict({"lolo": {"buffer": 4}})

    def tiny(run_dir: Path) -> MetaTrainer:
        return MetaTrainer(load_config(None, [
            f"output_dir={run_dir}", "rule.config.hidden_sizes=[8]", "task.hidden_sizes=[8]", "task.batch_size=16",
            "estimator.num_tasks=2", "estimator.truncation_length=3", "estimator.min_unroll=2",
            "estimator.max_unroll=4", "estimator.compile=false", "log_with=[]", "num_threads=1", "outer_steps=6",
            "checkpoint_every=0", "lolo={buffer_size: 2, p_threshold: 0.3}"]), resume=True, progress=False)

    reference_trainer = tiny(tmp_path / "reference")
    assert isinstance(reference_trainer.estimator, LoLOPES) and reference_trainer.estimator.total_outer_steps == 6
    reference = reference_trainer.train()
    first = tiny(tmp_path / "resumed")
    first.train(stop_after=3)
    assert int(first.estimator_state["lolo_buffer/count"].sum()) > 0
    del first
    second = tiny(tmp_path / "resumed")
    assert second.step == 3 and int(second.estimator_state["lolo_buffer/count"].sum()) > 0
    result = second.train()
    assert result.meta_losses == reference.meta_losses
    for name, value in reference.theta.items():
        assert torch.equal(result.theta[name], value), name


@pytest.mark.parametrize("rule", ["small_fc_lopt", "celo"])
def test_lolo_resume_is_bit_identical(tmp_path: Path, rule: str) -> None:
    """Issue 19, hole 5: configs/lolo_small_fc.yaml (small_fc_lopt, buffer, behaviour cloning) stopped at
    step 4 and resumed matched an uninterrupted run only to ~1e-7. The cause: safetensors stores the
    estimator state's keys sorted, the estimator iterates its state in insertion order (parameters,
    hence the float sums over them), so a resumed run summed in another order. The checkpoint now
    records and restores the order. celo adds the scheduled rules' whole-model state ("@schedule")."""

    def run(run_dir: Path, resume: bool) -> MetaTrainer:
        return MetaTrainer(load_config(None, [
            f"output_dir={run_dir}", f"rule.name={rule}", "rule.config={}", "task.hidden_sizes=[8]",
            "task.batch_size=16", "estimator.name=pes", "estimator.num_tasks=2", "estimator.truncation_length=3",
            "estimator.min_unroll=4", "estimator.max_unroll=8", "estimator.compile=false", "log_with=[]",
            "num_threads=1", "outer_steps=10", "checkpoint_every=0",
            "lolo={buffer_size: 4, p_threshold: 0.5, behaviour_cloning: true, expert_lr: 1.0e-3}"]),
            resume=resume, progress=False)

    reference = run(tmp_path / "reference", False)
    reference.train()
    first = run(tmp_path / "resumed", False)
    first.train(stop_after=4)
    del first
    second = run(tmp_path / "resumed", True)
    assert second.step == 4 and int(second.estimator_state["lolo_buffer/count"].sum()) > 0
    second.train()
    assert second.history == reference.history  # meta-loss and grad-norm of every step, exactly
    for name, value in reference.theta.items():
        assert torch.equal(second.theta[name], value), (name, float((second.theta[name] - value).abs().max()))
