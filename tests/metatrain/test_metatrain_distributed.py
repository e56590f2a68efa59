"""2 processes (Accelerate, gloo on CPU) compute the same meta-gradients as 1 process with the same seeds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lopt_hf.metatrain.checkpoint import latest_checkpoint, load_checkpoint
from lopt_hf.metatrain.config import load_config
from lopt_hf.metatrain.trainer import MetaTrainer

pytestmark = pytest.mark.usefixtures("single_torch_thread")

STEPS = 3

# Runs STEPS outer steps and saves, from the main process, every step's all-reduced meta-gradient.
WORKER = '''
import sys
import torch
from safetensors.torch import save_file
from lopt_hf.metatrain.config import load_config
from lopt_hf.metatrain.trainer import MetaTrainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = MetaTrainer(load_config(None, overrides), progress=False)
record = {}
for index in range(STEPS):
    trainer.outer_step()
    record.update({f"{index}/{name}": grad for name, grad in trainer.last_meta_gradient.items()})
trainer.save_checkpoint()
record["meta_loss"] = torch.tensor(trainer.history["meta_loss"], dtype=torch.float64)
record["theta/" + "w0"] = trainer.theta["w0"].detach()
record["world_size"] = torch.tensor(trainer.world_size)
record["task_ids"] = torch.tensor(trainer.task_ids)
if trainer.is_main:
    save_file(record, out)
'''.replace("STEPS", str(STEPS))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def overrides(run_dir: Path) -> list[str]:
    # 4 task slots: process 0 owns ids 0-1, process 1 ids 2-3. Two antithetic pairs per slot.
    return [f"output_dir={run_dir}", "rule.config.hidden_sizes=[8]", "task.hidden_sizes=[8]", "task.batch_size=16",
            "task.reparam_scale_range=[0.5,2.0]", "estimator.name=pes", "estimator.num_tasks=4",
            "estimator.num_antithetic=2", "estimator.truncation_length=3", "estimator.min_unroll=3",
            "estimator.max_unroll=6", "estimator.compile=false", "log_with=[]", "num_threads=1", "checkpoint_every=0"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_meta_gradient(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    two_dir = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(worker), str(tmp_path / "two.safetensors"), *overrides(two_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    two = load_file(tmp_path / "two.safetensors")
    assert int(two["world_size"]) == 2 and two["task_ids"].tolist() == [0, 1]  # rank 0 owned a block

    one_trainer = MetaTrainer(load_config(None, overrides(tmp_path / "one")), progress=False)
    assert one_trainer.world_size == 1 and one_trainer.task_ids == [0, 1, 2, 3]
    for index in range(STEPS):
        one_trainer.outer_step()
        for name, grad in one_trainer.last_meta_gradient.items():
            assert grad.abs().max() > 0, name
            # Same seeds per (task id, outer step): equal up to the order the float sums are added in.
            torch.testing.assert_close(two[f"{index}/{name}"], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {index}, {name}: {m}")
    torch.testing.assert_close(two["meta_loss"], torch.tensor(one_trainer.history["meta_loss"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(two["theta/w0"], one_trainer.theta["w0"], rtol=1e-4, atol=1e-6)

    # Both processes wrote their block of the estimator state; a 1-process run can resume from it.
    checkpoint = latest_checkpoint(two_dir / "checkpoints")
    assert checkpoint is not None and {"rank0.safetensors", "rank1.safetensors"} <= {
        p.name for p in checkpoint.iterdir()}
    merged = load_checkpoint(checkpoint, rank=0, num_processes=1, task_ids=[0, 1, 2, 3])
    for key, value in one_trainer.estimator_state.items():
        assert merged.estimator_state[key].shape == value.shape, key
        torch.testing.assert_close(merged.estimator_state[key].double(), value.double(), rtol=1e-4, atol=1e-5)
    resumed = MetaTrainer(load_config(None, overrides(two_dir) + [f"outer_steps={STEPS + 1}"]), resume=True,
                          progress=False)
    assert resumed.step == STEPS and resumed.train().final_step == STEPS + 1
