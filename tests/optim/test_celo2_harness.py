"""Celo2 in PyTorch: layout mapping, the AdamW harness, and loading both variants with load_lopt."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from lopt_hf.bench import benchmark_names, make_mlp, make_optimizer
from lopt_hf.harness import HarnessError, adamw_parameter_names, resolve_harness
from lopt_hf.hub import load_artifact
from lopt_hf.layout import AS_IS, CONV, CONV_TRANSPOSE, LINEAR, from_rule_layout, infer_layouts, to_rule_layout
from lopt_hf.load import load_lopt
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules import build_rule

LR = 0.01


def mlp_and_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * (1e3 if step == 2 else 1e-2)  # step 2: clipped


def jax_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The same weights as a JAX model would hold them: dense (in, out), conv HWIO."""
    out = {}
    for name, param in model.named_parameters():
        if param.dim() == 2:
            out[name] = param.detach().t().contiguous()
        elif param.dim() == 4:
            out[name] = param.detach().permute(2, 3, 1, 0).contiguous()
        else:
            out[name] = param.detach().clone()
    return out


def jax_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        g = param.grad
        grads[name] = g.t().contiguous() if g.dim() == 2 else g.permute(2, 3, 1, 0).contiguous() if g.dim() == 4 else g
    return grads


# ------------------------------------------------------------------------------------ layout


def test_layout_maps_round_trip() -> None:
    weight = torch.randn(8, 4, 3, 5)
    for layout in (AS_IS, CONV, CONV_TRANSPOSE):
        assert torch.equal(from_rule_layout(to_rule_layout(weight, layout), layout), weight)
    assert to_rule_layout(weight, CONV).shape == (3, 5, 4, 8)  # OIHW -> HWIO
    assert to_rule_layout(weight, CONV_TRANSPOSE).shape == (3, 5, 8, 4)  # (in, out, H, W) -> HW in out
    matrix = torch.randn(3, 7)
    assert torch.equal(to_rule_layout(matrix, LINEAR), matrix.t())
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10), nn.Conv1d(2, 3, 5), nn.ConvTranspose2d(2, 3, 3),
                          nn.LayerNorm(4))
    model[1].weight = model[0].weight  # tied output layer: stays as the embedding
    layouts = infer_layouts(model)
    assert layouts[model[0].weight] == AS_IS and layouts[model[1].bias] == AS_IS
    assert layouts[model[2].weight] == CONV and layouts[model[3].weight] == CONV_TRANSPOSE
    assert layouts[model[4].weight] == AS_IS


def test_torch_model_and_jax_layout_give_identical_updates(celo2_folders) -> None:
    """celo2-base on a torch Linear/Conv model == the rule on the same weights in JAX layout."""
    model = mlp_and_conv()
    opt = load_lopt(celo2_folders["celo2-base"], model, lr=LR)
    artifact = load_artifact(celo2_folders["celo2-base"])
    rule, theta = artifact.rule, artifact.theta()
    params = jax_layout(model)
    states = {name: rule.init_state(p) for name, p in params.items()}
    for step in range(4):
        set_grads(model, step)
        grads = jax_grads(model)
        for name in params:
            update, states[name] = rule.update(theta, params[name], grads[name], states[name], step)
            params[name] = params[name] - LR * update
        opt.step()
        for name, value in jax_layout(model).items():
            torch.testing.assert_close(value, params[name], rtol=1e-5, atol=1e-7, msg=f"step {step}, {name}")

    # ... and the mapping matters: fed torch's OIHW conv layout as-is, the rule normalises over the
    # 3×3 spatial axes instead of (in, out) and gives another step. (For 2-D tensors Celo2 happens
    # to be transpose-equivariant: its normalisation covers the whole matrix and the factored
    # statistics pick axes by size.)
    other = mlp_and_conv()
    plain = LearnedOptimizer(other.parameters(), rule, theta, lr=LR,
                             param_layouts={p: AS_IS for p in other.parameters()})
    set_grads(other, 0)
    plain.step()
    reference = mlp_and_conv()
    ref_opt = load_lopt(celo2_folders["celo2-base"], reference, lr=LR)
    set_grads(reference, 0)
    ref_opt.step()
    assert not torch.allclose(other[0].weight, reference[0].weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(other[2].weight, reference[2].weight, rtol=1e-5, atol=1e-7)


def test_bare_parameter_list_defaults_to_torch_conventions(celo2_folders) -> None:
    artifact = load_artifact(celo2_folders["celo2-base"])
    from_model, from_list = mlp_and_conv(), mlp_and_conv()
    opts = [load_lopt(artifact, from_model, lr=LR), load_lopt(artifact, list(from_list.parameters()), lr=LR)]
    for model, opt in zip((from_model, from_list), opts):
        set_grads(model, 0)
        opt.step()
    for a, b in zip(from_model.parameters(), from_list.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- harness


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.up(self.embed(tokens)))))


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (4, 6), generator=gen)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 50), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return loss.item()


def test_celo2_routes_biases_norms_and_embeddings_to_adamw(celo2_folders) -> None:
    model = TinyLM()
    opt = load_lopt(celo2_folders["celo2"], model, lr=2e-3, weight_decay=0.1)
    learned = [g for g in opt.param_groups if g["route"] == "learned"]
    adamw = [g for g in opt.param_groups if g["route"] == "adamw"]
    assert len(learned) == 1 and len(adamw) == 1
    assert {id(p) for p in learned[0]["params"]} == {id(model.up.weight), id(model.head.weight)}
    assert len(adamw[0]["params"]) == 5  # embedding, 2 biases, norm weight and bias
    assert adamw[0]["lr"] == pytest.approx(2e-3 * 20) and learned[0]["lr"] == 2e-3
    assert adamw[0]["betas"] == (0.9, 0.95) and adamw[0]["eps"] == 1e-8
    assert adamw[0]["weight_decay"] == learned[0]["weight_decay"] == 0.1
    assert load_artifact(celo2_folders["celo2"]).rule.orthogonalize
    assert adamw_parameter_names(load_artifact(celo2_folders["celo2"]).config.harness, model) == [
        "embed.weight", "up.bias", "norm.weight", "norm.bias", "head.bias"]


def test_harness_steps_match_adamw_and_the_orthogonalised_rule(celo2_folders) -> None:
    model, twin = TinyLM(), TinyLM()
    opt = load_lopt(celo2_folders["celo2"], model, lr=2e-3, weight_decay=0.1)
    adamw_params = [p for name, p in twin.named_parameters() if name not in ("up.weight", "head.weight")]
    reference_adamw = torch.optim.AdamW(adamw_params, lr=2e-3 * 20, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    artifact = load_artifact(celo2_folders["celo2"])
    rule, theta = artifact.rule, artifact.theta()
    kernels = {name: getattr(twin, name.split(".")[0]).weight.detach().t().contiguous() for name in ("up", "head")}
    states = {name: rule.init_state(k) for name, k in kernels.items()}
    for step in range(3):
        lm_step(model, opt, seed=step)
        twin.zero_grad()
        lm_step(twin, reference_adamw, seed=step)  # AdamW steps the 1-D tensors; the 2-D weights below
        for name in kernels:
            weight = getattr(twin, name).weight
            grad = weight.grad.t().contiguous()
            update, states[name] = rule.update(theta, kernels[name], grad, states[name], step)
            kernels[name] = kernels[name] * (1 - 2e-3 * 0.1) - 2e-3 * update
            with torch.no_grad():
                weight.copy_(kernels[name].t())
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"step {step}, {name}")


def test_harness_overrides_at_load_time(celo2_folders) -> None:
    model = TinyLM()
    opt = load_lopt(celo2_folders["celo2"], model, harness={"embedding_patterns": [r"^up\.weight$"]})
    adamw = next(g for g in opt.param_groups if g["route"] == "adamw")
    assert any(p is model.up.weight for p in adamw["params"])
    everything = load_lopt(celo2_folders["celo2"], model, harness=None)
    assert [g["route"] for g in everything.param_groups] == ["learned"]
    with pytest.raises(HarnessError, match="no setting"):
        load_lopt(celo2_folders["celo2"], model, harness={"mult1d": 3})
    with pytest.raises(HarnessError, match="unknown harness type"):
        resolve_harness({"type": "lion"})
    with pytest.raises(HarnessError, match="adamw_betas"):
        resolve_harness({"type": "celo2", "adamw_betas": [0.9, 1.5]})
    with pytest.raises(HarnessError, match="regular expression"):
        resolve_harness({"type": "celo2", "embedding_patterns": ["(unclosed"]})


def test_scheduler_scales_both_groups_and_state_dict_resumes_exactly(celo2_folders, tmp_path: Path) -> None:
    model = TinyLM()
    opt = load_lopt(celo2_folders["celo2"], model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    lm_step(model, opt, 0)
    scheduler.step()
    lrs = {g["route"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"learned": 5e-4, "adamw": 1e-2})

    reference = TinyLM()
    reference_opt = load_lopt(celo2_folders["celo2"], reference, lr=1e-3)
    reference_losses = [lm_step(reference, reference_opt, seed) for seed in range(6)]

    first = TinyLM()
    first_opt = load_lopt(celo2_folders["celo2"], first, lr=1e-3)
    losses = [lm_step(first, first_opt, seed) for seed in range(3)]
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = TinyLM()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = load_lopt(celo2_folders["celo2"], resumed, lr=1e-3)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    losses += [lm_step(resumed, resumed_opt, seed) for seed in range(3, 6)]
    assert losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))


def test_adamw_route_skips_nonfinite_gradients(celo2_folders) -> None:
    model = TinyLM()
    opt = load_lopt(celo2_folders["celo2"], model)
    lm_step(model, opt, 0)
    before = model.up.bias.detach().clone()
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.up.bias.grad[0] = float("nan")
    opt.step()
    assert torch.equal(model.up.bias, before) and opt.num_skipped_nonfinite == 1


def test_bench_times_both_variants() -> None:
    names = benchmark_names()
    assert "celo2" in names and "celo2-base" in names
    for name, routes in (("celo2", {"learned", "adamw"}), ("celo2-base", {"learned"})):
        model = make_mlp([8, 16, 4])
        opt = make_optimizer(name, model)
        assert {g["route"] for g in opt.param_groups} == routes
        assert opt.rule.orthogonalize is (name == "celo2")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_plain_rule_build_is_celo2_base() -> None:
    assert build_rule("celo2").orthogonalize is False
