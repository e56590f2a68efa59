"""Meta-training checkpoints: atomic writes, keep-N, resume bit-for-bit, and a SIGKILL'ed run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lopt_hf.metatrain.checkpoint import (CheckpointData, CheckpointError, capture_rng_state, latest_checkpoint,
                                          list_checkpoints, load_checkpoint, restore_rng_state, save_checkpoint)
from lopt_hf.metatrain.config import load_config
from lopt_hf.metatrain.trainer import MetaTrainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_torch_thread")  # MetaTrainer(num_threads=1) changes it; restored


def tiny(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a real but tiny PES run (per_param_mlp on digits MLPs 64-8-10): ~20 ms per outer step."""
    return [f"output_dir={run_dir}", "rule.config.hidden_sizes=[8]", "task.hidden_sizes=[8]", "task.batch_size=16",
            "estimator.name=pes", "estimator.num_tasks=2", "estimator.truncation_length=3", "estimator.min_unroll=4",
            "estimator.max_unroll=8", "estimator.compile=false", "log_with=[]", "num_threads=1",
            "checkpoint_every=2", "keep_checkpoints=2", *extra]


def trainer_for(run_dir: Path, *extra: str, resume: bool = False) -> MetaTrainer:
    return MetaTrainer(load_config(None, tiny(run_dir, *extra)), resume=resume, progress=False)


# ------------------------------------------------------------------------------ storage


def test_checkpoint_round_trip_keeps_types_and_values(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    optimizer.step()
    rng = capture_rng_state()
    expected_draw = torch.rand(3)
    data = CheckpointData(step=7, theta={"w": param.detach()}, meta_optimizer=optimizer.state_dict(),
                          estimator_state={"step": torch.tensor([3, 4]), "params/w": torch.randn(2, 2, 5),
                                           "mask": torch.tensor([True, False])},
                          config={"name": "x"}, history={"meta_loss": [1.0, 0.5, float("nan")]}, elapsed_s=1.5,
                          rng=rng, extra={"skipped_updates": 1}, task_ids=[0, 1])
    path = save_checkpoint(tmp_path, data)
    assert path.name == "step-00000007" and latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(path, task_ids=[0, 1])
    assert loaded.step == 7 and loaded.elapsed_s == 1.5 and loaded.config == {"name": "x"}
    assert loaded.history["meta_loss"][:2] == [1.0, 0.5] and loaded.extra == {"skipped_updates": 1}
    assert torch.equal(loaded.theta["w"], param.detach())
    for key, value in data.estimator_state.items():
        assert torch.equal(loaded.estimator_state[key], value) and loaded.estimator_state[key].dtype == value.dtype
    # The AdamW state_dict comes back loadable, int keys included, and continues identically.
    other = torch.nn.Parameter(param.detach().clone())
    resumed = torch.optim.AdamW([other], lr=0.1)
    resumed.load_state_dict(loaded.meta_optimizer)
    for p in (param, other):
        p.grad = torch.full_like(p, 0.3)
    optimizer.step()
    resumed.step()
    assert torch.equal(param, other)
    restore_rng_state(loaded.rng)
    assert torch.equal(torch.rand(3), expected_draw)
    # Nothing is pickled: the folder holds safetensors and JSON only.
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}


def test_keep_n_and_half_written_checkpoints_are_ignored(tmp_path: Path) -> None:
    def data(step: int) -> CheckpointData:
        return CheckpointData(step=step, theta={"w": torch.full((2,), float(step))}, meta_optimizer={"state": {}},
                              estimator_state={}, config={}, history={})

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, data(step), keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    # What a kill during a save leaves behind: a temp folder, or a step folder without trainer_state.json.
    (tmp_path / ".tmp-step-00000008").mkdir()
    (tmp_path / ".tmp-step-00000008" / "theta.safetensors").write_bytes(b"partial")
    (tmp_path / "step-00000010").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000006"
    save_checkpoint(tmp_path, data(8), keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_on_a_different_process_count_re_splits_the_estimator_state(tmp_path: Path) -> None:
    """Rows are stored with their global task ids, so 2 processes' blocks can be read back by 1 or 3."""
    blocks = {0: [0, 1], 1: [2, 3]}
    states = {rank: {"x": torch.arange(4.0)[ids[0]:ids[-1] + 1].reshape(-1, 1) * 10} for rank, ids in blocks.items()}
    base = dict(step=2, theta={"w": torch.zeros(1)}, meta_optimizer={"state": {}}, config={}, history={},
                num_processes=2)
    barrier = threading.Barrier(2)  # two "processes" saving collectively, as in a 2-process run
    ranks = [threading.Thread(target=save_checkpoint, args=(tmp_path, CheckpointData(
        **base, estimator_state=states[rank], task_ids=blocks[rank])), kwargs={"rank": rank, "barrier": barrier.wait})
        for rank in (0, 1)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(timeout=30)
    assert sorted(p.name for p in (tmp_path / "step-00000002").iterdir()) == [
        "meta_optimizer.safetensors", "rank0.json", "rank0.safetensors", "rank1.json", "rank1.safetensors",
        "theta.safetensors", "trainer_state.json"]
    path = latest_checkpoint(tmp_path)
    assert path is not None
    whole = load_checkpoint(path, rank=0, num_processes=1, task_ids=[0, 1, 2, 3])
    assert whole.estimator_state["x"].flatten().tolist() == [0.0, 10.0, 20.0, 30.0]
    middle = load_checkpoint(path, rank=1, num_processes=3, task_ids=[1, 2])
    assert middle.estimator_state["x"].flatten().tolist() == [10.0, 20.0]
    with pytest.raises(CheckpointError, match="no saved estimator state for task ids"):
        load_checkpoint(path, rank=0, num_processes=1, task_ids=[0, 1, 2, 3, 4])


# ------------------------------------------------------------------------------ resume


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    reference = trainer_for(tmp_path / "reference", "outer_steps=6").train()

    first = trainer_for(tmp_path / "resumed", "outer_steps=6")
    first.train(stop_after=3)  # saves step 2 (periodic) and step 3 (end of this call)
    assert [step for step, _ in list_checkpoints(first.checkpoint_root)] == [2, 3]
    del first
    second = trainer_for(tmp_path / "resumed", "outer_steps=6", resume=True)
    assert second.step == 3
    result = second.train()
    assert result.final_step == 6
    assert result.meta_losses == reference.meta_losses
    for name, value in reference.theta.items():
        assert torch.equal(result.theta[name], value), name


def test_resume_guards(tmp_path: Path) -> None:
    trainer_for(tmp_path, "outer_steps=2").train()
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass --resume"):
        trainer_for(tmp_path, "outer_steps=2")
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in \['estimator'\]"):
        trainer_for(tmp_path, "outer_steps=4", "estimator.std=0.02", resume=True)
    # outer_steps (like logging and card settings) may change: extend a finished run.
    extended = trainer_for(tmp_path, "outer_steps=4", resume=True)
    assert extended.step == 2 and extended.train().final_step == 4


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """A real process killed with SIGKILL loses at most checkpoint_every steps and then continues exactly."""
    steps, every = 150, 5
    run_dir = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "scripts" / "metatrain.py"), "--no-progress", "--no-export",
               *[arg for override in tiny(run_dir, f"outer_steps={steps}", f"checkpoint_every={every}")
                 for arg in ("--set", override)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            found = latest_checkpoint(run_dir / "checkpoints")
            if found is not None and json.loads((found / "trainer_state.json").read_text())["step"] >= 3 * every:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    saved = [step for step, _ in list_checkpoints(run_dir / "checkpoints")]
    assert saved and saved[-1] < steps and all(step % every == 0 for step in saved)
    resumed = trainer_for(run_dir, f"outer_steps={steps}", f"checkpoint_every={every}", resume=True)
    assert resumed.step == saved[-1]  # at most `every` steps of work were lost
    result = resumed.train()

    reference = trainer_for(tmp_path / "reference", f"outer_steps={steps}", f"checkpoint_every={every}").train()
    assert result.meta_losses == reference.meta_losses
    for name, value in reference.theta.items():
        assert torch.equal(result.theta[name], value), name
