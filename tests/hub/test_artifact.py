"""The learned-optimizer artifact: save/load round trip, Auto classes, model card, and safe validated loading.

Every bad artifact must raise ONE ``ArtifactError`` naming the file and the problem; nothing is
ever unpickled. (Hub round trips live with the local Hub server tests.)
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import lopt_hf
from lopt_hf import (FORMAT_VERSION, ArtifactError, LearnedOptimizerConfig, LearnedOptimizerModel, available_rules,
                     build_rule, create_artifact, load_artifact)
from lopt_hf.loader_options import UnsafeLoadOptionError

RULE = "per_param_mlp"


# ------------------------------------------------------------------------------ helpers


def saved(tmp_path: Path, rule: str = RULE, **kwargs: Any) -> Path:
    """A valid artifact folder for ``rule``."""
    directory = tmp_path / f"artifact-{rule}"
    create_artifact(rule, **kwargs).save_pretrained(directory)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def write_config(directory: Path, config: Any) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def write_theta(directory: Path, theta: dict[str, torch.Tensor]) -> None:
    save_file(theta, str(directory / "model.safetensors"))


def valid_theta(rule: str = RULE) -> dict[str, torch.Tensor]:
    return build_rule(rule).init_theta(torch.Generator().manual_seed(0))


def expect_error(directory: Path, filename: str, *needles: str) -> ArtifactError:
    """Loading must fail with ArtifactError naming ``directory/filename`` and every needle."""
    with pytest.raises(ArtifactError) as info:
        load_artifact(directory)
    message = str(info.value)
    assert str(directory / filename) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return info.value


def theta_bits(theta: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: tensor.contiguous().view(torch.int32).numpy().tobytes() for name, tensor in theta.items()}


class MarkerPayload:
    """Unpickling this creates ``path`` — the proof that something got unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return open, (self.path, "w")


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("rule", available_rules())
def test_round_trip_every_rule(tmp_path: Path, rule: str) -> None:
    artifact = create_artifact(rule, seed=1, provenance={"source": "test"})
    artifact.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    loaded = load_artifact(tmp_path)
    assert isinstance(loaded, LearnedOptimizerModel)
    expected_names = list(build_rule(rule).theta_shapes())
    assert list(loaded.theta()) == expected_names
    assert list(loaded.state_dict()) == expected_names  # flat names, no prefix
    assert theta_bits(loaded.theta()) == theta_bits(artifact.theta())
    assert all(tensor.dtype == torch.float32 for tensor in loaded.theta().values())
    assert loaded.config.to_diff_dict() == artifact.config.to_diff_dict()
    for field in ("rule", "rule_config", "optimizer_defaults", "harness", "format_version", "provenance"):
        assert getattr(loaded.config, field) == getattr(artifact.config, field), field
    assert loaded.rule == artifact.rule == build_rule(rule)

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(expected_names)
        assert all(handle.get_tensor(name).dtype == torch.float32 for name in handle.keys())


@pytest.mark.parametrize("rule", available_rules())
def test_auto_classes_use_the_validated_loader(tmp_path: Path, rule: str) -> None:
    from transformers import AutoConfig, AutoModel

    artifact = create_artifact(rule, seed=2)
    artifact.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LearnedOptimizerConfig
    assert config.rule == rule and config.rule_config == build_rule(rule).hyperparameters()
    model = AutoModel.from_pretrained(tmp_path)
    assert type(model) is LearnedOptimizerModel
    assert theta_bits(model.theta()) == theta_bits(artifact.theta())  # not a random init


def test_auto_model_rejects_bad_theta_instead_of_random_init(tmp_path: Path) -> None:
    from transformers import AutoModel

    directory = saved(tmp_path)
    theta = valid_theta()
    del theta["b1"]
    write_theta(directory, theta)
    with pytest.raises(ArtifactError, match="missing tensor 'b1'"):
        AutoModel.from_pretrained(directory)


def test_auto_config_rejects_unknown_rule(tmp_path: Path) -> None:
    from transformers import AutoConfig

    directory = saved(tmp_path)
    write_config(directory, {**read_config(directory), "rule": "no_such_rule"})
    with pytest.raises(ArtifactError, match="unknown rule 'no_such_rule'") as info:
        AutoConfig.from_pretrained(directory)
    assert "config.json" in str(info.value)


def test_config_classmethod_from_pretrained(tmp_path: Path) -> None:
    directory = saved(tmp_path, rule_config={"activation": "tanh"})
    config = LearnedOptimizerConfig.from_pretrained(directory)
    assert config.rule == RULE and config.rule_config["activation"] == "tanh"
    write_config(directory, [1, 2])
    with pytest.raises(ArtifactError, match="JSON object"):
        LearnedOptimizerConfig.from_pretrained(directory)


def test_config_json_contents(tmp_path: Path) -> None:
    directory = saved(tmp_path, rule_config={"hidden_sizes": [16, 8]}, optimizer_defaults={"lr": 0.5},
                      provenance={"meta_training": {"estimator": "pes"}})
    config = read_config(directory)
    assert config["model_type"] == "learned_optimizer"
    assert config["rule"] == RULE
    assert config["format_version"] == FORMAT_VERSION == 1
    # every hyper-parameter, defaults included
    assert config["rule_config"] == build_rule(RULE, hidden_sizes=(16, 8)).hyperparameters()
    assert set(config["rule_config"]) == set(build_rule(RULE).hyperparameters())
    assert config["optimizer_defaults"] == {"lr": 0.5}
    assert config["harness"] is None
    provenance = config["provenance"]
    assert provenance["created_by"] == f"lopt_hf {lopt_hf.__version__}"
    assert provenance["created_at"] and provenance["source"].startswith("create_artifact")
    assert provenance["meta_training"] == {"estimator": "pes"}
    assert "auto_map" not in config
    assert config["architectures"] == ["LearnedOptimizerModel"]


def test_defaults_and_seeding() -> None:
    artifact = create_artifact(RULE)
    assert artifact.config.optimizer_defaults == {"lr": 1.0, "weight_decay": 0.0}
    assert theta_bits(create_artifact(RULE, seed=3).theta()) == theta_bits(create_artifact(RULE, seed=3).theta())
    assert theta_bits(create_artifact(RULE, seed=3).theta()) != theta_bits(create_artifact(RULE, seed=4).theta())
    expected = build_rule(RULE).init_theta(torch.Generator().manual_seed(3))
    assert theta_bits(create_artifact(RULE, seed=3).theta()) == theta_bits(expected)


def test_theta_returns_detached_clones() -> None:
    artifact = create_artifact(RULE)
    theta = artifact.theta()
    theta["w0"].add_(1.0)
    assert not torch.equal(theta["w0"], artifact.theta()["w0"])
    assert not any(tensor.requires_grad for tensor in artifact.theta().values())


def test_create_artifact_with_given_theta(tmp_path: Path) -> None:
    theta = {name: tensor.double() + 0.5 for name, tensor in valid_theta().items()}
    artifact = create_artifact(RULE, theta=theta, harness={"type": "celo2", "mult_1d": 10.0})
    assert all(tensor.dtype == torch.float32 for tensor in artifact.theta().values())
    torch.testing.assert_close(artifact.theta()["w0"], theta["w0"].float())
    artifact.save_pretrained(tmp_path)
    assert load_artifact(tmp_path).config.harness == {"type": "celo2", "mult_1d": 10.0}

    bad = dict(theta, w0=torch.zeros(3, 7))
    with pytest.raises(ArtifactError, match=r"tensor 'w0': shape \(3, 7\), expected \(3, 64\)"):
        create_artifact(RULE, theta=bad)
    with pytest.raises(ArtifactError, match="unknown rule 'nope'"):
        create_artifact("nope")
    with pytest.raises(ArtifactError, match="bogus"):
        create_artifact(RULE, rule_config={"bogus": 1})
    with pytest.raises(ArtifactError, match="lr"):
        create_artifact(RULE, optimizer_defaults={"lr": -1.0})


def test_save_refuses_non_finite_theta(tmp_path: Path) -> None:
    artifact = create_artifact(RULE)
    with torch.no_grad():
        artifact.state_dict()["w0"][0, 0] = float("nan")
    with pytest.raises(ArtifactError, match="non-finite"):
        artifact.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- model card


def card_metadata(directory: Path) -> tuple[dict[str, Any], str]:
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_model_card(tmp_path: Path) -> None:
    directory = saved(tmp_path, rule_config={"activation": "tanh"})
    metadata, body = card_metadata(directory)
    assert metadata["library_name"] == "lopt_hf"
    assert {"learned-optimizer", "lopt_hf", RULE} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"
    assert "from lopt_hf import load_lopt" in body and "load_lopt(" in body
    assert "| `activation` | tanh |" in body and "| `hidden_sizes` | [64] |" in body
    assert "| `w0` | (3, 64) |" in body
    assert "## Provenance" in body and "created_by" in body
    assert "## Meta-training config" not in body and "## Evaluation" not in body
    assert "transformers model that has been pushed" not in body

    from huggingface_hub import ModelCard

    assert ModelCard.load(directory / "README.md").data.library_name == "lopt_hf"


def test_model_card_meta_training_and_evaluation(tmp_path: Path) -> None:
    provenance = {
        "name": "tiny-lopt", "license": "mit", "tags": ["mnist"],
        "meta_training": {"estimator": "PES", "outer_iterations": 1000, "tasks": {"dataset": "digits"}},
        "evaluation": {"description": "Final training loss after 200 steps.",
                       "results": [{"task": "digits MLP", "lopt": 0.12, "AdamW": 0.15}],
                       "plot": "eval.png"},
        "citation": "@misc{x, title={X}}",
    }
    directory = saved(tmp_path, provenance=provenance)
    metadata, body = card_metadata(directory)
    assert metadata["license"] == "mit" and "mnist" in metadata["tags"]
    assert body.lstrip().startswith("# tiny-lopt")
    assert "## Meta-training config" in body
    assert "| estimator | PES |" in body and "| tasks.dataset | digits |" in body
    assert "## Evaluation" in body and "| task | lopt | AdamW |" in body and "| digits MLP | 0.12 | 0.15 |" in body
    assert "![evaluation](eval.png)" in body
    assert "@misc{x, title={X}}" in body


def test_push_to_hub_uploads_exactly_our_three_files(hub_env) -> None:
    """The real client against the local Hub: which files (and which README) go up, with the commit message."""
    repo_id = hub_env.repo_id("tiny-lopt")
    artifact = create_artifact(RULE)
    commit = artifact.push_to_hub(repo_id, commit_message="hi")
    head = hub_env.server.store.get("model", repo_id).head()
    assert head.sha == commit.oid and head.title == "hi"
    uploaded = hub_env.server.files(repo_id)
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    card = uploaded["README.md"].decode()
    assert "library_name: lopt_hf" in card and f'load_lopt("{repo_id}"' in card
    assert f"hf download {repo_id}" in card


# ---------------------------------------------------------------- bad config.json


@pytest.mark.parametrize("mutate, needles", [
    (lambda c: "{not json", ["not valid JSON"]),
    (lambda c: [c], ["JSON object", "array"]),
    (lambda c: {k: v for k, v in c.items() if k != "rule"}, ["missing 'rule'", RULE]),
    (lambda c: {**c, "rule": "no_such_rule"}, ["unknown rule 'no_such_rule'", "available rules", RULE]),
    (lambda c: {**c, "rule_config": {**c["rule_config"], "bogus": 1}}, ["no hyper-parameter", "bogus"]),
    (lambda c: {**c, "rule_config": {**c["rule_config"], "activation": "nope"}}, ["invalid rule_config", "nope"]),
    (lambda c: {**c, "format_version": FORMAT_VERSION + 1}, ["format_version 2 is newer", "upgrade lopt_hf"]),
    (lambda c: {k: v for k, v in c.items() if k != "format_version"}, ["missing format_version"]),
    (lambda c: {**c, "format_version": "1"}, ["format_version must be a positive integer"]),
    (lambda c: {**c, "model_type": "bert"}, ["model_type 'bert'", "learned_optimizer"]),
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, ["no model_type"]),
    (lambda c: {**c, "auto_map": {"AutoModel": "evil.Model"}}, ["auto_map", "never ship code"]),
    (lambda c: {**c, "rule_confg": {}}, ["unknown key(s) ['rule_confg']"]),
    (lambda c: {**c, "optimizer_defaults": {"lr": -1}}, ["optimizer_defaults['lr']"]),
    (lambda c: {**c, "harness": [1]}, ["'harness' must be a JSON object"]),
], ids=["not-json", "json-list", "missing-rule", "unknown-rule", "unknown-hyperparameter", "bad-hyperparameter",
        "newer-format", "missing-format", "format-not-int", "wrong-model-type", "missing-model-type", "auto-map",
        "unknown-key", "negative-lr", "harness-not-dict"])
def test_bad_config(tmp_path: Path, mutate: Callable[[dict[str, Any]], Any], needles: list[str]) -> None:
    directory = saved(tmp_path)
    bad = mutate(read_config(directory))
    (directory / "config.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    expect_error(directory, "config.json", *needles)


def test_missing_config(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "config.json").unlink()
    expect_error(directory, "config.json", "missing file")


def test_not_a_folder_nor_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such local folder"):
        load_artifact(str(tmp_path / "does" / "not" / "exist"), local_files_only=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        load_artifact(tmp_path / "file")


# ---------------------------------------------------------------- bad model.safetensors


def _valid_bytes() -> bytes:
    from safetensors.torch import save

    return save(valid_theta())


@pytest.mark.parametrize("content, needles", [
    (b"", ["truncated or not a safetensors file: 0 bytes"]),
    (b"\x01\x02\x03", ["3 bytes"]),
    (bytes(range(256)) * 4, ["header length field says"]),  # random bytes: absurd header length
    (struct.pack("<Q", 10_000) + b'{"w0": {}}', ["header length field says 10000 bytes", "only 10 bytes"]),
    (struct.pack("<Q", 8) + b"\xff" * 8, ["header is not valid JSON"]),
    (struct.pack("<Q", 2) + b"[]", ["not an object"]),
    (_valid_bytes()[:-100], ["truncated"]),
    (_valid_bytes()[:200], ["truncated"]),
    (_valid_bytes() + b"\0" * 16, ["trailing garbage"]),
], ids=["empty", "tiny", "random-bytes", "lying-header-length", "header-not-json", "header-list",
        "truncated-data", "truncated-header", "trailing-bytes"])
def test_corrupt_safetensors(tmp_path: Path, content: bytes, needles: list[str]) -> None:
    directory = saved(tmp_path)
    (directory / "model.safetensors").write_bytes(content)
    expect_error(directory, "model.safetensors", *needles)


def test_random_bytes_safetensors(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        content = torch.randint(0, 256, (int(torch.randint(0, 4096, (1,), generator=generator)),),
                                generator=generator, dtype=torch.uint8).numpy().tobytes()
        (directory / "model.safetensors").write_bytes(content)
        expect_error(directory, "model.safetensors")


def test_header_entry_offsets_lie(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    data = bytearray((directory / "model.safetensors").read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["w0"]["data_offsets"][1] += 4  # one element too many for its shape
    new_header = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(new_header) == header_len
    data[8:8 + header_len] = new_header
    (directory / "model.safetensors").write_bytes(bytes(data))
    expect_error(directory, "model.safetensors", "'w0'")


@pytest.mark.parametrize("edit, needles", [
    (lambda t: {**t, "extra": torch.zeros(2)}, ["unexpected tensor 'extra'"]),
    (lambda t: {k: v for k, v in t.items() if k != "b1"}, ["missing tensor 'b1'", "(2,)"]),
    (lambda t: {**t, "w0": torch.zeros(3, 32)}, ["tensor 'w0': shape (3, 32), expected (3, 64)"]),
    (lambda t: {**t, "w1": t["w1"].double()}, ["tensor 'w1': dtype float64 (F64), expected float32"]),
    (lambda t: {**t, "w1": t["w1"].half()}, ["tensor 'w1': dtype float16 (F16), expected float32"]),
    (lambda t: {**t, "w0": t["w0"].index_fill(1, torch.tensor([0]), float("nan"))},
     ["tensor 'w0' has 3 non-finite value(s)", "3 NaN, 0 inf"]),
    (lambda t: {**t, "b0": t["b0"].index_fill(0, torch.tensor([1, 5]), float("inf"))},
     ["tensor 'b0' has 2 non-finite value(s)", "0 NaN, 2 inf"]),
    (lambda t: {"extra": torch.zeros(1), "w0": torch.zeros(3, 2), "b0": t["b0"].double(), "w1": t["w1"]},
     ["unexpected tensor 'extra'", "missing tensor 'b1'", "'w0': shape (3, 2)", "'b0': dtype float64"]),
], ids=["extra-tensor", "missing-tensor", "wrong-shape", "float64", "float16", "nan", "inf", "several"])
def test_theta_mismatch(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                        needles: list[str]) -> None:
    directory = saved(tmp_path)
    write_theta(directory, edit(valid_theta()))
    error = expect_error(directory, "model.safetensors", *needles)
    assert isinstance(error, ValueError)


def test_theta_must_match_the_configured_hyperparameters(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    write_config(directory, {**read_config(directory), "rule_config": {"hidden_sizes": [8]}})
    expect_error(directory, "model.safetensors", "shape (3, 64), expected (3, 8)")


def test_missing_weights(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    expect_error(directory, "model.safetensors", "missing file")


# ------------------------------------------------------------------------ no unpickling


def test_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(MarkerPayload(probe)))
    assert probe.exists()  # so the marker below would appear if anything unpickled our files


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    from transformers import AutoModel

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(MarkerPayload(marker))
    directory = saved(tmp_path)
    for name in ("pytorch_model.bin", "optimizer.pt", "theta.pkl"):
        (directory / name).write_bytes(payload)

    # A valid artifact with pickles next to it: the pickles are ignored.
    load_artifact(directory)
    AutoModel.from_pretrained(directory)
    assert not marker.exists()

    # Without model.safetensors there is no fallback to pytorch_model.bin.
    weights = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").unlink()
    expect_error(directory, "model.safetensors", "missing file")
    with pytest.raises(ArtifactError):
        AutoModel.from_pretrained(directory)
    with pytest.raises(ArtifactError):
        AutoModel.from_pretrained(directory, use_safetensors=None, trust_remote_code=False)
    with pytest.raises(UnsafeLoadOptionError):
        AutoModel.from_pretrained(directory, use_safetensors=False)
    assert not marker.exists()

    # A pickle disguised as model.safetensors is rejected as corrupt.
    (directory / "model.safetensors").write_bytes(payload)
    expect_error(directory, "model.safetensors")
    assert not marker.exists()
    (directory / "model.safetensors").write_bytes(weights)
    load_artifact(directory)
    assert not marker.exists()
