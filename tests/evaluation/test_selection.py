"""Checkpoint selection on validation tasks (``lopt_hf.evaluation.selection``) on hand-made reports."""

from __future__ import annotations

import math

import pytest

from lopt_hf.evaluation.selection import rank_checkpoints, ranking_markdown


def report(losses: dict[str, dict[str, float | None]]) -> dict:
    """``run_evaluation``-shaped results: task -> label -> final train loss."""
    return {"settings": {"steps": 200, "seeds": [0, 1], "optimizers": {}},
            "tasks": {task: {"optimizers": {label: {"final_train_loss": loss} for label, loss in by_label.items()}}
                      for task, by_label in losses.items()}}


def test_candidates_rank_by_the_geometric_mean_of_loss_over_the_baseline() -> None:
    results = report({"mlp": {"adamw:1e-3": 0.5, "a": 0.25, "b": 0.45, "c": 0.5},
                      "lm": {"adamw:1e-3": 2.0, "a": 4.0, "b": 1.8, "c": None}})
    ranked = rank_checkpoints(results, ["a", "b", "c"])
    # a: √(0.5·2) = 1 (halves the MLP, doubles the LM); b: √(0.9·0.9) = 0.9; c diverged on the LM
    assert [entry.label for entry in ranked] == ["b", "a", "c"]
    assert ranked[0].score == pytest.approx(0.9) and ranked[1].score == pytest.approx(1.0)
    assert math.isinf(ranked[2].score) and math.isinf(ranked[2].losses["lm"])
    assert ranked[0].ratios == {"mlp": pytest.approx(0.9), "lm": pytest.approx(0.9)}
    table = ranking_markdown(ranked)
    assert table.splitlines()[2].startswith("| b | 0.45 (0.900) | 1.8 (0.900) | 0.9000 |")
    assert "| c | 0.5 (1.000) | inf (inf) | inf |" in table


def test_missing_results_are_errors_that_name_them() -> None:
    results = report({"mlp": {"adamw:1e-3": 0.5, "a": 0.25}, "lm": {"a": 1.0}})
    with pytest.raises(ValueError, match="lm has no result for 'adamw:1e-3'"):
        rank_checkpoints(results, ["a"])
    with pytest.raises(ValueError, match="mlp has no result for 'b'"):
        rank_checkpoints(report({"mlp": {"adamw:1e-3": 0.5}}), ["b"])
    with pytest.raises(ValueError, match="baseline adamw:1e-3 has no positive final loss on mlp"):
        rank_checkpoints(report({"mlp": {"adamw:1e-3": None, "a": 0.25}}), ["a"])
    with pytest.raises(ValueError, match="no candidates"):
        rank_checkpoints(results, [])


def test_merge_reports_joins_runs_of_the_same_length_and_seeds() -> None:
    from lopt_hf.evaluation import merge_reports

    baseline = report({"mlp": {"adamw:1e-3": 0.5}, "lm": {"adamw:1e-3": 2.0}})
    baseline["settings"]["optimizers"] = {"adamw:1e-3": "adamw:1e-3"}
    candidate = report({"mlp": {"mine": 0.25}, "cnn": {"mine": 0.1}})
    candidate["settings"]["optimizers"] = {"mine": "mine=./mine"}
    merged = merge_reports([baseline, candidate])
    assert merged["settings"]["tasks"] == ["mlp", "lm", "cnn"]
    assert merged["settings"]["optimizers"] == {"adamw:1e-3": "adamw:1e-3", "mine": "mine=./mine"}
    assert set(merged["tasks"]["mlp"]["optimizers"]) == {"adamw:1e-3", "mine"}
    assert rank_checkpoints(merge_reports([baseline, report({"mlp": {"mine": 0.25}, "lm": {"mine": 1.0}})]),
                            ["mine"])[0].score == pytest.approx(0.5)
    longer = report({"mlp": {"mine": 0.2}})
    longer["settings"]["steps"] = 2000
    with pytest.raises(ValueError, match="reports differ in steps"):
        merge_reports([baseline, longer])
    other = report({"mlp": {"adamw:1e-3": 0.5}})
    baseline["tasks"]["mlp"]["optimizers"]["adamw:1e-3"]["spec"] = "adamw:1e-3"
    other["tasks"]["mlp"]["optimizers"]["adamw:1e-3"]["spec"] = "adamw:3e-3"
    with pytest.raises(ValueError, match="mlp: optimizer label 'adamw:1e-3' is 'adamw:1e-3' in one report and "
                                         "'adamw:3e-3'"):
        merge_reports([baseline, other])
