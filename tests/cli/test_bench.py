"""`lopt-hf bench`: every rule's step against AdamW and against its arithmetic floor, measured in one run."""

from __future__ import annotations

import json

import pytest
import torch

from lopt_hf.bench import run_benchmark, step_flops
from lopt_hf.cli import main
from lopt_hf.rules import build_rule
from lopt_hf.rules.celo2 import newton_schulz_flops


def test_floor_is_the_per_element_networks_flops_at_the_measured_sgemm_rate() -> None:
    layers = (16, 32, 4)
    results = {r.name: r for r in run_benchmark(["small_fc_lopt", "celo2-base", "opt2vec"], layers=layers, warmup=1,
                                                repeats=2, measure_memory=False)}
    gflops = results["adamw"].sgemm_gflops
    assert gflops and all(r.sgemm_gflops == gflops for r in results.values())
    numel = 16 * 32 + 32 + 32 * 4 + 4
    expected_ms = numel * build_rule("small_fc_lopt").per_element_flops() / (gflops * 1e9) * 1e3
    assert abs(results["small_fc_lopt"].floor_ms - expected_ms) <= 1e-9 * expected_ms
    assert results["small_fc_lopt"].ratio_to_floor == results["small_fc_lopt"].step_ms / expected_ms
    # no per-element network (AdamW, opt2vec's per-tensor MLP): no floor
    assert results["adamw"].floor_ms is None and results["opt2vec"].floor_ms is None
    assert results["celo2-base"].floor_ms > 0


def test_per_element_flops_count_the_published_architectures() -> None:
    assert build_rule("small_fc_lopt").per_element_flops() == 2 * (39 * 32 + 32 * 32 + 32 * 2)  # 39→32→32→2
    assert build_rule("celo2").per_element_flops() == 2 * (30 * 8 + 8 * 8 + 8 * 3)  # 30→8→8→3
    assert build_rule("celo").per_element_flops() == 2 * (30 * 4 + 4 * 4 + 4 * 3)  # 30→4→4→3
    assert build_rule("celo_adam").per_element_flops() is None


def test_newton_schulz_flops_count_the_three_products_of_every_iteration() -> None:
    # 5 iterations on a 4 x 10 matrix (wide): Gram 4x10·10x4, A·A 4x4·4x4, B·x 4x4·4x10, 2 FLOPs per multiply-add
    assert newton_schulz_flops(4, 10, 5) == 5 * 2 * (4 * 10 * 4 + 4 * 4 * 4 + 4 * 4 * 10)
    assert newton_schulz_flops(10, 4, 5) == newton_schulz_flops(4, 10, 5)  # tall matrices go through transposed


@pytest.mark.parametrize("name", ["celo2", "celo_adam"])
def test_the_floor_counts_newton_schulz_of_every_matrix(name: str) -> None:
    """Newton–Schulz rules: the floor is the per-element network (Celo2) plus one orthogonalisation per matrix
    (Celo2: per (in, out) slab of an HWIO conv kernel; Celo-Adam: the kernel as (out, in·k·k)); Adam alone has none."""
    from lopt_hf.layout import infer_layouts
    from lopt_hf.optim import LearnedOptimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    rule = build_rule(name, orthogonalize=True)
    layouts = infer_layouts(model)
    optimizer = LearnedOptimizer(model.parameters(), rule=rule, theta=rule.init_theta(), param_layouts=layouts)
    if name == "celo2":  # conv kernel HWIO (3, 3, 3, 8): 9 slabs of 3 x 8; Linear (in, out) = (8, 5)
        expected = rule.per_element_flops() * sum(p.numel() for p in model.parameters()) \
            + 9 * newton_schulz_flops(3, 8, 5) + newton_schulz_flops(8, 5, 5)
    else:  # not layout-sensitive: the conv kernel (8, 3, 3, 3) is 8 x 27 for orthogonalized; biases element-wise
        expected = newton_schulz_flops(8, 27, 5) + newton_schulz_flops(5, 8, 5)
    assert step_flops(optimizer) == expected
    plain = build_rule("celo_adam")
    assert step_flops(LearnedOptimizer(model.parameters(), rule=plain, theta=plain.init_theta(),
                                       param_layouts=layouts)) is None


def test_cli_prints_the_floor_and_writes_it_to_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--rules", "per_param_mlp", "--layers", "8,4", "--warmup", "1", "--repeats", "1",
                 "--no-memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sgemm" in printed and "× floor" in printed
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert rows["per_param_mlp"]["floor_ms"] > 0 and rows["adamw"]["floor_ms"] is None


def test_cli_times_the_compiled_rules_beside_the_eager_ones(tmp_path, capsys) -> None:
    """``--compile``: a row ``NAME+compile`` for each rule that compiles (celo_adam: its whole step; mlp_lopt: its
    first pass and its network by pieces), none for AdamW."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--rules", "celo_adam", "mlp_lopt", "--layers", "8,4", "--warmup", "1", "--repeats", "1",
                 "--no-memory", "--compile", "--json", str(out)]) == 0
    assert "celo_adam+compile" in capsys.readouterr().out
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert sorted(rows) == ["adamw", "celo_adam", "celo_adam+compile", "mlp_lopt", "mlp_lopt+compile"]
    assert rows["celo_adam+compile"]["step_ms"] > 0
