"""A fuzz test of everything that reads untrusted bytes (issue 19, item 6).

Deterministic (every case is drawn from ``random.Random(seed)``), a few hundred cases in seconds:

* artifact bytes — random byte flips, truncations, insertions and bad length fields in ``model.safetensors``
  and ``config.json`` of real small artifacts;
* config values — random JSON values (NaN, huge integers, numeric strings, booleans, nested lists and
  objects, ...) substituted at random keys of ``config.json``, loaded by ``load_artifact`` and ``AutoConfig``;
* folder links — ``config.json`` / ``model.safetensors`` / ``subfolder`` as links inside or outside the
  folder, dangling links, folders in their place;
* converter input — random bytes and mutated flax msgpack (``tests/fixtures/refvectors``) given to
  ``convert_celo2`` and ``convert_celo``.

For every case the outcome must be one of: a load that round-trips (theta finite, saved and loaded again
equal; an artifact that loads also trains a small model one step without writing a non-finite value), or
the one clear error (``ArtifactError``; the converter's ``FlaxMsgpackError``) — never another exception
type — within a time bound per case, and the whole run within a memory bound. The slow variant draws
ten times as many cases.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lopt_hf import ArtifactError, create_artifact, load_artifact, load_lopt
from lopt_hf.hub import LearnedOptimizerConfig
from lopt_hf.convert.celo import convert_celo
from lopt_hf.convert.celo2 import convert_celo2
from lopt_hf.convert.flax_msgpack import FlaxMsgpackError

REFVECTORS = Path(__file__).resolve().parents[1] / "fixtures" / "refvectors"
# Loose: the machine is shared; a hang or a bomb takes far longer than this.
SECONDS_PER_CASE = 5.0
MAX_EXTRA_MEMORY_BYTES = 2 * 2**30
# Real small artifacts of the rules whose configs have the most to get wrong (sizes, decays, flags, harness).
ARTIFACTS: dict[str, dict[str, Any]] = {
    "per_param_mlp": {"harness": {"type": "celo2"}},
    "celo2": {"rule_config": {"orthogonalize": True}, "harness": {"type": "celo2"}},
    "mlp_lopt": {},
    "small_fc_lopt": {"optimizer_defaults": {"lr": 0.5, "weight_decay": 0.01, "chunk_size": 4096}},
}
FAST_CASES = {"safetensors": 80, "config_bytes": 50, "config_values": 140, "links": 30, "converter": 60}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    folders = {}
    for seed, (rule, kwargs) in enumerate(ARTIFACTS.items()):
        folders[rule] = root / rule
        create_artifact(rule, seed=seed, **kwargs).save_pretrained(folders[rule])
    return folders


class Outcome:
    """Counts of what the cases ended in, for the final sanity check that every kind of outcome occurred."""

    def __init__(self) -> None:
        self.loaded = 0
        self.refused = 0


def run_case(label: str, action: Callable[[], Any], allowed: tuple[type[BaseException], ...],
             outcome: Outcome) -> Any:
    """Run one case: its result, or ``None`` when it raised one of ``allowed``; anything else fails the test."""
    start = time.perf_counter()
    try:
        result = action()
    except allowed as err:
        assert str(err).strip(), f"{label}: empty error message"
        outcome.refused += 1
        result = None
    except Exception as err:  # noqa: BLE001  (the point of the test: name the case and the stray error)
        raise AssertionError(f"{label}: {type(err).__name__} instead of a clear error: {err!s:.300}") from err
    else:
        outcome.loaded += 1
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS_PER_CASE, f"{label}: took {elapsed:.1f} s"
    return result


def check_loaded(folder: Path, model: Any, label: str, expected: dict[str, torch.Tensor] | None = None) -> None:
    """A loaded artifact: finite theta (equal to ``expected`` if given), a save/load round trip, one safe step."""
    theta = model.theta()
    assert all(torch.isfinite(value).all() for value in theta.values()), label
    if expected is not None:
        assert theta.keys() == expected.keys() and all(torch.equal(theta[k], expected[k]) for k in theta), \
            f"{label}: loaded a theta other than the one saved"
    again = folder.parent / f"{folder.name}-again"
    shutil.rmtree(again, ignore_errors=True)
    model.save_pretrained(again)
    reloaded = load_artifact(again).theta()
    assert all(torch.equal(reloaded[k], theta[k]) for k in theta), f"{label}: save/load does not round-trip"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3))
    optimizer = load_lopt(model, net)
    optimizer.set_total_steps(10)  # Celo schedules its steps by the planned length of training
    loss = net(torch.tensor([1, 2, 3])).square().sum()
    loss.backward()
    optimizer.step(loss=loss.detach())  # Celo's rule takes the loss as an input
    assert all(torch.isfinite(param).all() for param in net.parameters()), f"{label}: a step wrote non-finite values"


def fresh_copy(original: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(original, target)
    return target


# ====================================================================================== bytes


def mutate_bytes(data: bytes, rng: random.Random, header_end: int | None = None) -> bytes:
    """One random corruption: flipped bytes (often in the header), truncation, insertion, deletion, bad length."""
    buffer = bytearray(data)
    kind = rng.choice(["flip", "flip", "flip_header", "truncate", "insert", "delete", "length", "append"])
    if kind in ("flip", "flip_header"):
        end = header_end if kind == "flip_header" and header_end else len(buffer)
        for _ in range(rng.randint(1, 8)):
            index = rng.randrange(end)
            buffer[index] ^= rng.randint(1, 255)
    elif kind == "truncate":
        del buffer[rng.randrange(len(buffer)):]
    elif kind == "insert":
        index = rng.randrange(len(buffer) + 1)
        buffer[index:index] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        index = rng.randrange(len(buffer))
        del buffer[index:index + rng.randint(1, 16)]
    elif kind == "length" and len(buffer) >= 8:
        buffer[:8] = rng.choice([0, 1, 2**63, 2**64 - 1, len(buffer), rng.randrange(2**32)]).to_bytes(8, "little")
    else:
        buffer += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(buffer)


def fuzz_file_bytes(originals: dict[str, Path], tmp_path: Path, filename: str, cases: int, seed: int) -> Outcome:
    rng, outcome = random.Random(seed), Outcome()
    expected = {rule: load_artifact(folder).theta() for rule, folder in originals.items()}
    for case in range(cases):
        rule = rng.choice(sorted(originals))
        folder = fresh_copy(originals[rule], tmp_path / "case")
        data = (folder / filename).read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little") if filename == "model.safetensors" else None
        if filename == "model.safetensors" and rng.random() < 0.4:
            # without the recorded sha256, a flipped data byte is a valid theta: the checks behind it run
            config = json.loads((folder / "config.json").read_text())
            del config["provenance"]["weights_sha256"]
            (folder / "config.json").write_text(json.dumps(config))
            expected_theta = None
        else:
            expected_theta = expected[rule]
        (folder / filename).write_bytes(mutate_bytes(data, rng, header_end))
        label = f"{filename} case {case} (seed {seed}, {rule})"
        model = run_case(label, lambda: load_artifact(folder), (ArtifactError,), outcome)
        if model is not None:
            check_loaded(folder, model, label, expected_theta)
    return outcome


# ============================================================================ config values


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, weighted towards the ones that slip through lax checks."""
    choices: list[Callable[[], Any]] = [
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-3, 3), lambda: rng.randint(0, 10**6),
        lambda: 10 ** rng.randint(7, 400), lambda: -(2 ** 63), lambda: 2 ** 64, lambda: rng.uniform(-2, 2),
        lambda: rng.choice([0.0, -0.0, 1e-300, 1e300, -1e300, 1e-45, 3.4e38, float("nan"), float("inf"),
                            float("-inf")]),
        lambda: rng.choice(["", "0.001", "1e300", "true", "false", "no", "NaN", "20", "celo2", "per_param_mlp",
                            "learned_optimizer", "(a+)+$", "^(\\w|\\w)*$!", "x" * 70, "wte|wpe", "\u0000"]),
    ]
    if depth < 3:
        choices += [lambda: [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))],
                    lambda: {rng.choice(["type", "lr", "mult_1d", "a", "__float__"]): random_json(rng, depth + 1)
                             for _ in range(rng.randint(0, 3))},
                    lambda: [rng.uniform(0, 1) for _ in range(rng.choice([0, 1, 2, 3, 17, 100]))]]
    return rng.choice(choices)()


HARNESS_KEYS = ["type", "mult_1d", "adamw_betas", "adamw_eps", "embedding_patterns", "unknown_setting"]
OPTIMIZER_KEYS = ["lr", "weight_decay", "chunk_size", "momentum"]


def substitute(config: dict[str, Any], rng: random.Random) -> str:
    """Put a random JSON value at a random key (top level, or one level down); returns the key path."""
    section = rng.choice(["top", "rule_config", "rule_config", "rule_config", "optimizer_defaults",
                          "optimizer_defaults", "harness", "harness", "provenance"])
    value = random_json(rng)
    if section == "top":
        key = rng.choice([*config, "auto_map", "unknown_key"])
        config[key] = value
        return key
    if not isinstance(config.get(section), dict):
        config[section] = {} if section != "harness" else {"type": "celo2"}
    keys = {"harness": HARNESS_KEYS, "optimizer_defaults": OPTIMIZER_KEYS}.get(section, [])
    key = rng.choice(sorted(config[section]) + keys + ["unknown"])
    config[section][key] = value
    return f"{section}[{key!r}]"


def fuzz_config_values(originals: dict[str, Path], tmp_path: Path, cases: int, seed: int) -> Outcome:
    from transformers import AutoConfig

    rng, outcome = random.Random(seed), Outcome()
    for case in range(cases):
        rule = rng.choice(sorted(originals))
        folder = fresh_copy(originals[rule], tmp_path / "case")
        config = json.loads((folder / "config.json").read_text())
        where = [substitute(config, rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        (folder / "config.json").write_text(json.dumps(config))  # NaN / Infinity as JSON's lax literals
        label = f"config value case {case} (seed {seed}, {rule}, {where})"
        model = run_case(label, lambda: load_artifact(folder), (ArtifactError,), outcome)
        if config.get("model_type") == "learned_optimizer":  # else not ours: transformers' own errors
            # AutoConfig reads config.json alone: it must refuse exactly what LearnedOptimizerConfig refuses
            ours = run_case(f"config {label}", lambda: LearnedOptimizerConfig.from_pretrained(str(folder)),
                            (ArtifactError,), Outcome())
            auto = run_case(f"AutoConfig {label}", lambda: AutoConfig.from_pretrained(str(folder)),
                            (ArtifactError,), Outcome())
            assert (ours is None) == (auto is None), f"{label}: LearnedOptimizerConfig and AutoConfig disagree"
            assert ours is not None or model is None, f"{label}: an invalid config.json loaded"
        if model is not None:
            check_loaded(folder, model, label)
    return outcome


# ===================================================================================== links


def fuzz_links(originals: dict[str, Path], tmp_path: Path, cases: int, seed: int) -> Outcome:
    rng, outcome = random.Random(seed), Outcome()
    source, elsewhere = originals["per_param_mlp"], originals["mlp_lopt"]
    expected = load_artifact(source).theta()
    for case in range(cases):
        folder = fresh_copy(source, tmp_path / "case")
        leaves = False
        for name in ("config.json", "model.safetensors"):
            kind = rng.choice(["file", "file", "inside", "chain", "outside", "outside_same", "dangling", "folder",
                               "self"])
            path = folder / name
            if kind in ("inside", "chain"):
                path.rename(folder / f"real-{name}")
                if kind == "chain":
                    (folder / f"link-{name}").symlink_to(f"real-{name}")
                path.symlink_to(f"{'link' if kind == 'chain' else 'real'}-{name}")
            elif kind in ("outside", "outside_same"):
                path.unlink()  # outside_same: a byte-identical file, still outside the folder
                path.symlink_to((source if kind == "outside_same" else elsewhere) / name)
                leaves = True
            elif kind == "dangling":
                path.unlink()
                path.symlink_to(folder / "nowhere")
            elif kind == "folder":
                path.unlink()
                path.mkdir()
            elif kind == "self":
                path.unlink()
                path.symlink_to(".")
        kwargs: dict[str, Any] = {}
        target: Path = folder
        if rng.random() < 0.3:
            linked = tmp_path / "linked"
            if linked.is_symlink():
                linked.unlink()
            if rng.random() < 0.5:  # the folder through a link to it: allowed
                linked.symlink_to(folder, target_is_directory=True)
                target = linked
            else:  # a subfolder that is a link leaving the folder
                (folder / "sub").symlink_to(elsewhere, target_is_directory=True)
                kwargs["subfolder"] = rng.choice(["sub", "../mlp_lopt", "/etc"])
                leaves = True
        label = f"link case {case} (seed {seed}): {sorted(os.listdir(folder))} {kwargs}"
        model = run_case(label, lambda: load_artifact(target, **kwargs), (ArtifactError,), outcome)
        if model is not None:
            assert not leaves, f"{label}: loaded through a link leaving the folder"
            check_loaded(folder, model, label, expected)
    return outcome


# ================================================================================ converters


def fuzz_converters(tmp_path: Path, cases: int, seed: int) -> Outcome:
    rng, outcome = random.Random(seed), Outcome()
    inputs = {convert_celo2: (REFVECTORS / "celo2_theta0.state").read_bytes(),
              convert_celo: (REFVECTORS / "celo_published_theta.state").read_bytes()}
    for case in range(cases):
        convert = rng.choice([convert_celo2, convert_celo2, convert_celo])
        if rng.random() < 0.2:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        else:
            data = inputs[convert]
            for _ in range(rng.randint(1, 3)):
                data = mutate_bytes(data, rng, header_end=min(len(data), 200))
        checkpoint = tmp_path / "theta.state"
        checkpoint.write_bytes(data)
        out = tmp_path / "converted"
        shutil.rmtree(out, ignore_errors=True)
        write = rng.random() < 0.25
        label = f"converter case {case} (seed {seed}, {convert.__name__}, {len(data)} bytes)"
        model = run_case(label, lambda: convert(checkpoint, out if write else None), (ArtifactError, FlaxMsgpackError),
                         outcome)
        if model is None:
            assert not out.exists(), f"{label}: a failed conversion left {out}"
        elif write:
            check_loaded(out, load_artifact(out), label, model.theta())
    return outcome


# ===================================================================================== tests


def run_all(originals: dict[str, Path], tmp_path: Path, scale: int, seed: int) -> dict[str, Outcome]:
    counts = {name: count * scale for name, count in FAST_CASES.items()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes = {
        "safetensors": fuzz_file_bytes(originals, tmp_path, "model.safetensors", counts["safetensors"], seed),
        "config_bytes": fuzz_file_bytes(originals, tmp_path, "config.json", counts["config_bytes"], seed + 1),
        "config_values": fuzz_config_values(originals, tmp_path, counts["config_values"], seed + 2),
        "links": fuzz_links(originals, tmp_path, counts["links"], seed + 3),
        "converter": fuzz_converters(tmp_path, counts["converter"], seed + 4),
    }
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < MAX_EXTRA_MEMORY_BYTES, f"the fuzz cases raised peak memory by {grown / 2**30:.1f} GiB"
    return outcomes


def test_fuzz_untrusted_input(originals: dict[str, Path], tmp_path: Path) -> None:
    outcomes = run_all(originals, tmp_path, scale=1, seed=0)
    # Not vacuous: each family both refused inputs and (bytes aside, where nearly all are refused) loaded some.
    assert all(outcome.refused > 0 for outcome in outcomes.values()), {k: vars(v) for k, v in outcomes.items()}
    for name in ("config_values", "links", "converter"):
        assert outcomes[name].loaded > 0, {k: vars(v) for k, v in outcomes.items()}
    assert sum(o.loaded + o.refused for o in outcomes.values()) == sum(FAST_CASES.values())
    assert math.isfinite(sum(o.loaded for o in outcomes.values()))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [100, 200])
def test_fuzz_untrusted_input_long(originals: dict[str, Path], tmp_path: Path, seed: int) -> None:
    run_all(originals, tmp_path, scale=10, seed=seed)
