"""Damaged meta-training checkpoints (issue 19, hole 6): every kind of damage is one line naming the file,
``--resume`` falls back to the newest intact checkpoint, a non-finite theta is refused, pruning survives
a SIGKILL, and SIGINT / SIGTERM checkpoint at the end of the outer step and print the resume command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopt_hf.metatrain.checkpoint import (CheckpointData, CheckpointError, latest_checkpoint, list_checkpoints,
                                          save_checkpoint, verify_checkpoint)
from lopt_hf.metatrain.config import load_config
from lopt_hf.metatrain.interrupt import resume_command
from lopt_hf.metatrain.trainer import MetaTrainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny(run_dir: Path, *extra: str) -> list[str]:
    """A real but tiny PES run (per_param_mlp on digits MLPs 64-8-10), checkpoints at steps 2 and 4."""
    return [f"output_dir={run_dir}", "rule.config.hidden_sizes=[8]", "task.hidden_sizes=[8]", "task.batch_size=16",
            "estimator.name=pes", "estimator.num_tasks=2", "estimator.truncation_length=3", "estimator.min_unroll=4",
            "estimator.max_unroll=8", "estimator.compile=false", "log_with=[]", "num_threads=1", "outer_steps=4",
            "checkpoint_every=2", "keep_checkpoints=2", *extra]


def trainer_for(run_dir: Path, *extra: str, resume: bool | str | Path = False) -> MetaTrainer:
    return MetaTrainer(load_config(None, tiny(run_dir, *extra)), resume=resume, progress=False)


def rewrite_state(folder: Path, change: Callable[[dict], None]) -> None:
    file = folder / "trainer_state.json"
    state = json.loads(file.read_text())
    change(state)
    file.write_text(json.dumps(state))


def record(folder: Path, name: str) -> None:
    """Re-record a file's size and sha256: damage a real process could have written consistently."""
    import hashlib

    data = (folder / name).read_bytes()
    rewrite_state(folder, lambda state: state["files"].__setitem__(
        name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x40
    file.write_bytes(bytes(data))


def nan_in(folder: Path, file: str = "theta.safetensors") -> None:
    """A NaN in the first floating tensor of ``file``, its checksum re-recorded (a diverged run's save)."""
    tensors = load_file(folder / file)
    name = sorted(key for key, value in tensors.items() if value.is_floating_point())[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, folder / file, metadata={"format": "pt"})
    record(folder, file)


def drop_estimator_key(folder: Path) -> None:
    tensors = load_file(folder / "rank0.safetensors")
    del tensors[sorted(name for name in tensors if name.startswith("estimator/"))[0]]
    save_file(tensors, folder / "rank0.safetensors", metadata={"format": "pt"})
    record(folder, "rank0.safetensors")


def truncate_history(state: dict) -> None:
    for values in state["history"].values():
        values.pop()


# kind → (damage, the file the message must name)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated theta": (lambda folder: truncate(folder / "theta.safetensors"), "theta.safetensors"),
    "garbage safetensors header": (
        lambda folder: (folder / "meta_optimizer.safetensors").write_bytes(b"\xff" * 64), "meta_optimizer.safetensors"),
    "flipped data byte": (lambda folder: flip_last_byte(folder / "rank0.safetensors"), "rank0.safetensors"),
    "missing rank file": (lambda folder: (folder / "rank0.safetensors").unlink(), "rank0.safetensors"),
    "missing theta": (lambda folder: (folder / "theta.safetensors").unlink(), "theta.safetensors"),
    "bad trainer_state JSON": (lambda folder: truncate(folder / "trainer_state.json"), "trainer_state.json"),
    "bad rank JSON": (lambda folder: (folder / "rank0.json").write_text("{\"rng\": "), "rank0.json"),
    "edited step count": (lambda folder: rewrite_state(folder, lambda state: state.__setitem__("step", 3)),
                          "trainer_state.json"),
    "truncated history": (lambda folder: rewrite_state(folder, truncate_history), "trainer_state.json"),
    "missing meta_optimizer entry": (lambda folder: rewrite_state(folder, lambda state: state.pop("meta_optimizer")),
                                     "trainer_state.json"),
    "NaN in theta": (nan_in, "theta.safetensors"),
    "NaN in meta-optimizer state": (lambda folder: nan_in(folder, "meta_optimizer.safetensors"),
                                    "meta_optimizer.safetensors"),
    "estimator key missing": (drop_estimator_key, "rank0.json"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A finished 4-step run (checkpoints 2 and 4) and its final theta."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = trainer_for(run_dir).train()
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
    return run_dir, result.theta


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source / "checkpoints", target / "checkpoints")
    return target


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(
        tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], kind: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    source, final_theta = reference
    run_dir = copy_run(source, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-00000004"
    damage, file = DAMAGE[kind]
    damage(newest)

    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(newest)
    message = str(caught.value)
    assert "\n" not in message and f"{newest}/{file}" in message or f"{newest}: missing {file}" in message, message
    with pytest.raises(CheckpointError):  # named explicitly: no fallback, the same one-line error
        trainer_for(run_dir, resume=newest)

    capsys.readouterr()
    resumed = trainer_for(run_dir, resume=True)
    said = capsys.readouterr().err
    assert resumed.step == 2
    assert f"damaged checkpoint: {message}" in said and "falling back to" in said and "step-00000002" in said
    # The damaged folder is kept for inspection, out of the listing; the intact one continues exactly.
    assert (run_dir / "checkpoints" / "damaged-step-00000004").is_dir() and not newest.exists()
    result = resumed.train()
    for name, value in final_theta.items():
        assert torch.equal(result.theta[name], value), name


def test_no_intact_checkpoint_is_one_line_from_the_command(tmp_path: Path,
                                                           reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    run_dir = copy_run(reference[0], tmp_path / "run")
    for _, folder in list_checkpoints(run_dir / "checkpoints"):
        truncate(folder / "theta.safetensors")
    command = [sys.executable, str(ROOT / "scripts" / "metatrain.py"), "--no-progress", "--no-export", "--resume",
               *[arg for override in tiny(run_dir) for arg in ("--set", override)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert sum("damaged checkpoint:" in line and "theta.safetensors" in line for line in lines) == 2
    assert "all 2 checkpoint(s) are damaged" in lines[-1]


def test_a_checkpoint_with_non_finite_theta_is_refused_even_alone(tmp_path: Path,
                                                                  reference: tuple[Path, dict]) -> None:
    run_dir = copy_run(reference[0], tmp_path / "run")
    for _, folder in list_checkpoints(run_dir / "checkpoints"):
        nan_in(folder)
    with pytest.raises(CheckpointError, match="theta is not finite.*refusing|all 2 checkpoint"):
        trainer_for(run_dir, resume=True)


def test_sigkill_while_pruning_never_leaves_a_listed_unloadable_checkpoint(tmp_path: Path) -> None:
    """The process is killed at the first file deletion of pruning (a real SIGKILL)."""
    script = f"""
import os, signal, torch
from lopt_hf.metatrain.checkpoint import CheckpointData, save_checkpoint
def data(step):
    return CheckpointData(step=step, theta={{"w": torch.full((4,), float(step))}}, meta_optimizer={{"state": {{}}}},
                          estimator_state={{"x": torch.zeros(1, 3)}}, config={{}}, history={{}}, task_ids=[0])
for step in (2, 4):
    save_checkpoint({str(tmp_path)!r}, data(step), keep=2)
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
os.unlink = killed
save_checkpoint({str(tmp_path)!r}, data(6), keep=2)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    listed = list_checkpoints(tmp_path)
    assert [step for step, _ in listed] == [4, 6]  # step 2 left the listing before any file of it was deleted
    for _, folder in listed:
        verify_checkpoint(folder)
    # The half-deleted folder is a leftover the next save cleans up.
    assert list(tmp_path.glob(".tmp-pruned-step-00000002"))
    save_checkpoint(tmp_path, CheckpointData(step=8, theta={"w": torch.zeros(4)}, meta_optimizer={"state": {}},
                                             estimator_state={}, config={}, history={}), keep=2)
    assert not list(tmp_path.glob(".tmp-*")) and [step for step, _ in list_checkpoints(tmp_path)] == [6, 8]


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_the_current_step_and_prints_the_resume_command(tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny(run_dir, "outer_steps=100000", "checkpoint_every=3")
    command = [sys.executable, str(ROOT / "scripts" / "metatrain.py"), "--no-progress", "--no-export",
               *[arg for override in overrides for arg in ("--set", override)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(run_dir / "checkpoints") is None and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.02)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None
    state = verify_checkpoint(newest)
    name = signal.Signals(signum).name
    assert f"{name}: stopped after outer step {state['step']}/100000; checkpoint {newest}" in err
    resume_line = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert resume_line and resume_line[0].endswith("--resume") and "scripts/metatrain.py" in resume_line[0]
    resumed = trainer_for(run_dir, "outer_steps=100000", "checkpoint_every=3", resume=True)
    assert resumed.step == state["step"] >= 3


def test_resume_command_forms() -> None:
    assert resume_command(["scripts/metatrain.py", "--config", "a b.yaml"]) == (
        "python scripts/metatrain.py --config 'a b.yaml' --resume")
    assert resume_command(["scripts/metatrain.py", "--resume"], distributed=True) == (
        "accelerate launch scripts/metatrain.py --resume")
    assert resume_command(["/venv/bin/lopt-hf", "metatrain", "--steps", "5"]) == "lopt-hf metatrain --steps 5 --resume"
    assert resume_command(["/usr/bin/pytest", "-q"]).startswith("MetaTrainer(config, resume=True)")


@pytest.mark.parametrize("damage", [None, "truncated theta", "garbage safetensors header", "bad rank JSON"])
def test_checkpoints_without_checksums_still_load_and_damage_is_still_named(tmp_path: Path,
                                                                            damage: str | None) -> None:
    """Folders written before sizes, checksums and key order were recorded remain resumable; without the
    checksums, damage is caught by parsing the files (safetensors headers and sizes, JSON)."""
    path = save_checkpoint(tmp_path, CheckpointData(step=1, theta={"w": torch.ones(2)}, meta_optimizer={"state": {}},
                                                    estimator_state={"x": torch.zeros(1)}, config={},
                                                    history={"step": [1]}, task_ids=[0]))
    rewrite_state(path, lambda state: state.pop("files"))
    info = json.loads((path / "rank0.json").read_text())
    info.pop("keys")
    (path / "rank0.json").write_text(json.dumps(info))
    if damage is None:
        assert verify_checkpoint(path)["step"] == 1
        return
    harm, file = DAMAGE[damage]
    harm(path)
    expected = "not valid JSON" if file.endswith(".json") else "not a readable safetensors file"
    with pytest.raises(CheckpointError, match=f"^{path / file}: {expected}") as caught:
        verify_checkpoint(path)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_checkpoints_on_every_process(tmp_path: Path) -> None:
    """Issue 19: Ctrl-C under `accelerate launch` saved nothing and printed a cut-off traceback. Ctrl-C in a
    terminal signals the whole foreground process group; the launcher forwards it to its workers, which
    agree (through the meta-gradient all-reduce) on the outer step after which they stop together."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "run"
    overrides = tiny(run_dir, "outer_steps=100000", "checkpoint_every=3")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(ROOT / "scripts" / "metatrain.py"), "--no-progress", "--no-export",
               *[arg for override in overrides for arg in ("--set", override)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run_dir / "checkpoints") is None and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err[-3000:]
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None
    state = verify_checkpoint(newest)
    assert state["num_processes"] == 2
    assert f"SIGINT: stopped after outer step {state['step']}/100000; checkpoint {newest}" in err
    assert "resume with: accelerate launch " in err and "Traceback" not in err


def test_export_of_a_run_skips_a_damaged_newest_checkpoint(tmp_path: Path,
                                                          reference: tuple[Path, dict[str, torch.Tensor]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`lopt-hf export RUN OUT` exports the newest checkpoint that verifies, names the damaged one, and leaves
    the run folder as it was; with every checkpoint damaged it stops in one line (exit 2)."""
    from lopt_hf.cli import main

    run_dir = copy_run(reference[0], tmp_path / "run")
    truncate(run_dir / "checkpoints" / "step-00000004" / "theta.safetensors")
    capsys.readouterr()
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--no-evaluate"]) == 0
    said = capsys.readouterr()
    assert "skipping a damaged checkpoint" in said.err and "step-00000004" in said.err
    assert "exported" in said.out and "step-00000002" in said.out
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]  # nothing moved
    truncate(run_dir / "checkpoints" / "step-00000002" / "theta.safetensors")
    assert main(["export", str(run_dir), str(tmp_path / "out2"), "--no-evaluate"]) == 2
    assert "every checkpoint" in capsys.readouterr().err and not (tmp_path / "out2").exists()
