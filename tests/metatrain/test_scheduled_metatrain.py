"""Scheduled rules (celo, celo_adam, velo) in the meta-trainer: the vectorised step is the rule's own
composition per member (and LearnedOptimizer's step), PES meta-trains them end to end from the
shipped configs, the whole-model state rides through resets / LoLO / checkpoints, and ``rule.init_from``
starts from an artifact's theta (fine-tuning published weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lopt_hf.hub import create_artifact
from lopt_hf.metatrain.checkpoint import list_checkpoints
from lopt_hf.metatrain.config import ConfigError, load_config
from lopt_hf.metatrain.estimators import build_estimator
from lopt_hf.metatrain.lolo import LoLOPES
from lopt_hf.metatrain.tasks import MLPImageTaskFamily
from lopt_hf.metatrain.trainer import MetaTrainer, initial_theta
from lopt_hf.rules.features import skinny_matmul
from lopt_hf.metatrain.unroll import SCHEDULE_STATE, VectorizedInnerTrainer, run_unroll
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules import build_rule

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = 4
STEPS = 3
TOTAL_STEPS = [5, 7, 9, 40]  # per member: the fraction features differ between members
# Small sizes: a meta-training smoke test, not the published architectures.
RULES = {"celo": {}, "celo_adam": {"lstm_hidden_size": 8},
         "celo_adam+tensor_features": {"lstm_hidden_size": 8, "tensor_features": True},
         "velo": {"lstm_hidden_size": 8, "param_inits": 4, "ff_mult": 1.0}}
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def family() -> MLPImageTaskFamily:
    return MLPImageTaskFamily(hidden_sizes=(8,), batch_size=6, param_scale_range=(0.5, 2.0))


def perturbed_theta(rule, members: int | None, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random theta moved off its init (non-zero LSTM start, biases), one copy per member or shared."""
    generator = torch.Generator().manual_seed(seed)
    theta = rule.init_theta(generator)
    shape = () if members is None else (members,)
    return {key: value + 0.1 * torch.randn((*shape, *value.shape), generator=generator)
            for key, value in theta.items()}


def make_problems(family, trainer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tasks = [family.sample_task(generator) for _ in range(MEMBERS)]
    params = [family.init_params(task, generator) for task in tasks]
    batches = [family.sample_batches(task, generator, STEPS) for task in tasks]
    batch = {key: torch.stack([item[key] for item in batches], dim=1) for key in batches[0]}  # (T, M, ...)
    return trainer.init_problems(tasks, params, TOTAL_STEPS), batch


def rule_by_hand(rule, theta, family, task, params, batches, total_steps: int):
    """One problem trained by the rule's own functions — tensor_summary → schedule → update(control=…),
    as ``tests/support.py::scheduled_refvector_steps`` composes them — with autograd gradients."""
    names = list(params)
    states = {name: rule.init_state(value) for name, value in params.items()}
    schedule_state = rule.init_schedule_state(total_steps)
    losses = []
    for t in range(STEPS):
        leaves = {key: value.detach().requires_grad_() for key, value in params.items()}
        loss = family.loss(leaves, task, {key: value[t] for key, value in batches.items()})
        grads = dict(zip(names, torch.autograd.grad(loss, list(leaves.values()))))
        losses.append(loss.detach())
        with torch.no_grad():
            summaries = torch.stack([rule.tensor_summary(params[n], grads[n], states[n]) for n in names])
            rows = {key: torch.stack([states[n][key] for n in names]) for key in rule.schedule_tensor_keys}
            controls, schedule_state, rows = rule.schedule(theta, schedule_state, rows, summaries,
                                                           torch.full((len(names),), t), loss.detach())
            for index, name in enumerate(names):
                step, new_state = rule.update(theta, params[name], grads[name], states[name], t,
                                              control=controls[index])
                states[name] = {**states[name], **new_state, **{key: value[index] for key, value in rows.items()}}
                params = {**params, name: params[name] - step}
    return torch.stack(losses), params, states, schedule_state


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("theta_batched", [True, False])
def test_vectorized_step_is_the_rule_composed_per_member(family, rule_name: str, theta_batched: bool) -> None:
    rule = build_rule(rule_name.split("+")[0], **RULES[rule_name])
    trainer = VectorizedInnerTrainer(family, rule, compile=False)
    problems, batch = make_problems(family, trainer)
    theta = perturbed_theta(rule, MEMBERS if theta_batched else None)
    assert set(problems.opt_state) == {*problems.params, SCHEDULE_STATE}
    assert problems.opt_state[SCHEDULE_STATE]["num_steps"].tolist() == TOTAL_STEPS
    with torch.no_grad():
        losses, final = run_unroll(trainer, theta, problems, lambda t: {k: v[t] for k, v in batch.items()}, STEPS)
    for member in range(MEMBERS):
        own = {key: value[member] for key, value in theta.items()} if theta_batched else theta
        expected_losses, params, states, schedule_state = rule_by_hand(
            rule, own, family, {key: value[member] for key, value in problems.task.items()},
            {key: value[member] for key, value in problems.params.items()},
            {key: value[:, member] for key, value in batch.items()}, TOTAL_STEPS[member])
        torch.testing.assert_close(losses[:, member], expected_losses, rtol=1e-5, atol=1e-6)
        for name, value in params.items():
            assert not torch.equal(value, problems.params[name][member]), name  # the rule did move it
            torch.testing.assert_close(final.params[name][member], value, rtol=1e-5, atol=1e-7)
            assert set(final.opt_state[name]) == set(states[name])
            for key, entry in states[name].items():
                torch.testing.assert_close(final.opt_state[name][key][member], entry, rtol=1e-5, atol=1e-6)
        for key, entry in schedule_state.items():
            torch.testing.assert_close(final.opt_state[SCHEDULE_STATE][key][member], entry, rtol=1e-5, atol=1e-6)
    assert final.opt_state[SCHEDULE_STATE]["iteration"].tolist() == [float(STEPS)] * MEMBERS


MEMBER_RULES = {"celo": ("celo", {}), "celo+constant": ("celo", {"lr_schedule": "constant"}),
                "celo_adam+tensor_features": ("celo_adam", {"tensor_features": True}),
                "celo_adam+orthogonalize+warmup_cosine": ("celo_adam", {"tensor_features": True, "orthogonalize": True,
                                                                        "lr_schedule": "warmup_cosine"})}


@pytest.mark.parametrize("rule_name", list(MEMBER_RULES))
def test_a_member_steps_like_learned_optimizer(family, rule_name: str) -> None:
    """The meta-trainer's step is the deployed optimizer's: LearnedOptimizer, tensors as they are (celo, also under
    Celo's phase-1 constant schedule; Celo-Adam with per-tensor scheduler inputs, the shipped default's rule, and
    with Newton–Schulz for matrices under warmup + cosine)."""
    name, options = MEMBER_RULES[rule_name]
    rule = build_rule(name, **options)
    trainer = VectorizedInnerTrainer(family, rule, compile=False)
    problems, batch = make_problems(family, trainer)
    theta = perturbed_theta(rule, None)
    with torch.no_grad():
        _, final = run_unroll(trainer, theta, problems, lambda t: {k: v[t] for k, v in batch.items()}, STEPS)
    member = 2
    task = {key: value[member] for key, value in problems.task.items()}
    params = {key: torch.nn.Parameter(value[member].clone()) for key, value in problems.params.items()}
    optimizer = LearnedOptimizer(list(params.values()), rule, theta, param_layouts={p: "as_is" for p in params.values()})
    optimizer.set_total_steps(TOTAL_STEPS[member])
    for t in range(STEPS):
        optimizer.zero_grad()
        loss = family.loss(params, task, {key: value[t, member] for key, value in batch.items()})
        loss.backward()
        optimizer.step(loss=loss.detach())
    for name, param in params.items():
        torch.testing.assert_close(final.params[name][member], param.detach(), rtol=1e-5, atol=1e-7)


def test_scheduled_rules_need_the_planned_steps(family) -> None:
    trainer = VectorizedInnerTrainer(family, build_rule("celo_adam", lstm_hidden_size=8), compile=False)
    params = {key: torch.zeros((2, *shape)) for key, shape in family.param_shapes.items()}
    with pytest.raises(ValueError, match="total_steps"):
        trainer.init_opt_state(params)
    with pytest.raises(ValueError, match="scheduled"):
        trainer.member_update(False, torch.zeros(2))
    # other rules ignore it: their state is exactly what it was
    plain = VectorizedInnerTrainer(family, build_rule("per_param_mlp"), compile=False)
    assert set(plain.init_opt_state(params, [3, 4])) == set(params)


def test_an_empty_matmul_is_left_to_aten() -> None:
    # Celo's scheduler has no per-tensor summaries: K = 0 products must not become broadcasts.
    assert skinny_matmul(torch.zeros(3, 0), torch.zeros(0, 4)) is NotImplemented


# ---------------------------------------------------------------------------- meta-training
def tiny(config: str, run_dir: Path, *extra: str) -> list[str]:
    """Overrides shrinking a shipped config to a few-second PES run on digits MLPs 64-8-10."""
    return [f"output_dir={run_dir}", "rule.init_from=null", "task.dataset=digits", "task.hidden_sizes=[8]",
            "task.batch_size=16", "estimator.num_tasks=2", "estimator.truncation_length=3", "estimator.min_unroll=4",
            "estimator.max_unroll=6", "estimator.compile=false", "log_with=[]", "num_threads=1",
            "checkpoint_every=2", "keep_checkpoints=2", "meta_optimizer.lr=0.01", "evaluation.steps=0", *extra]


def trainer_for(config: str, run_dir: Path, *extra: str, resume: bool = False) -> MetaTrainer:
    return MetaTrainer(load_config(ROOT / "configs" / config, tiny(config, run_dir, *extra)), resume=resume,
                       progress=False)


@pytest.mark.parametrize("config, rule_config", [
    ("celo.yaml", []),
    ("velo_s.yaml", ["rule.config.lstm_hidden_size=8", "rule.config.param_inits=4"]),
])
def test_pes_meta_trains_from_the_shipped_config_and_resumes_bit_for_bit(tmp_path: Path, config: str,
                                                                         rule_config: list[str]) -> None:
    reference = trainer_for(config, tmp_path / "reference", "outer_steps=4", *rule_config)
    start = {key: value.clone() for key, value in reference.theta.items()}
    result = reference.train()
    assert len(result.meta_losses) == 4 and all(torch.isfinite(torch.tensor(result.meta_losses)))
    state = reference.estimator_state
    # the whole-model state rode along every member (resets included: trajectories are 4-6 steps)
    assert {"opt_state/@schedule/iteration", "opt_state/@schedule/num_steps",
            "opt_state/@schedule/loss_means"} <= set(state)
    torch.testing.assert_close(state["opt_state/@schedule/iteration"],
                               state["step"].to(torch.float32).unsqueeze(1).expand(-1, 2))
    assert torch.equal(state["opt_state/@schedule/num_steps"][:, 0], state["length"].to(torch.float32))
    # the meta-gradient reached the scheduler: its step-size read-out and LSTM start moved
    for key in ("rnn_params/step_size/w", "rnn_params/step_size/b", "lstm_init_state/hidden",
                "lstm_init_state/cell", "rnn_params/rnn/linear/w"):
        assert not torch.equal(result.theta[key], start[key]), key
    assert all(torch.isfinite(value).all() for value in result.theta.values())

    first = trainer_for(config, tmp_path / "resumed", "outer_steps=4", *rule_config)
    first.train(stop_after=3)
    assert [step for step, _ in list_checkpoints(first.checkpoint_root)] == [2, 3]
    resumed = trainer_for(config, tmp_path / "resumed", "outer_steps=4", *rule_config, resume=True)
    assert resumed.step == 3
    final = resumed.train()
    assert final.meta_losses == result.meta_losses
    for key, value in result.theta.items():
        assert torch.equal(final.theta[key], value), key


def test_lolo_replays_the_schedule_state(family) -> None:
    """LoLO's buffer and behaviour cloning (the mixed step goes through the trainer's rule_steps)."""
    rule = build_rule("celo_adam", lstm_hidden_size=8)
    estimator = LoLOPES(family, rule, lolo={"buffer_size": 2, "p_threshold": 0.0, "alpha": 0.5},
                        total_outer_steps=4, truncation_length=3, min_unroll=3, max_unroll=4, compile=False, seed=0)
    theta = {key: value.to(torch.float32) for key, value in perturbed_theta(rule, None).items()}
    state = estimator.init_state(theta, [0, 1], 0)
    buffer_starts = 0.0
    for outer_step in range(4):
        result = estimator.estimate(theta, state, [0, 1], outer_step)
        assert all(torch.isfinite(value).all() for value in result.grad_sum.values())
        buffer_starts += result.stats["buffer_starts"]
        state = result.new_state
    assert buffer_starts > 0  # trajectories resumed stored states, whole-model state included
    assert "lolo_buffer/opt_state/@schedule/iteration" in state
    counts = state["lolo_buffer/count"]
    for slot in range(2):
        for index in range(int(counts[slot])):  # a stored state's iteration is its step count
            assert float(state["lolo_buffer/opt_state/@schedule/iteration"][slot, index]) == \
                float(state["lolo_buffer/step"][slot, index])


def test_init_from_starts_from_an_artifacts_theta(tmp_path: Path) -> None:
    """Fine-tuning: rule.init_from names an artifact (e.g. the converted published Celo)."""
    artifact_dir = tmp_path / "celo_start"
    rule = build_rule("celo")
    theta = perturbed_theta(rule, None, seed=7)
    create_artifact("celo", theta=theta).save_pretrained(artifact_dir)
    config = load_config(ROOT / "configs" / "celo.yaml", tiny("celo.yaml", tmp_path / "run")
                         + [f"rule.init_from={artifact_dir}"])
    start = initial_theta(config)
    assert set(start) == set(theta) and all(torch.equal(start[key], theta[key]) for key in theta)
    trainer = MetaTrainer(config, progress=False)
    assert all(torch.equal(trainer.theta[key], theta[key]) for key in theta)
    trainer.train(stop_after=1)
    assert any(not torch.equal(trainer.theta[key], theta[key]) for key in theta)

    other = load_config(ROOT / "configs" / "celo.yaml", tiny("celo.yaml", tmp_path / "other")
                        + [f"rule.init_from={artifact_dir}", "rule.config.param_inits=2"])
    with pytest.raises(ConfigError, match="param_inits"):
        initial_theta(other)
    wrong = load_config(None, tiny("", tmp_path / "wrong") + [f"rule.init_from={artifact_dir}"])
    with pytest.raises(ConfigError, match="holds rule 'celo'"):
        initial_theta(wrong)
    with pytest.raises(ConfigError, match="init_from"):
        load_config(None, ['rule.init_from=""'])


def test_init_from_gives_published_celo_adam_per_tensor_inputs(tmp_path: Path) -> None:
    """``rule.config.tensor_features: true`` from a Celo-Adam artifact without them: the start is the artifact's
    theta with zero weights on the new scheduler inputs, and the meta-gradient reaches those weights."""
    artifact_dir = tmp_path / "celo_adam_start"
    theta = perturbed_theta(build_rule("celo_adam"), None, seed=3)
    create_artifact("celo_adam", theta=theta).save_pretrained(artifact_dir)
    overrides = tiny("", tmp_path / "run") + ["rule.name=celo_adam", f"rule.init_from={artifact_dir}",
                                              "rule.config.tensor_features=true", "outer_steps=2"]
    config = load_config(None, overrides)
    start = initial_theta(config)
    assert set(start) == set(theta)
    for key, value in theta.items():
        if key.startswith("rnn_params/linear") and key.endswith("/w"):
            assert torch.equal(start[key][:-8], value) and not start[key][-8:].any(), key
        else:
            assert torch.equal(start[key], value), key
    trainer = MetaTrainer(config, progress=False)
    trainer.train()
    assert trainer.theta["rnn_params/linear_2/w"][-8:].abs().sum() > 0
    # the other way round (dropping the inputs a theta was trained with) is refused
    widened_dir = tmp_path / "widened"
    widened = create_artifact("celo_adam", theta=trainer.theta, rule_config={"tensor_features": True})
    widened.save_pretrained(widened_dir)
    with pytest.raises(ConfigError, match="tensor_features: artifact True, config False"):
        initial_theta(load_config(None, tiny("", tmp_path / "back") + ["rule.name=celo_adam",
                                                                       f"rule.init_from={widened_dir}"]))


@pytest.mark.slow
def test_compiled_scheduled_step_equals_eager(family) -> None:
    """make_fx traces the whole-model phase; Inductor compiles it once (~1 min on 2 CPU cores)."""
    rule = build_rule("celo")
    eager = VectorizedInnerTrainer(family, rule, compile=False)
    compiled = VectorizedInnerTrainer(family, rule, compile=True)
    problems, batch = make_problems(family, eager)
    theta = perturbed_theta(rule, MEMBERS)
    with torch.no_grad():
        _, once_e = eager.step(theta, problems, {k: v[0] for k, v in batch.items()})
        _, twice_e = eager.step(theta, once_e, {k: v[1] for k, v in batch.items()})
        _, once_c = compiled.step(theta, problems, {k: v[0] for k, v in batch.items()})
        _, twice_c = compiled.step(theta, once_c, {k: v[1] for k, v in batch.items()})
    assert len(compiled._compiled) == 1 and all(len(graphs) == 1 for graphs in compiled._compiled.values())
    for name in twice_e.params:
        torch.testing.assert_close(twice_c.params[name], twice_e.params[name], rtol=1e-5, atol=1e-7)
    for key, value in twice_e.opt_state[SCHEDULE_STATE].items():
        torch.testing.assert_close(twice_c.opt_state[SCHEDULE_STATE][key], value)


def test_estimators_give_each_trajectory_its_own_length(family) -> None:
    """total_steps = the trajectory's drawn length, at the start and after every reset."""
    rule = build_rule("celo_adam", lstm_hidden_size=8)
    estimator = build_estimator("pes", family, rule, truncation_length=4, min_unroll=3, max_unroll=9, compile=False,
                                seed=1)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    state = estimator.init_state(theta, [0, 1, 2], 0)
    for outer_step in range(3):
        state = estimator.estimate(theta, state, [0, 1, 2], outer_step).new_state
        assert torch.equal(state["opt_state/@schedule/num_steps"],
                           state["length"].to(torch.float32).unsqueeze(1).expand(-1, 2))


@pytest.mark.parametrize("estimator_name", ["full_bptt", "truncated_bptt", "es", "truncated_es", "pes"])
def test_every_estimator_reaches_the_scheduler(family, estimator_name: str) -> None:
    """Autograd (BPTT) and perturbations (ES, PES) both give the scheduler's theta a gradient."""
    rule = build_rule("celo_adam", lstm_hidden_size=8)
    estimator = build_estimator(estimator_name, family, rule, truncation_length=3, min_unroll=4, max_unroll=6,
                                compile=False, seed=0)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    state = estimator.init_state(theta, [0, 1], 0)
    result = estimator.estimate(theta, state, [0, 1], 0)
    assert torch.isfinite(result.meta_loss_sum)
    for key in ("rnn_params/step_size/w", "lstm_init_state/hidden", "rnn_params/linear_2/w"):
        assert torch.isfinite(result.grad_sum[key]).all() and result.grad_sum[key].abs().sum() > 0, key
