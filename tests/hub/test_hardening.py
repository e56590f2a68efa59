"""Adversarial artifacts (issue 19): links leaving the folder, values that destroy the model, bombs, odd JSON.

Every test here reproduces one hole the issue lists and checks it is closed: a clear
``ArtifactError`` naming the file (and the key), or — for the optimizer — no non-finite value
ever written into a parameter.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lopt_hf import ArtifactError, create_artifact, load_artifact

RULE = "per_param_mlp"


def saved(tmp_path: Path, rule: str = RULE, name: str = "artifact", **kwargs: Any) -> Path:
    directory = tmp_path / name
    create_artifact(rule, **kwargs).save_pretrained(directory)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def expect_error(directory: Path, filename: str, *needles: str, **load_kwargs: Any) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(directory, **load_kwargs)
    message = str(info.value)
    assert str(directory / filename) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ======================================================================= (1) links and folders


@pytest.mark.parametrize("filename", ["config.json", "model.safetensors"])
def test_symlinked_core_file_leaving_the_folder_is_refused(tmp_path: Path, filename: str) -> None:
    directory = saved(tmp_path)
    outside = saved(tmp_path, name="elsewhere")
    (directory / filename).unlink()
    (directory / filename).symlink_to(outside / filename)
    expect_error(directory, filename, "outside the artifact folder")


def test_symlink_inside_the_folder_and_a_symlinked_folder_still_load(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "weights.bin").write_bytes((directory / "model.safetensors").read_bytes())
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to("weights.bin")
    load_artifact(directory)
    (tmp_path / "alias").symlink_to(directory, target_is_directory=True)
    load_artifact(tmp_path / "alias")


def test_hub_cache_snapshot_folder_still_loads(tmp_path: Path) -> None:
    """huggingface_hub's cache links snapshot files to ../../blobs: loading such a folder stays allowed."""
    repo = tmp_path / "models--user--lopt"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    source = saved(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (repo / "blobs" / name).write_bytes((source / name).read_bytes())
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    load_artifact(snapshot)


def test_subfolder_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "root"
    directory.mkdir()
    saved(tmp_path, name="x")
    with pytest.raises(ArtifactError, match=r"subfolder='\.\./x'"):
        load_artifact(directory, subfolder="../x")
    (directory / "inner").symlink_to(tmp_path / "x", target_is_directory=True)
    with pytest.raises(ArtifactError, match="leading outside"):
        load_artifact(directory, subfolder="inner")
    saved(directory, name="real")
    load_artifact(directory, subfolder="real")


def test_push_refuses_a_card_image_linking_outside(tmp_path: Path, hub_env) -> None:
    from lopt_hf.publish.push import push_artifact_folder

    repo_id = hub_env.repo_id("x")
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET")
    directory = saved(tmp_path, provenance={"meta_training": {"plot": "meta_loss.png"}})
    (directory / "meta_loss.png").symlink_to(secret)
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        push_artifact_folder(directory, repo_id)
    assert not hub_env.server.files(repo_id)
    (directory / "meta_loss.png").unlink()
    (directory / "meta_loss.png").write_bytes(b"\x89PNG")
    push_artifact_folder(directory, repo_id)
    assert hub_env.server.files(repo_id)["meta_loss.png"] == b"\x89PNG"


def test_push_to_hub_extra_files_must_be_regular_files(tmp_path: Path, hub_env) -> None:
    repo_id = hub_env.repo_id("x")
    secret = tmp_path / "token"
    secret.write_text("hf_SECRET")
    (tmp_path / "plot.png").symlink_to(secret)
    artifact = create_artifact(RULE)
    with pytest.raises(ValueError, match="regular file|link"):
        artifact.push_to_hub(repo_id, extra_files={"plot.png": tmp_path / "plot.png"})
    with pytest.raises(ValueError, match="no '..'"):
        artifact.push_to_hub(repo_id, extra_files={"../plot.png": secret})
    assert not hub_env.server.files(repo_id)


def test_card_command_never_writes_through_a_symlinked_readme(tmp_path: Path) -> None:
    from lopt_hf.cli import main

    directory = saved(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (directory / "README.md").unlink()
    (directory / "README.md").symlink_to(victim)
    assert main(["card", str(directory)]) == 0
    assert victim.read_text() == "keep me"
    assert not (directory / "README.md").is_symlink()
    assert "library_name: lopt_hf" in (directory / "README.md").read_text()


# ============================================== (2)-(4) values: types, bounds, bombs, odd JSON


def _mutated(tmp_path: Path, rule: str, mutate: Any) -> Path:
    directory = saved(tmp_path, rule)
    config = read_config(directory)
    mutate(config)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("rule, mutate, needles", [
    # (2) values that pass as numbers but destroy the model or skip every step
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(lr=1e300), ["optimizer_defaults['lr']", "[0, 1000]"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(weight_decay=1e300),
     ["optimizer_defaults['weight_decay']"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(lr=100.0, weight_decay=0.5), ["lr * weight_decay"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(exp_mult=float("nan")), ["rule_config['exp_mult']", "finite"]),
    ("small_fc_lopt", lambda c: c["rule_config"].update(step_mult=float("nan")), ["rule_config['step_mult']"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "celo2", "adamw_eps": 0}), ["'harness'", "adamw_eps"]),
    # (3) sizes and iteration counts bounded before anything is allocated
    ("mlp_lopt", lambda c: c["rule_config"].update(hidden_layers=10**7), ["rule_config['hidden_layers']", "[0, 32]"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(hidden_layers=10**9), ["rule_config['hidden_layers']"]),
    ("celo2", lambda c: c["rule_config"].update(ns_iters=10**9), ["rule_config['ns_iters']", "[0, 100]"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(hidden_size=4096, hidden_layers=32), ["meta-parameters"]),
    ("per_param_mlp", lambda c: c["rule_config"].update(hidden_sizes=[8] * 1000), ["rule_config['hidden_sizes']"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(momentum_decays=[0.5] * 100), ["rule_config['momentum_decays']"]),
    ("opt2vec", lambda c: c["rule_config"].update(history_length=10**8), ["rule_config['history_length']"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "celo2", "embedding_patterns": [r"^(\w|\w)*$!"]}),
     ["'harness'", "embedding_patterns", "exponential"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "celo2", "embedding_patterns": [r"a*a*a*a*$!"]}),
     ["embedding_patterns", "more than two repetitions"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "celo2", "embedding_patterns": [r"(a+)+$"]}),
     ["embedding_patterns"]),
    # (4) wrong types are rejected, never coerced
    ("mlp_lopt", lambda c: c["rule_config"].update(momentum_decays=8.5), ["rule_config['momentum_decays']", "list"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(lr="0.001"), ["optimizer_defaults['lr']", "'0.001'"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(lr=True), ["optimizer_defaults['lr']"]),
    ("celo2", lambda c: c["rule_config"].update(orthogonalize="no"), ["rule_config['orthogonalize']", "true or false"]),
    ("celo2", lambda c: c["rule_config"].update(hidden_size=8.0), ["rule_config['hidden_size']", "integer"]),
    ("celo2", lambda c: c["rule_config"].update(hidden_size="8"), ["rule_config['hidden_size']"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(exp_mult="0.001"), ["rule_config['exp_mult']"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(exp_mult=10**400), ["rule_config['exp_mult']"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(momentum_decays=[0.9, "0.99"]),
     ["rule_config['momentum_decays'][1]"]),
    ("mlp_lopt", lambda c: c["rule_config"].update(momentum_decays=[0.9, 1.5]), ["decay in [0, 1]"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "lion"}), ["'harness'", "unknown harness type 'lion'"]),
    ("per_param_mlp", lambda c: c.update(harness={"type": "celo2", "mult_1d": "20"}), ["'harness'", "mult_1d"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(chunk_size=1), ["optimizer_defaults['chunk_size']"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(chunk_size=-5), ["optimizer_defaults['chunk_size']"]),
    ("per_param_mlp", lambda c: c["optimizer_defaults"].update(chunk_size="4096"),
     ["optimizer_defaults['chunk_size']"]),
], ids=["lr-1e300", "wd-1e300", "lr-times-wd", "exp_mult-nan", "step_mult-nan", "adamw_eps-0",
        "hidden_layers-1e7", "hidden_layers-1e9", "ns_iters-1e9", "theta-too-large", "hidden_sizes-long",
        "decays-long", "history_length-1e8", "pattern-alternation", "pattern-many-repeats", "pattern-nested",
        "decays-scalar", "lr-string", "lr-bool", "flag-string", "int-float", "int-string", "float-string",
        "float-huge-int", "decay-string", "decay-range", "harness-type", "harness-string", "chunk_size-1",
        "chunk_size-negative", "chunk_size-string"])
def test_bad_values_are_artifact_errors_naming_file_and_key(tmp_path: Path, rule: str, mutate: Any,
                                                             needles: list[str]) -> None:
    directory = _mutated(tmp_path, rule, mutate)
    expect_error(directory, "config.json", *needles)


def test_valid_chunk_sizes_still_load(tmp_path: Path) -> None:
    for chunk_size in (None, 4096, 32768):
        directory = _mutated(tmp_path / str(chunk_size), RULE,
                             lambda c: c["optimizer_defaults"].update(chunk_size=chunk_size))
        assert load_artifact(directory).config.optimizer_defaults["chunk_size"] == chunk_size


def test_valid_patterns_and_harness_still_load(tmp_path: Path) -> None:
    patterns = ["wte|wpe", r"^up\.weight$", r"embed_tokens|lm_head", r"layers\.\d+\.emb.*", r".*norm.*"]
    directory = _mutated(tmp_path, RULE, lambda c: c.update(harness={"type": "celo2", "embedding_patterns": patterns}))
    assert load_artifact(directory).config.harness["embedding_patterns"] == patterns


@pytest.mark.parametrize("text, needle", [
    ('{"a": ' * 1000 + "1" + "}" * 1000, "nested deeper than 64"),
    ('{"model_type": "learned_optimizer", "model_type": "learned_optimizer"}', "duplicate key 'model_type'"),
    ('{"format_version": ' + "9" * 4400 + "}", "not valid JSON"),
], ids=["deep", "duplicate-key", "huge-int"])
def test_odd_json_in_config_is_an_artifact_error(tmp_path: Path, text: str, needle: str) -> None:
    directory = saved(tmp_path)
    (directory / "config.json").write_text(text)
    expect_error(directory, "config.json", needle)


def _safetensors_with_header(header_text: str) -> bytes:
    header = header_text.encode()
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("header, needle", [
    ('{"x": ' * 1000 + "1" + "}" * 1000, "nested deeper than 64"),
    ('{"w0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
     '"w0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', "duplicate key 'w0'"),
    ('{"w0": ' + "9" * 4400 + "}", "not valid JSON"),
], ids=["deep", "duplicate-key", "huge-int"])
def test_odd_json_in_safetensors_header_is_an_artifact_error(tmp_path: Path, header: str, needle: str) -> None:
    directory = saved(tmp_path)
    (directory / "model.safetensors").write_bytes(_safetensors_with_header(header))
    expect_error(directory, "model.safetensors", needle)


def test_invalid_harness_is_refused_by_load_artifact_and_push(tmp_path: Path, hub_env) -> None:
    from lopt_hf.publish.push import push_artifact_folder

    repo_id = hub_env.repo_id("x")
    directory = _mutated(tmp_path, RULE, lambda c: c.update(harness={"type": "celo2", "adamw_betas": [0.9, 2.0]}))
    expect_error(directory, "config.json", "adamw_betas")
    with pytest.raises(ArtifactError, match="adamw_betas"):
        push_artifact_folder(directory, repo_id)
    assert not hub_env.server.files(repo_id)


# ============================================== (2) the optimizer never writes a non-finite value


@pytest.mark.parametrize("rule", ["per_param_mlp", "small_fc_lopt", "mlp_lopt", "celo2"])
@pytest.mark.parametrize("lr, weight_decay", [(1e300, 0.0), (1.0, 1e300), (3.0, 1e38)])
def test_overflowing_lr_times_step_is_skipped_and_counted(rule: str, lr: float, weight_decay: float) -> None:
    from lopt_hf import build_rule
    from lopt_hf.optim import LearnedOptimizer

    built = build_rule(rule)
    torch.manual_seed(0)
    # |param| >= 1.5: with lr * weight_decay = 3e38 every decayed element overflows float32
    params = [torch.nn.Parameter(2.0 + 0.1 * torch.randn(5, 4)) for _ in range(3)]
    before = [param.detach().clone() for param in params]
    for param in params:
        param.grad = torch.randn_like(param)
    opt = LearnedOptimizer(params, built, built.init_theta(torch.Generator().manual_seed(0)), lr=lr,
                           weight_decay=weight_decay)
    opt.step()
    assert all(torch.isfinite(param).all() for param in params)
    assert opt.num_skipped_nonfinite == 3
    assert opt.last_step_stats()["skipped_nonfinite_tensors"] == 3
    assert all(torch.equal(param.detach(), old) for param, old in zip(params, before))
    assert all(opt.state[param]["step"] == 0 for param in params)
    accumulators = [value for param in params for value in opt.state[param].values() if isinstance(value, torch.Tensor)]
    if opt.kernel_on(params[0].device).in_place(params[0].numel()):
        # an in-place kernel advanced them with the finite gradient while computing the step (see lopt_hf.optim)
        assert all(torch.isfinite(value).all() for value in accumulators)
    else:  # the rule's own update: they stay as they were
        assert all(torch.equal(value, torch.zeros_like(value)) for value in accumulators)


# ============================================================== (5) integrity: the weights' sha256


def test_config_records_the_weights_sha256_and_load_verifies_it(tmp_path: Path) -> None:
    import hashlib

    directory = saved(tmp_path)
    weights = (directory / "model.safetensors").read_bytes()
    assert read_config(directory)["provenance"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    load_artifact(directory).save_pretrained(tmp_path / "again")  # a re-save records the same digest
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    assert read_config(tmp_path / "again")["provenance"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()

    flipped = bytearray(weights)
    flipped[-3] ^= 0x01  # a data byte: still a valid, finite float32 theta
    (directory / "model.safetensors").write_bytes(bytes(flipped))
    expect_error(directory, "model.safetensors", "sha256 mismatch", "weights_sha256")
    from transformers import AutoModel

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        AutoModel.from_pretrained(directory)


def test_artifacts_without_a_recorded_sha256_still_load(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    config = read_config(directory)
    del config["provenance"]["weights_sha256"]
    (directory / "config.json").write_text(json.dumps(config))
    load_artifact(directory)
    config["provenance"]["weights_sha256"] = "not-a-digest"
    (directory / "config.json").write_text(json.dumps(config))
    expect_error(directory, "config.json", "provenance['weights_sha256']", "64 lowercase hex")


@pytest.mark.parametrize("lr, weight_decay", [(1e300, 0.0), (1.0, 1e300), (3.0, 1e38)])
def test_adamw_route_never_writes_a_non_finite_value(lr: float, weight_decay: float) -> None:
    from lopt_hf import build_rule
    from lopt_hf.optim import ADAMW_ROUTE, ROUTE_KEY, LearnedOptimizer

    built = build_rule(RULE)
    params = [torch.nn.Parameter(2.0 + 0.1 * torch.randn(6)) for _ in range(2)]
    before = [param.detach().clone() for param in params]
    for param in params:
        param.grad = torch.randn_like(param)
    opt = LearnedOptimizer([{"params": params, ROUTE_KEY: ADAMW_ROUTE}], built,
                           built.init_theta(torch.Generator().manual_seed(0)), lr=lr, weight_decay=weight_decay)
    opt.step()
    assert all(torch.equal(param.detach(), old) for param, old in zip(params, before))
    assert opt.num_skipped_nonfinite == 2


def test_deeply_nested_msgpack_is_an_artifact_error_in_the_converter(tmp_path: Path) -> None:
    from lopt_hf.convert.celo2 import convert_celo2

    checkpoint = tmp_path / "theta.state"
    checkpoint.write_bytes(b"\x81\xa1a" * 1020 + b"\x01")  # {"a": {"a": ... 1}} nested 1020 deep
    with pytest.raises(ArtifactError, match="nested deeper than 64"):
        convert_celo2(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_auto_classes_refuse_a_config_json_linking_outside(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    directory = saved(tmp_path)
    outside = saved(tmp_path, name="elsewhere")
    (directory / "config.json").unlink()
    (directory / "config.json").symlink_to(outside / "config.json")
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ArtifactError, match="outside the artifact folder"):
            load(str(directory))
    AutoModel.from_pretrained(str(outside))


# ====================================== (4) the harness from config.json: types, unknown keys, untyped dicts


@pytest.mark.parametrize("harness, needles", [
    ({"mult_1d": 20.0}, ["unknown harness type None"]),
    ({"type": ["celo2"]}, ["unknown harness type ['celo2']"]),
    ({"type": {}}, ["unknown harness type {}"]),
    ({"type": "celo2", "mult_1d": 20.0, "orthogonal": True}, ["no setting(s) ['orthogonal']"]),
    ({"type": "celo2", "embedding_patterns": "wte"}, ["embedding_patterns must be a list"]),
    ({"type": "celo2", "embedding_patterns": [1]}, ["embedding_patterns must be a list"]),
    ({"type": "celo2", "embedding_patterns": ["x"] * 65}, ["embedding_patterns must be a list of at most 64"]),
    ({"type": "celo2", "adamw_betas": ["0.9", 0.95]}, ["adamw_betas"]),
    ({"type": "celo2", "adamw_betas": [True, 0.95]}, ["adamw_betas"]),
    ({"type": "celo2", "adamw_betas": 0.9}, ["adamw_betas"]),
    ({"type": "celo2", "adamw_betas": [0.9, 0.95, 0.99]}, ["adamw_betas"]),
    ({"type": "celo2", "mult_1d": True}, ["mult_1d"]),
    ({"type": "celo2", "mult_1d": -1.0}, ["mult_1d", "[0, 10000]"]),
    ({"type": "celo2", "mult_1d": float("inf")}, ["mult_1d"]),
    ({"type": "celo2", "adamw_eps": "1e-8"}, ["adamw_eps"]),
    ({"type": "celo2", "adamw_eps": 2.0}, ["adamw_eps", "(0, 1]"]),
], ids=["untyped", "type-list", "type-object", "unknown-key", "patterns-string", "patterns-number", "patterns-65",
        "beta-string", "beta-bool", "betas-scalar", "betas-three", "mult-bool", "mult-negative", "mult-inf",
        "eps-string", "eps-range"])
def test_harness_is_type_and_range_checked_at_load(tmp_path: Path, harness: dict[str, Any],
                                                   needles: list[str]) -> None:
    directory = _mutated(tmp_path, RULE, lambda c: c.update(harness=harness))
    expect_error(directory, "config.json", "'harness'", *needles)


def test_harness_huge_integers_are_artifact_errors(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    config = read_config(directory)
    for key, text in (("mult_1d", "9" * 4000), ("adamw_betas", "[0.9, " + "9" * 4000 + "]")):
        config["harness"] = {"type": "celo2", key: 0}
        (directory / "config.json").write_text(json.dumps(config).replace(f'"{key}": 0', f'"{key}": {text}'))
        expect_error(directory, "config.json", "'harness'", key)


# ========================================= (4) AutoConfig's own JSON parsing gives load_artifact's errors


@pytest.mark.parametrize("text, needle", [
    ('{"model_type": "learned_optimizer", "x": ' + '{"a": ' * 1000 + "1" + "}" * 1001, "nested deeper than 64"),
    ('{"model_type": "learned_optimizer", "format_version": ' + "9" * 4400 + "}", "not valid JSON"),
    ('{"model_type": "bert", "model_type": "learned_optimizer"}', "duplicate key 'model_type'"),
    ("DUPLICATE_RULE", "duplicate key 'rule'"),
    ("HUGE", "above 16777216 bytes"),
], ids=["deep", "huge-int", "duplicate-model-type", "duplicate-rule", "too-large"])
def test_auto_classes_parse_config_json_as_load_artifact_does(tmp_path: Path, text: str, needle: str) -> None:
    from transformers import AutoConfig, AutoModel

    from lopt_hf.artifact_validation import MAX_CONFIG_BYTES

    directory = saved(tmp_path)
    valid = (directory / "config.json").read_text()
    if text == "DUPLICATE_RULE":
        text = valid.rstrip().removesuffix("}") + ', "rule": "mlp_lopt"}'
    elif text == "HUGE":
        text = valid.rstrip().removesuffix("}") + ', "pad": "' + " " * MAX_CONFIG_BYTES + '"}'
    (directory / "config.json").write_text(text)
    messages = []
    for load in (load_artifact, AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ArtifactError) as info:
            load(str(directory))
        messages.append(str(info.value))
    assert all(needle in message and str(directory / "config.json") in message for message in messages), messages
    assert messages[1] == messages[0] == messages[2]


def test_auto_classes_still_read_other_models_configs_as_transformers_does(tmp_path: Path) -> None:
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_layer": 2}')
    assert AutoConfig.from_pretrained(str(tmp_path)).n_layer == 2  # transformers' reading: the last key wins
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(RecursionError):  # not ours: transformers' own error, unchanged
        AutoConfig.from_pretrained(str(tmp_path))


def test_integer_values_of_float_hyperparameters_are_floats(tmp_path: Path) -> None:
    """Found by tests/hub/test_fuzz.py: exp_mult = 10**300 as a JSON integer loaded and the first step raised
    OverflowError (torch got a Python int beyond int64); JSON has one number type, so it is read as 1e300."""
    from lopt_hf import load_lopt

    directory = _mutated(tmp_path, "celo2", lambda c: c["rule_config"].update(exp_mult=10**300, grad_clip=10))
    artifact = load_artifact(directory)
    assert artifact.config.rule_config["exp_mult"] == 1e300 and isinstance(artifact.config.rule_config["grad_clip"],
                                                                           float)
    net = torch.nn.Linear(4, 3)
    optimizer = load_lopt(artifact, net)
    net(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(param).all() for param in net.parameters())
