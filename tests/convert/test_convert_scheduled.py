"""``lopt-hf convert celo|celo-adam|velo``: the authors' flax ``theta.state`` → artifact that reproduces
the reference vectors, and refusal (one line, nothing written) of everything else."""

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
from lopt_hf.convert.checkpoint import recognise_tree
from lopt_hf.convert.foreign import convert_checkpoint, recognise_checkpoint
from lopt_hf.convert.flax_msgpack import flatten_tree, unpack_flax_msgpack
from lopt_hf.hub import load_artifact
from lopt_hf.load import load_lopt
from support import FIXTURES, PARAM_NAMES, load_refvectors, scheduled_refvector_steps, subtree

# reference stem → (convert format, rule, sizes the shapes must give)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "celo_published": ("celo", "celo", {"lstm_hidden_size": 64, "param_inits": 1}),
    "celo_random_perturbed": ("celo", "celo", {"lstm_hidden_size": 64, "param_inits": 1}),
    "celo_adam_published": ("celo-adam", "celo_adam", {"lstm_hidden_size": 64}),
    "celo_adam_random_perturbed": ("celo-adam", "celo_adam", {"lstm_hidden_size": 64}),
    "velo_s_random_perturbed": ("velo", "velo", {"lstm_hidden_size": 64, "param_inits": 32, "ff_mult": 1.0}),
    "velo_4000_random_perturbed": ("velo", "velo", {"lstm_hidden_size": 512, "param_inits": 256, "ff_mult": 100.0}),
}
CREDITS = {
    "celo": ("Moudgil", "Knyazev", "Lajoie", "Belilovsky", "TMLR 2025", "2501.12670", "MIT", "license: mit"),
    "celo-adam": ("Moudgil", "Knyazev", "Lajoie", "Belilovsky", "TMLR 2025", "2501.12670", "MIT", "license: mit"),
    "velo": ("Metz", "2211.09760", "Apache-2.0", "learned_optimization", "license: apache-2.0"),
}


def theta_file(stem: str) -> Path:
    return FIXTURES / f"{stem}_theta.state"


def assert_step_matches(step: torch.Tensor, params: torch.Tensor, params_out: torch.Tensor, msg: str) -> bool:
    """``step`` is the original's ``params − params_out`` to within one ulp of ``params_out`` plus a relative
    1e-4 (the original's jit-vs-eager noise). Returns whether the original's step was visible at all
    (velo_s's steps are often below one ulp of the parameters)."""
    implied = params.double() - params_out.double()
    ulp = (torch.nextafter(params_out.abs(), torch.tensor(float("inf"))) - params_out.abs()).double()
    excess = (step.double() - implied).abs() - (ulp + 1e-4 * implied.abs())
    assert excess.max() <= 0, f"{msg}: worst excess {excess.max().item():.3e}"
    return bool(implied.abs().max() > 0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every reference checkpoint converted through the command line."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for stem, (fmt, _, _) in CASES.items():
        folders[stem] = root / stem
        assert main(["convert", fmt, str(theta_file(stem)), str(folders[stem])]) == 0
    return folders


@pytest.mark.parametrize("stem", sorted(CASES))
def test_converted_artifact_reproduces_the_reference_vectors(stem: str, converted: dict[str, Path]) -> None:
    fmt, rule_name, sizes = CASES[stem]
    folder = converted[stem]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["rule"] == rule_name and config["harness"] is None
    assert {key: config["rule_config"][key] for key in sizes} == sizes
    assert config["optimizer_defaults"]["lr"] == 1.0

    artifact = load_artifact(folder)
    theta = artifact.theta()
    reference = subtree(load_refvectors(stem), "theta")
    assert theta.keys() == reference.keys()  # the haiku names verbatim
    assert all(torch.equal(theta[name], reference[name]) for name in theta)

    optimizer = load_lopt(folder, [torch.nn.Parameter(torch.zeros(3))])
    assert all(torch.equal(optimizer.theta[name], theta[name]) for name in theta)
    visible = 0
    for k, arrays, steps, states, _ in scheduled_refvector_steps(artifact.rule, stem, theta=theta):
        for index, name in enumerate(PARAM_NAMES):
            visible += assert_step_matches(steps[name], arrays[f"step{k}/params/{name}"],
                                           arrays[f"step{k}/params_out/{name}"], f"{stem} step {k} {name}")
            torch.testing.assert_close(states[name]["lstm_hidden"],
                                       arrays[f"step{k}/state/lstm_hidden_state/hidden"][index],
                                       rtol=1e-5, atol=5e-6, msg=f"{stem} step {k} {name} lstm")
    assert visible >= 6, visible  # most steps move the parameters: a zero step would not pass


@pytest.mark.parametrize("stem", ["celo_published", "celo_adam_published", "velo_4000_random_perturbed"])
def test_card_credits_the_authors_and_licence(stem: str, converted: dict[str, Path]) -> None:
    card = (converted[stem] / "README.md").read_text()
    for credit in CREDITS[CASES[stem][0]]:
        assert credit in card, credit
    assert "set_total_steps" in card and "loss" in card  # a scheduled rule says what it needs


def test_recognises_every_published_format() -> None:
    expected = {"celo_published": "celo", "celo_random_perturbed": "celo", "celo_adam_published": "celo-adam",
                "celo_adam_random_perturbed": "celo-adam", "velo_s_random_perturbed": "velo",
                "velo_4000_random_perturbed": "velo", "celo2_theta0": "celo2", "celo2_theta1": "celo2"}
    for stem, fmt in expected.items():
        assert recognise_checkpoint(theta_file(stem) if "celo2" not in stem else FIXTURES / f"{stem}.state") == fmt
    other = flatten_tree(unpack_flax_msgpack((FIXTURES / "small_fc_lopt_theta0_theta.state").read_bytes()))
    assert recognise_tree(other) is None
    with pytest.raises(ArtifactError, match="not a checkpoint lopt_hf can convert"):
        recognise_checkpoint(FIXTURES / "small_fc_lopt_theta0_theta.state")


def test_ff_mult_follows_the_size_unless_given(tmp_path: Path) -> None:
    small = convert_checkpoint("velo", theta_file("velo_s_random_perturbed"))
    assert small.config.rule_config["ff_mult"] == 1.0
    big = convert_checkpoint("velo", theta_file("velo_s_random_perturbed"), ff_mult=100.0)
    assert big.rule.ff_mult == 100.0
    assert main(["convert", "velo", str(theta_file("velo_s_random_perturbed")), str(tmp_path / "v"),
                 "--ff-mult", "3"]) == 0
    assert json.loads((tmp_path / "v" / "config.json").read_text())["rule_config"]["ff_mult"] == 3.0


# ------------------------------------------------------------------------------------------ refusals


def pack_flax(tree: Any) -> bytes:
    """Serialise like ``flax.serialization.to_bytes``: arrays as msgpack ext type 1."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True))
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=default, use_bin_type=True, strict_types=False)


def modified(stem: str, change) -> bytes:
    tree = unpack_flax_msgpack(theta_file(stem).read_bytes())
    change(tree)
    return pack_flax(tree)


BAD = {
    # (format asked for, bytes, expected text)
    "celo2 checkpoint as celo": ("celo", lambda: (FIXTURES / "celo2_theta1.state").read_bytes(),
                                 "it looks like a Celo2 checkpoint: use `lopt-hf convert celo2`"),
    "celo as celo-adam": ("celo-adam", lambda: theta_file("celo_published").read_bytes(),
                          "it looks like a Celo checkpoint"),
    "celo-adam as celo": ("celo", lambda: theta_file("celo_adam_published").read_bytes(),
                          "it looks like a Celo-Adam checkpoint"),
    "velo as celo": ("celo", lambda: theta_file("velo_s_random_perturbed").read_bytes(), "it looks like a VeLO"),
    "celo as velo": ("velo", lambda: theta_file("celo_published").read_bytes(), "rnn_params/linear/w: shape (18, 64)"),
    "celo as celo2": ("celo2", lambda: theta_file("celo_published").read_bytes(), "it looks like a Celo checkpoint"),
    "small_fc_lopt checkpoint": ("celo", lambda: (FIXTURES / "small_fc_lopt_theta0_theta.state").read_bytes(),
                                 "not a Celo checkpoint"),
    "truncated": ("celo", lambda: theta_file("celo_published").read_bytes()[:2000], "not a flax msgpack checkpoint"),
    "truncated velo": ("velo", lambda: theta_file("velo_s_random_perturbed").read_bytes()[:-7],
                       "not a flax msgpack checkpoint"),
    "random bytes": ("celo-adam", lambda: bytes(range(256)) * 5, "not a flax msgpack checkpoint"),
    "missing leaf": ("celo-adam", lambda: modified("celo_adam_published", lambda t: t["rnn_params"].pop("step_size")),
                     "missing rnn_params/step_size/w (shape (64, 1))"),
    "extra leaf": ("celo", lambda: modified("celo_published", lambda t: t["rnn_params"].update(
        extra={"w": np.zeros((2, 2), np.float32)})), "unexpected array rnn_params/extra/w (2, 2)"),
    "extra top-level tree": ("celo-adam", lambda: modified("celo_adam_published", lambda t: t.update(
        opt_state={"count": np.zeros((), np.int32)})), "not a Celo-Adam checkpoint"),
    "wrong shape": ("celo", lambda: modified("celo_published", lambda t: t["ff_mod_stack"]["~"].update(
        w0__3=np.zeros((1, 2, 4), np.float32))), "ff_mod_stack/~/w0__3: shape (1, 2, 4), expected (1, 3, 4)"),
    "inconsistent lstm size": ("celo-adam", lambda: modified("celo_adam_published", lambda t: t["lstm_init_state"].update(
        hidden=np.zeros((1, 32), np.float32))), "shape"),
    "non-finite": ("velo", lambda: modified("velo_s_random_perturbed", lambda t: t["rnn_params"]["step_size"].update(
        b=np.array([np.inf], np.float32))), "rnn_params/step_size/b: 1 non-finite value(s)"),
    "integer leaf": ("celo-adam", lambda: modified("celo_adam_published", lambda t: t["rnn_params"]["step_size"].update(
        b=np.zeros((1,), np.int32))), "expected floating point"),
    "not an array": ("celo", lambda: modified("celo_published", lambda t: t["lstm_init_state"].update(cell="x")),
                     "lstm_init_state/cell: not an array"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_rejects_anything_else_with_one_line_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:
    fmt, make, message = BAD[case]
    path = tmp_path / "theta.state"
    path.write_bytes(make())
    out = tmp_path / "out" / "artifact"
    assert main(["convert", fmt, str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lopt-hf convert: ") and str(path) in err
    assert message in err, err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no temporary folder left


def test_refuses_a_non_empty_out_dir_unless_forced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    source = str(theta_file("celo_adam_published"))
    assert main(["convert", "celo-adam", source, str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["convert", "celo-adam", source, str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert load_artifact(out).config.rule == "celo_adam"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "celo-adam", source, str(empty)]) == 0  # an empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temporary folder left


def test_options_of_another_format_are_refused(tmp_path: Path, capsys) -> None:
    assert main(["convert", "celo", str(theta_file("celo_published")), str(tmp_path / "a"),
                 "--variant", "celo2-base"]) == 2
    assert "--variant only applies" in capsys.readouterr().err
    assert main(["convert", "celo", str(theta_file("celo_published")), str(tmp_path / "a"), "--ff-mult", "2"]) == 2
    assert "--ff-mult only applies" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
