"""The shipping bar of issue 15 (``lopt_hf.evaluation.bar``, ``scripts/check_bar.py``) on hand-made reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lopt_hf.evaluation.bar import check_bar, merge_results

ROOT = Path(__file__).resolve().parents[2]


def report(steps: int, losses: dict[str, dict[str, float]], seeds: tuple[int, ...] = (0, 1)) -> dict:
    return {"settings": {"steps": steps, "seeds": list(seeds)},
            "tasks": {task: {"optimizers": {label: {"final_train_loss": loss} for label, loss in row.items()}}
                      for task, row in losses.items()}}


BASE = {"a": {"adamw:1e-3": 0.52, "adamw-grid": 0.5, "celo-adam": 0.6},
        "b": {"adamw:1e-3": 2.0, "adamw-grid": 1.0, "celo-adam": 1.2},
        "c": {"adamw:1e-3": 3.0, "adamw-grid": 2.0, "celo-adam": 2.05}}


def with_candidate(a: float, b: float, c: float) -> list[dict]:
    return [report(200, BASE), report(200, {"a": {"mine": a}, "b": {"mine": b}, "c": {"mine": c}})]


def test_a_candidate_near_tuned_adamw_everywhere_passes() -> None:
    verdict = check_bar(with_candidate(0.51, 1.04, 2.2), "mine")
    assert verdict.beats_adamw_everywhere and verdict.near_tuned_share == pytest.approx(2 / 3)
    own, reference = verdict.mean_normalised(), verdict.mean_normalised(of_reference=True)
    assert own[0] == pytest.approx((0.51 / 0.5 + 1.04 + 2.2 / 2) / 3)
    assert reference[0] == pytest.approx((1.2 + 1.2 + 1.025) / 3)
    assert verdict.beats_reference and verdict.passed


@pytest.mark.parametrize("losses, failing", [
    ((0.53, 1.04, 2.1), "beats_adamw_everywhere"),  # loses to AdamW 1e-3 on task a only
    ((0.515, 1.1, 2.2), "near_tuned"),  # within 5% of tuned AdamW on 1 of 3 only
    ((0.5, 1.0, 2.98), "beats_reference"),  # tuned AdamW's loss on two tasks, but far off it on the third
])
def test_each_condition_can_fail_on_its_own(losses: tuple[float, float, float], failing: str) -> None:
    verdict = check_bar(with_candidate(*losses), "mine")
    assert not verdict.passed
    if failing == "beats_adamw_everywhere":
        assert not verdict.beats_adamw_everywhere and verdict.beats_reference
    elif failing == "near_tuned":
        assert verdict.near_tuned_share == pytest.approx(1 / 3) and verdict.beats_adamw_everywhere
    else:
        assert verdict.near_tuned_share >= 2 / 3 and verdict.beats_adamw_everywhere and not verdict.beats_reference


def test_holes_and_mismatched_seeds_are_errors() -> None:
    with pytest.raises(ValueError, match=r"b at 200 steps has no result for \['mine'\]"):
        check_bar([report(200, BASE), report(200, {"a": {"mine": 0.5}})], "mine")
    with pytest.raises(ValueError, match="ran different seeds"):
        merge_results([report(200, BASE), report(200, {"a": {"mine": 0.5}}, seeds=(0,))])
    with pytest.raises(ValueError, match="adamw-grid on a at 200 steps differs"):
        merge_results([report(200, BASE), report(200, {"a": {"adamw-grid": 0.4}})])


def test_the_script_prints_the_verdict_and_exits_by_it(tmp_path: Path) -> None:
    paths = []
    for index, data in enumerate(with_candidate(0.51, 1.04, 2.2) + [report(2000, {
            "a": {"adamw:1e-3": 0.1, "adamw-grid": 0.05, "celo-adam": 0.04, "mine": 0.2}})]):
        paths.append(tmp_path / f"r{index}" / "results.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(data))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bar.py"), *map(str, paths[:2]),
                          "--candidate", "mine", "--out", str(tmp_path / "bar.md")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "**Meets the bar.**" in run.stdout and (tmp_path / "bar.md").read_text().strip() == run.stdout.strip()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bar.py"), *map(str, [p.parent for p in paths]),
                          "--candidate", "mine"], capture_output=True, text=True)
    assert run.returncode == 1 and "| a | 2000 | 0.2 | 0.04 | 0.1 | 0.05 |" in run.stdout
    assert "1. beats AdamW 1e-3 on every task and length: no (3 of 4)" in run.stdout


def test_several_candidates_make_one_comparison_table(tmp_path: Path) -> None:
    """An ablation: one column per candidate on the same cells, its counts, means and verdict; exit 1 unless all pass."""
    from lopt_hf.evaluation.bar import comparison_markdown

    reports = with_candidate(0.51, 1.04, 2.2) + [report(200, {"a": {"other": 0.6}, "b": {"other": 0.9},
                                                               "c": {"other": 1.9}})]
    text = comparison_markdown([check_bar(reports, "mine"), check_bar(reports, "other")])
    assert "| task | steps | AdamW 1e-3 | tuned AdamW | mine | other |" in text
    assert "| a | 200 | 0.52 | 0.5 | 0.51 (1.02) | 0.6 (1.20) |" in text
    assert "| **beats AdamW 1e-3** | | | | 3 of 3 | 2 of 3 |" in text
    assert "| **meets the bar (reference celo-adam)** | | | | yes | no |" in text
    longer = report(2000, {"a": {"adamw:1e-3": 0.1, "adamw-grid": 0.05, "celo-adam": 0.04, "mine": 0.2}})
    with pytest.raises(ValueError, match="mine was checked on other cells than other"):
        comparison_markdown([check_bar(reports, "other"), check_bar(reports + [longer], "mine")])
    paths = []
    for index, data in enumerate(reports):
        paths.append(tmp_path / f"r{index}.json")
        paths[-1].write_text(json.dumps(data))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bar.py"), *map(str, paths),
                          "--candidate", "mine", "other"], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout.strip() == text


def test_tasks_limit_the_bar_to_cells_every_candidate_has() -> None:
    """A candidate evaluated on more tasks than the others is compared on the shared ones (``tasks=``)."""
    reports = with_candidate(0.51, 1.04, 2.2) + [report(200, {"d": {"adamw:1e-3": 1.0, "adamw-grid": 0.9,
                                                                     "celo-adam": 0.8}})]
    with pytest.raises(ValueError, match=r"d at 200 steps has no result for \['mine'\]"):
        check_bar(reports, "mine")
    verdict = check_bar(reports, "mine", tasks=["a", "b", "c"])
    assert [row.task for row in verdict.rows] == ["a", "b", "c"] and verdict.passed
    assert [row.task for row in check_bar(reports, "mine", tasks=["b"]).rows] == ["b"]
    with pytest.raises(ValueError, match=r"no results to check for the tasks \['e'\]"):
        check_bar(reports, "mine", tasks=["e"])
