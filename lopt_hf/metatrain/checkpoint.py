"""Atomic, resumable meta-training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-00000120/`` holding everything needed to
continue bit-for-bit:

``theta.safetensors``
    the meta-parameters after ``step`` completed outer steps (float32, the rule's names).
``meta_optimizer.safetensors`` + the ``meta_optimizer`` entry of ``trainer_state.json``
    the meta-optimizer's ``state_dict()`` (tensors in safetensors, the rest as JSON).
``rank<r>.safetensors`` / ``rank<r>.json``
    per process: the estimator state of that process's block of task slots (persistent inner
    problems, PES accumulators, ...; every tensor has a leading slot axis) and its RNG states
    (torch, CUDA, numpy, Python). Because the slots are stored with their global task ids, a run
    can resume on a different number of processes: each process reads the rows of its new block
    from whichever files hold them (bit-for-bit continuation needs the same process count, since
    the all-reduced sums then add up in the same order).
``trainer_state.json``
    ``step``, ``num_processes``, the resolved config, the meta-loss history, elapsed wall time.

Writing is atomic: every process writes into ``.tmp-step-…`` (each file fsync'ed), the main
process then fsyncs the folder and ``os.replace`` s it to its final name, and fsyncs the parent.
A run killed at any moment leaves either the previous complete checkpoints or the new one —
never a half-written one (leftover ``.tmp-*`` folders are ignored and cleaned up). Only the
newest ``keep`` checkpoints are kept; an old one is first renamed out of the listing
(``.tmp-pruned-…``) and only then deleted, so a kill while pruning never leaves a listed
checkpoint with files missing. Nothing is pickled: tensors go to safetensors, everything else to
JSON.

``trainer_state.json`` also records the size and sha256 of every other file of the checkpoint and
each ``rank<r>.json`` the order of its estimator state keys (estimators iterate over their state,
and float sums depend on the order, so a resume restores it exactly). :func:`verify_checkpoint`
checks a folder before anything is loaded — files present, sizes and checksums, JSON and
safetensors headers that parse, a step count that matches the folder name and the history, a
finite theta — and names the damaged file in one line (:class:`CheckpointError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CheckpointData", "CheckpointError", "CHECKPOINT_FORMAT", "checkpoint_dir_name", "list_checkpoints",
           "latest_checkpoint", "newest_intact_checkpoint", "save_checkpoint", "load_checkpoint",
           "read_trainer_state", "read_theta", "capture_rng_state", "restore_rng_state", "verify_checkpoint"]

CHECKPOINT_FORMAT = 1
TRAINER_STATE = "trainer_state.json"
THETA_FILE = "theta.safetensors"
META_OPTIMIZER_FILE = "meta_optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run resuming from it."""


@dataclass
class CheckpointData:
    """What one process saves / gets back."""

    step: int  # completed outer steps
    theta: dict[str, Tensor]
    meta_optimizer: dict[str, Any]  # torch optimizer state_dict()
    estimator_state: dict[str, Tensor]  # this process's task slots (leading axis over task_ids)
    config: dict[str, Any]
    history: dict[str, list[float]]
    num_processes: int = 1
    elapsed_s: float = 0.0  # wall time spent meta-training so far (across resumes)
    rng: dict[str, Any] = field(default_factory=dict)  # this process's RNG states (capture_rng_state)
    extra: dict[str, Any] = field(default_factory=dict)  # free JSON (e.g. the estimator's stats)
    task_ids: list[int] = field(default_factory=list)  # this process's global task ids (contiguous)


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none)."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def newest_intact_checkpoint(root: str | os.PathLike[str]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint` (``None``: none does), and
    the newer damaged ones with the one-line reason of each — nothing is moved or deleted here."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            damaged.append((path, str(err)))
            continue
        return path, damaged
    return None, damaged


# ================================================================================ saving


def save_checkpoint(root: str | os.PathLike[str], data: CheckpointData, *, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None, keep: int | None = None) -> Path:
    """Write ``data`` as checkpoint ``step-<data.step>`` under ``root``, atomically; return its path.

    In a distributed run every process calls this (collectively, ``barrier`` synchronising them):
    each writes its own ``rank<r>`` files, the main process (``rank == 0``) also the shared
    ones and performs the rename. With ``keep``, older checkpoints beyond the newest ``keep``
    are deleted afterwards.
    """
    root = Path(root)
    final = root / checkpoint_dir_name(data.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()

    from safetensors.torch import save as save_safetensors

    estimator_tensors = {f"estimator/{name}": value for name, value in data.estimator_state.items()}
    rng_tensors, rng_json = _split_rng(data.rng)
    _write_synced(tmp / f"rank{rank}.safetensors",
                  save_safetensors(_cpu_tensors({**estimator_tensors, **rng_tensors}), metadata={"format": "pt"}))
    splittable = bool(data.task_ids) and all(
        value.dim() >= 1 and value.shape[0] == len(data.task_ids) for value in data.estimator_state.values())
    _write_synced(tmp / f"rank{rank}.json", json.dumps({"rng": rng_json, "task_ids": list(data.task_ids),
                                                        "splittable": splittable,
                                                        "keys": list(data.estimator_state)}).encode())
    if rank == 0:
        _write_synced(tmp / THETA_FILE, save_safetensors(_cpu_tensors(data.theta), metadata={"format": "pt"}))
        optimizer_tensors: dict[str, Tensor] = {}
        optimizer_json = _encode(data.meta_optimizer, optimizer_tensors, "")
        _write_synced(tmp / META_OPTIMIZER_FILE, save_safetensors(_cpu_tensors(optimizer_tensors),
                                                                  metadata={"format": "pt"}))
    barrier()
    if rank == 0:
        state = {"format": CHECKPOINT_FORMAT, "step": data.step, "num_processes": data.num_processes,
                 "elapsed_s": data.elapsed_s, "config": data.config, "history": data.history,
                 "meta_optimizer": optimizer_json, "extra": data.extra,
                 "files": {file.name: _file_record(file) for file in sorted(tmp.iterdir())}}
        # trainer_state.json last (after every process's files): list_checkpoints only counts folders that have it.
        _write_synced(tmp / TRAINER_STATE, json.dumps(state, indent=1).encode())
        _fsync_path(tmp)
        if final.exists():  # re-saving a step (a resumed run repeating one): swap the old one out
            stale = root / f"{_TMP_PREFIX}old-{final.name}"
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
        if keep is not None:
            for _, old in list_checkpoints(root)[:-keep]:
                # Out of the listing first (one atomic rename), then deleted: a kill in between leaves
                # a .tmp- folder (cleaned up next time), never a listed checkpoint with files missing.
                doomed = root / f"{_TMP_PREFIX}pruned-{old.name}"
                if doomed.exists():
                    shutil.rmtree(doomed)
                os.replace(old, doomed)
            _fsync_path(root)
        for leftover in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    barrier()
    return final


# =============================================================================== loading


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint folder (step, config, history, ...), its fields checked."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
    state = _read_json(file)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: unsupported checkpoint format {found!r} "
                              f"(this lopt_hf reads format {CHECKPOINT_FORMAT})")
    expected = {"step": int, "num_processes": int, "config": dict, "history": dict, "meta_optimizer": dict}
    for key, kind in expected.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{file}: {key!r} is missing or not a {kind.__name__} (got {value!r:.60})")
    if state["step"] < 0 or state["num_processes"] < 1:
        raise CheckpointError(f"{file}: step {state['step']} / num_processes {state['num_processes']} out of range")
    return state


def read_theta(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The meta-parameters stored in a checkpoint folder."""
    file = Path(path) / THETA_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {THETA_FILE}")
    return _load_safetensors(file)


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint folder without loading its state; return its ``trainer_state.json``.

    Raises :class:`CheckpointError` naming the damaged file when a file is missing, its size or
    sha256 differs from what the save recorded, a JSON file or safetensors header does not parse,
    the step count disagrees with the folder name or the history, or theta or the meta-optimizer
    state is not finite.
    """
    path = Path(path)
    state = read_trainer_state(path)
    step = state["step"]
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(f"{path / TRAINER_STATE}: step {step} does not match the folder name {path.name}")
    _check_history(state["history"], step, path / TRAINER_STATE)
    records = state.get("files")  # absent in checkpoints written before it was recorded: no checksums then
    if records is not None:
        if not isinstance(records, dict):
            raise CheckpointError(f"{path / TRAINER_STATE}: 'files' is not a mapping")
        for name, record in records.items():
            file = path / str(name)
            if file.parent != path or not file.is_file():
                raise CheckpointError(f"{file}: missing (the checkpoint recorded it)")
            if not isinstance(record, dict) or _file_record(file) != record:
                raise CheckpointError(f"{file}: size or sha256 differs from what the save recorded "
                                      f"(changed or damaged since)")
    required = [THETA_FILE, META_OPTIMIZER_FILE, *[f"rank{index}.{suffix}" for index in range(state["num_processes"])
                                                   for suffix in ("safetensors", "json")]]
    names: list[str] = []  # the tensor names of the rank file just checked (its .json comes next)
    for name in required:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if not name.endswith(".json"):
            names = _safetensors_names(file)
            continue
        info = _read_json(file)
        if not isinstance(info, dict) or not isinstance(info.get("task_ids", []), list):
            raise CheckpointError(f"{file}: not a process record (a JSON object with task_ids)")
        stored = sorted(key[len("estimator/"):] for key in names if key.startswith("estimator/"))
        keys = info.get("keys", stored)  # absent before the key order was recorded
        if not isinstance(keys, list) or sorted(map(str, keys)) != stored:
            raise CheckpointError(f"{file}: its estimator key list does not match "
                                  f"{file.with_suffix('.safetensors').name}")
    for name, what in ((THETA_FILE, "theta"), (META_OPTIMIZER_FILE, "the meta-optimizer state")):
        tensors = _load_safetensors(path / name)
        bad = sorted(key for key, value in tensors.items()
                     if value.is_floating_point() and not bool(torch.isfinite(value).all()))
        if bad:
            raise CheckpointError(f"{path / name}: {what} is not finite in {bad[:4]}; refusing to resume from it")
    return state


def load_checkpoint(path: str | os.PathLike[str], *, rank: int = 0, num_processes: int = 1,
                    task_ids: list[int] | None = None, device: torch.device | str = "cpu") -> CheckpointData:
    """Read a checkpoint for process ``rank`` of ``num_processes`` owning global ``task_ids``.

    With the saving run's process count each process gets back exactly what it saved (RNG
    states and the order of the estimator state's keys included); with another count, the
    estimator state rows of ``task_ids`` are gathered from the saved blocks (RNG states are then
    not restored). The folder is checked first (:func:`verify_checkpoint`); any damage is a
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    saved_processes = int(state["num_processes"])
    rank_files = [path / f"rank{index}.safetensors" for index in range(saved_processes)]
    rank_json = [_read_json(path / f"rank{index}.json") for index in range(saved_processes)]
    if saved_processes == num_processes:
        own = _load_safetensors(rank_files[rank], device=str(device))
        estimator_state = {name[len("estimator/"):]: value for name, value in own.items()
                           if name.startswith("estimator/")}
        if task_ids is not None and rank_json[rank].get("task_ids") not in (None, list(task_ids)):
            raise CheckpointError(f"{path}: process {rank} held task ids {rank_json[rank]['task_ids']}, "
                                  f"now {list(task_ids)} (did estimator.num_tasks change?)")
    else:
        if task_ids is None or not all(info.get("splittable") for info in rank_json):
            raise CheckpointError(f"{path}: saved by a run with {saved_processes} process(es); resume it with "
                                  f"{saved_processes} (this run has {num_processes}) — this estimator's state "
                                  f"cannot be re-split over processes")
        estimator_state = _gather_rows(rank_files, [info["task_ids"] for info in rank_json], list(task_ids),
                                       str(device), path)
    estimator_state = _in_saved_order(estimator_state, rank_json[rank if saved_processes == num_processes else 0],
                                      rank_files[rank if saved_processes == num_processes else 0])
    rng: dict[str, Any] = {}
    if saved_processes == num_processes:  # RNG streams belong to processes, not to task slots
        rng_tensors = {name: value for name, value in _load_safetensors(rank_files[rank]).items()
                       if name.startswith("rng/")}
        rng = _join_rng(rng_tensors, rank_json[rank].get("rng", {}))
    theta = {name: value.to(device) for name, value in read_theta(path).items()}
    optimizer_tensors = _load_safetensors(path / META_OPTIMIZER_FILE, device=str(device))
    try:
        meta_optimizer = _decode(state["meta_optimizer"], optimizer_tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: the meta_optimizer entry does not match "
                              f"{META_OPTIMIZER_FILE} ({type(err).__name__}: {err})") from None
    return CheckpointData(step=int(state["step"]), theta=theta, meta_optimizer=meta_optimizer,
                          estimator_state=estimator_state, config=state["config"], history=state["history"],
                          num_processes=saved_processes, elapsed_s=float(state.get("elapsed_s", 0.0)), rng=rng,
                          extra=state.get("extra") or {}, task_ids=list(task_ids or []))


def _in_saved_order(estimator_state: dict[str, Tensor], info: dict[str, Any], file: Path) -> dict[str, Tensor]:
    """The estimator state with its keys in the order they had when saved (safetensors sorts them)."""
    order = info.get("keys")
    if order is None:  # written before the order was recorded
        return estimator_state
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(estimator_state):
        raise CheckpointError(f"{file.with_suffix('.json')}: its key list does not match the estimator state in "
                              f"{file.name}")
    return {key: estimator_state[key] for key in order}


def _check_history(history: dict[str, Any], step: int, file: Path) -> None:
    """Every history series is a list of numbers; a ``step`` series is exactly 1..step, the others as long."""
    for key, values in history.items():
        if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in values):
            raise CheckpointError(f"{file}: history[{key!r}] is not a list of numbers")
    steps = history.get("step")
    if steps is None:
        return
    if steps != list(range(1, step + 1)):
        raise CheckpointError(f"{file}: the history records steps {_span(steps)} but the checkpoint is at step {step} "
                              f"(truncated or edited)")
    short = sorted(key for key, values in history.items() if len(values) != step)
    if short:
        raise CheckpointError(f"{file}: history {short} do not have {step} entries (truncated or edited)")


def _span(steps: list[Any]) -> str:
    return f"{steps[0]}..{steps[-1]} ({len(steps)} entries)" if steps else "none"


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror or err})") from None


def _safetensors_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file (its header parsed, its size checked); damage → CheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # SafetensorError, OSError, ...: safetensors raises several kinds
        raise CheckpointError(f"{file}: not a readable safetensors file ({' '.join(str(err).split())[:160]})") from None


def _load_safetensors(file: Path, device: str = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device=device)
    except Exception as err:  # SafetensorError, OSError, ...
        raise CheckpointError(f"{file}: not a readable safetensors file ({' '.join(str(err).split())[:160]})") from None


def _file_record(file: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}


def _gather_rows(files: list[Path], blocks: list[list[int]], wanted: list[int], device: str,
                 path: Path) -> dict[str, Tensor]:
    """Rows ``wanted`` (global task ids) of the estimator state spread over per-process files."""
    from safetensors import safe_open

    where = {task_id: (index, row) for index, block in enumerate(blocks) for row, task_id in enumerate(block)}
    lacking = [task_id for task_id in wanted if task_id not in where]
    if lacking:
        raise CheckpointError(f"{path}: no saved estimator state for task ids {lacking} "
                              f"(did estimator.num_tasks change?)")
    pieces: dict[str, list[Tensor]] = {}
    handles = {}
    try:
        for task_id in wanted:
            index, row = where[task_id]
            if index not in handles:
                handles[index] = safe_open(str(files[index]), framework="pt", device=device)
            handle = handles[index]
            for name in handle.keys():
                if name.startswith("estimator/"):
                    pieces.setdefault(name[len("estimator/"):], []).append(handle.get_slice(name)[row:row + 1])
    finally:
        handles.clear()
    return {name: torch.cat(rows).contiguous() for name, rows in pieces.items()}


# =================================================================================== RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states of this process."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": {"keys": numpy_state[1].tolist(), "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (missing entries are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", np.array(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([value.cpu() for value in state["cuda"]])


def _split_rng(rng: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    rest: dict[str, Any] = {}
    for key, value in rng.items():
        if isinstance(value, Tensor):
            tensors[f"rng/{key}"] = value
        elif key == "cuda":
            for index, device_state in enumerate(value):
                tensors[f"rng/cuda/{index}"] = device_state
        else:
            rest[key] = value
    return tensors, rest


def _join_rng(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    rng = dict(rest)
    cuda = sorted((int(name.rsplit("/", 1)[1]), value) for name, value in tensors.items()
                  if name.startswith("rng/cuda/"))
    if cuda:
        rng["cuda"] = [value.cpu() for _, value in cuda]
    for name, value in tensors.items():
        if not name.startswith("rng/cuda/"):
            rng[name[len("rng/"):]] = value.cpu()
    return rng


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


# ===================================================== state_dict <-> (JSON, tensors)


def _encode(value: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """JSON skeleton of a nested state_dict; tensors move to ``tensors`` under their path.

    Dict keys keep their type (optimizer ``state`` is keyed by int parameter index).
    """
    if isinstance(value, Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[key, _encode(item, tensors, f"{path}/{key}")] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{path}/{index}") for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}/{index}") for index, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"cannot store {type(value).__name__} at {path or '/'} in a checkpoint")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {key: _decode(item, tensors) for key, item in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value


# ============================================================================ file system


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors wants contiguous, unshared CPU tensors.
    return {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a directory so the names in it (new files, a rename) are durable too."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms that cannot open directories
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
