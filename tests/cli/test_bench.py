"""`lopt-hf bench`: every rule's step against AdamW and against its arithmetic floor, measured in one run."""

from __future__ import annotations

import json

from lopt_hf.bench import run_benchmark
from lopt_hf.cli import main
from lopt_hf.rules import build_rule


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


def test_cli_prints_the_floor_and_writes_it_to_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--rules", "per_param_mlp", "--layers", "8,4", "--warmup", "1", "--repeats", "1",
                 "--no-memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sgemm" in printed and "× floor" in printed
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert rows["per_param_mlp"]["floor_ms"] > 0 and rows["adamw"]["floor_ms"] is None
