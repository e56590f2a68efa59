"""``LearnedOptimizer`` runs scheduled rules (Celo, Celo-Adam): the whole-model phase, exact resume, skips."""

from __future__ import annotations

import io

import pytest
import torch

from lopt_hf import LearnedOptimizer
from lopt_hf.layout import AS_IS
from lopt_hf.optim import SCHEDULE_KEY
from lopt_hf.rules import build_rule
from support import NUM_STEPS, PARAM_NAMES, load_refvectors, subtree


def reference_optimizer(stem: str, rule_name: str) -> tuple[LearnedOptimizer, dict[str, torch.nn.Parameter], dict]:
    arrays = load_refvectors(stem)
    params = {name: torch.nn.Parameter(arrays[f"init_params/{name}"].clone()) for name in PARAM_NAMES}
    # the reference tensors are in JAX layout already: hand them to the rule as they are
    optimizer = LearnedOptimizer(list(params.values()), build_rule(rule_name), subtree(arrays, "theta"), chunk_size=None,
                                 param_layouts={param: AS_IS for param in params.values()})
    optimizer.set_total_steps(10)  # the reference's num_steps
    return optimizer, params, arrays


def set_step_inputs(params: dict[str, torch.nn.Parameter], arrays: dict, k: int) -> None:
    for name, param in params.items():
        param.data.copy_(arrays[f"step{k}/params/{name}"])
        param.grad = arrays[f"step{k}/grads/{name}"].clone()


@pytest.mark.parametrize("stem, rule_name", [("celo_published", "celo"), ("celo_adam_published", "celo_adam")])
def test_learned_optimizer_reproduces_reference_vectors(stem: str, rule_name: str) -> None:
    optimizer, params, arrays = reference_optimizer(stem, rule_name)
    for k in range(NUM_STEPS):
        set_step_inputs(params, arrays, k)
        before = {name: param.detach().clone() for name, param in params.items()}
        optimizer.step(loss=arrays[f"step{k}/loss"])
        for name, param in params.items():
            implied = arrays[f"step{k}/params/{name}"] - arrays[f"step{k}/params_out/{name}"]
            torch.testing.assert_close(before[name] - param.detach(), implied, rtol=1e-4, atol=1e-7,
                                       msg=f"step {k} {name}")
        assert float(optimizer.state[SCHEDULE_KEY]["iteration"]) == k + 1


def test_resume_from_state_dict_is_exact() -> None:
    optimizer, params, arrays = reference_optimizer("celo_published", "celo")
    for k in range(3):
        set_step_inputs(params, arrays, k)
        optimizer.step(loss=arrays[f"step{k}/loss"])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed, resumed_params, _ = reference_optimizer("celo_published", "celo")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # how transformers.Trainer reloads
    for k in range(3, NUM_STEPS):
        for opt, ps in ((optimizer, params), (resumed, resumed_params)):
            set_step_inputs(ps, arrays, k)
            opt.step(loss=arrays[f"step{k}/loss"])
        for name in PARAM_NAMES:
            assert torch.equal(params[name], resumed_params[name]), (k, name)
    for name in PARAM_NAMES:
        for key, value in optimizer.state[params[name]].items():
            other = resumed.state[resumed_params[name]][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (name, key)


def test_without_planned_steps_or_loss_the_error_says_what_to_do() -> None:
    rule = build_rule("celo")
    param = torch.nn.Parameter(torch.randn(4, 3))
    param.grad = torch.randn(4, 3)
    optimizer = LearnedOptimizer([param], rule, rule.init_theta(torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="set_total_steps"):
        optimizer.step(loss=1.0)
    optimizer.set_total_steps(100)
    with pytest.raises(RuntimeError, match="needs the training loss.*LearnedOptimizerCallback"):
        optimizer.step()
    before = param.detach().clone()
    optimizer.step(loss=1.0)
    assert not torch.equal(before, param)


def test_a_non_finite_gradient_skips_its_tensor_and_keeps_its_scheduler_rows() -> None:
    rule = build_rule("celo")
    generator = torch.Generator().manual_seed(1)
    good, bad = torch.nn.Parameter(torch.randn(5, 4, generator=generator)), torch.nn.Parameter(torch.randn(6))
    optimizer = LearnedOptimizer([good, bad], rule, rule.init_theta(generator))
    optimizer.set_total_steps(20)
    good.grad, bad.grad = torch.randn(5, 4, generator=generator), torch.randn(6, generator=generator)
    optimizer.step(loss=2.0)
    rows = {key: optimizer.state[bad][key].clone() for key in rule.schedule_tensor_keys}
    bad_before, good_before = bad.detach().clone(), good.detach().clone()
    bad.grad = torch.full((6,), float("nan"))
    good.grad = torch.randn(5, 4, generator=generator)
    optimizer.step(loss=1.9)
    assert torch.equal(bad, bad_before) and not torch.equal(good, good_before)
    assert optimizer.state[bad]["step"] == 1 and optimizer.state[good]["step"] == 2
    for key, value in rows.items():
        assert torch.equal(optimizer.state[bad][key], value)
    assert optimizer.num_skipped_nonfinite == 1
    assert float(optimizer.state[SCHEDULE_KEY]["iteration"]) == 2
    # a non-finite loss skips the whole learned step, scheduler included
    good.grad = torch.randn(5, 4, generator=generator)
    optimizer.step(loss=float("inf"))
    assert float(optimizer.state[SCHEDULE_KEY]["iteration"]) == 2


def test_scheduler_spans_param_groups_and_bf16() -> None:
    """One whole-model phase across learned groups (each with its own lr), AdamW-routed groups apart;
    bf16 parameters keep float32 state."""
    rule = build_rule("celo")
    generator = torch.Generator().manual_seed(2)
    first = torch.nn.Parameter(torch.randn(8, 4, generator=generator).to(torch.bfloat16))
    second = torch.nn.Parameter(torch.randn(4, generator=generator))
    bias = torch.nn.Parameter(torch.randn(3, generator=generator))
    optimizer = LearnedOptimizer([{"params": [first]}, {"params": [second], "lr": 0.5},
                                  {"params": [bias], "route": "adamw", "lr": 1e-3}],
                                 rule, rule.init_theta(generator))
    optimizer.set_total_steps(5)
    for _ in range(3):
        for param in (first, second, bias):
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step(loss=1.0)
    assert optimizer.state[first]["momentum"].dtype == torch.float32
    assert optimizer.state[first]["lstm_hidden"].shape == (rule.lstm_hidden_size,)
    assert "lstm_hidden" not in optimizer.state[bias]
    assert float(optimizer.state[SCHEDULE_KEY]["iteration"]) == 3
    assert all(torch.isfinite(param.float()).all() for param in (first, second, bias))
