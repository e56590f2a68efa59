"""``lopt-hf convert celo2``: flax msgpack theta.state → artifact, and refusal of everything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from lopt_hf.artifact_validation import ArtifactError
from lopt_hf.cli import main
from lopt_hf.convert.celo2 import convert_celo2, read_celo2_theta
from lopt_hf.convert.flax_msgpack import flatten_tree, read_flax_msgpack, unpack_flax_msgpack
from lopt_hf.hub import load_artifact
from lopt_hf.rules.celo2 import HAIKU_PREFIX
from support import FIXTURES, load_refvectors as load, subtree


def pack_flax(tree: Any) -> bytes:
    """Serialise like ``flax.serialization.to_bytes``: arrays as msgpack ext type 1."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1, payload)
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=default, use_bin_type=True, strict_types=False)


def real_tree(theta_name: str = "theta1") -> dict[str, Any]:
    return unpack_flax_msgpack((FIXTURES / f"celo2_{theta_name}.state").read_bytes())


@pytest.mark.parametrize("theta_name", ["theta0", "theta1"])
def test_theta_matches_the_original(theta_name: str) -> None:
    theta, architecture = read_celo2_theta(FIXTURES / f"celo2_{theta_name}.state")
    assert architecture == {"hidden_size": 8, "hidden_layers": 2}
    # the reference vectors record the theta the original code ran with
    reference = {key[len(HAIKU_PREFIX):]: value
                 for key, value in subtree(load(f"celo2_base_{theta_name}"), "theta").items()}
    assert theta.keys() == reference.keys()
    for name, value in theta.items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[name]), name


def test_flax_reader_round_trip() -> None:
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "c": np.array([1, 2], dtype=np.int32)},
            "d": np.float64(2.5) * np.ones((1,))}
    back = unpack_flax_msgpack(pack_flax(tree))
    flat = flatten_tree(back)
    assert sorted(flat) == ["a/b", "a/c", "d"]
    np.testing.assert_array_equal(flat["a/b"], tree["a"]["b"])
    assert flat["a/c"].dtype == np.int32 and flat["d"].dtype == np.float64
    assert read_flax_msgpack(FIXTURES / "celo2_theta0.state")["ff_mod_stack"]["~"]["w1"].shape == (8, 8)


@pytest.mark.parametrize("variant", ["celo2", "celo2-base"])
def test_cli_writes_a_loadable_artifact_with_card(variant: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / variant
    assert main(["convert", "celo2", str(FIXTURES / "celo2_theta1.state"), str(out), "--variant", variant]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["rule"] == "celo2"
    assert config["rule_config"]["orthogonalize"] is (variant == "celo2")
    if variant == "celo2":
        assert config["harness"] == {"type": "celo2", "mult_1d": 20.0, "adamw_betas": [0.9, 0.95],
                                     "adamw_eps": 1e-8, "embedding_patterns": []}
    else:
        assert config["harness"] is None
    assert config["optimizer_defaults"]["lr"] == 1e-3
    artifact = load_artifact(out)
    theta, _ = read_celo2_theta(FIXTURES / "celo2_theta1.state")
    assert all(torch.equal(artifact.theta()[k], v) for k, v in theta.items())
    card = (out / "README.md").read_text()
    assert "license: mit" in card
    for credit in ("Moudgil", "Knyazev", "Belilovsky", "2602.19142", "MIT"):
        assert credit in card
    assert "wrote" in capsys.readouterr().out


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "theta.state"
    path.write_bytes(data)
    return path


def _modified(change) -> bytes:
    tree = real_tree()
    change(tree["ff_mod_stack"]["~"])
    return pack_flax(tree)


BAD_CHECKPOINTS = {
    "safetensors file": (lambda: (FIXTURES / "celo2_base_theta0.safetensors").read_bytes()[:4000],
                         "not a flax msgpack"),
    "random bytes": (lambda: bytes(range(256)) * 3, "not a flax msgpack"),
    "truncated": (lambda: (FIXTURES / "celo2_theta0.state").read_bytes()[:900], "not a flax msgpack"),
    "msgpack list": (lambda: msgpack.packb([1, 2, 3]), "msgpack map at the top"),
    "other tree": (lambda: pack_flax({"params": {"w": np.zeros((2, 2), np.float32)}}), "not a Celo2 checkpoint"),
    # a real flax checkpoint of another learned optimizer (learned_optimization's AdafacMLPLOpt)
    "small_fc_lopt checkpoint": (lambda: (FIXTURES / "small_fc_lopt_theta0_theta.state").read_bytes(),
                                 "not a Celo2 checkpoint"),
    "missing tensor": (lambda: _modified(lambda d: d.pop("w0__13")), "missing ff_mod_stack/~/w0__13"),
    "extra tensor": (lambda: _modified(lambda d: d.update(w9=np.zeros((8, 8), np.float32))), "w9"),
    "wrong shape": (lambda: _modified(lambda d: d.update(w0__3=np.zeros((2, 8), np.float32))),
                    "w0__3: shape (2, 8), expected (3, 8)"),
    "non-finite": (lambda: _modified(lambda d: d.update(w1=np.full((8, 8), np.nan, np.float32))), "non-finite"),
    "integer weights": (lambda: _modified(lambda d: d.update(b1=np.zeros((8,), np.int32))), "expected floating point"),
    "not an array": (lambda: _modified(lambda d: d.update(b2="hello")), "not an array"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_rejects_what_is_not_a_celo2_checkpoint(case: str, tmp_path: Path) -> None:
    make, message = BAD_CHECKPOINTS[case]
    path = _write(tmp_path, make())
    with pytest.raises(ArtifactError, match="not a") as info:
        convert_celo2(path, tmp_path / "out")
    assert message in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, b"\x00not msgpack at all")
    assert main(["convert", "celo2", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a flax msgpack checkpoint" in err


def test_float64_checkpoint_is_converted_to_float32(tmp_path: Path) -> None:
    tree = real_tree()
    stack = tree["ff_mod_stack"]["~"]
    for key in stack:
        stack[key] = stack[key].astype(np.float64)
    theta, _ = read_celo2_theta(_write(tmp_path, pack_flax(tree)))
    reference, _ = read_celo2_theta(FIXTURES / "celo2_theta1.state")
    assert all(theta[k].dtype == torch.float32 and torch.equal(theta[k], reference[k]) for k in reference)
