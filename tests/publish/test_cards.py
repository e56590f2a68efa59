"""Model cards tell the truth: what the run did, license and base model, the papers of converted optimizers,
and a random initialisation that says it is one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lopt_hf import load_artifact
from lopt_hf.cli import main as cli_main
from lopt_hf.metatrain.config import load_config
from lopt_hf.model_card import render_model_card
from lopt_hf.publish.export import format_duration, hub_base_model, meta_training_provenance
from lopt_hf.publish.shipped_configs import shipped_configs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "refvectors"


def card_parts(text: str) -> tuple[dict, str]:
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def render(provenance: dict) -> str:
    return str(render_model_card(rule="per_param_mlp", rule_config={}, theta_shapes={"w0": (3, 2)},
                                 optimizer_defaults={"lr": 1.0}, harness=None, provenance=provenance,
                                 format_version=1))


def test_the_description_says_what_the_run_did() -> None:
    config = load_config(shipped_configs()["quickstart"], ["outer_steps=30", "estimator.min_unroll=5",
                                                            "estimator.max_unroll=9"])
    state = {"step": 30, "elapsed_s": 12.34, "num_processes": 2, "history": {"meta_loss": [1.0, 0.9]}}
    description = meta_training_provenance(config, state)["description"]
    facts, recipe = description.split("\n\n")
    assert facts.startswith("Meta-trained by `lopt_hf` from a random initialisation: 30 outer iterations of "
                            "Persistent Evolution Strategies (PES), 8 task slots per iteration, on 5–9-step training "
                            "runs of MLP classifiers of digits, truncations of 10 steps; 12.3 s of meta-training on "
                            "2 processes.")
    assert "Only 30 outer iterations: check the evaluation" in facts
    assert recipe.startswith("A small learned optimizer from the lopt_hf quickstart config")
    # an exported checkpoint that is not the run's end says so; a long run gets no warning
    state = {**state, "step": 200, "elapsed_s": 4000.0}
    facts = meta_training_provenance(load_config(shipped_configs()["quickstart"]), state)["description"]
    assert "200 outer iterations (a checkpoint; the run was configured for 400)" in facts
    assert "1 h 6 min of meta-training" in facts and "Only" not in facts
    assert format_duration(0.03) == "under 0.1 s"


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_config_descriptions_claim_no_run_facts(name: str) -> None:
    """Durations and unroll lengths come from the run (overrides change them), never from the config's words."""
    description = load_config(shipped_configs()[name]).card.description or ""
    assert not re.search(r"minute|hour|second|\bCPU core|\d+\s*[–-]\s*\d+[- ]step", description), description


def test_license_and_base_model() -> None:
    fine_tune = load_config(shipped_configs()["celo"])  # rule.init_from: amoudgl/celo, card.license: mit
    provenance = meta_training_provenance(fine_tune, {"step": 1})
    assert provenance["license"] == "mit" and provenance["base_model"] == "amoudgl/celo"
    assert "fine-tuned from `amoudgl/celo`" in provenance["description"]
    metadata, body = card_parts(render(provenance))
    assert metadata["base_model"] == "amoudgl/celo" and metadata["license"] == "mit"
    assert "[`amoudgl/celo`](https://huggingface.co/amoudgl/celo)" not in body  # no paper keys: no such section
    chosen = load_config(shipped_configs()["celo"], ["card.base_model=someone/base", "card.license=cc-by-4.0"])
    provenance = meta_training_provenance(chosen, {"step": 1})
    assert (provenance["base_model"], provenance["license"]) == ("someone/base", "cc-by-4.0")
    local = load_config(shipped_configs()["celo"],
                        ["rule.init_from=/tmp/converted_celo", "card.base_model=amoudgl/celo"])
    description = meta_training_provenance(local, {"step": 1})["description"]
    assert "fine-tuned from `amoudgl/celo` (read from `/tmp/converted_celo`)" in description
    assert hub_base_model("lopt-hf/small-fc-lolo") is None  # shipped with lopt_hf, not a Hub repo
    assert hub_base_model(str(FIXTURES)) is None and hub_base_model("not a repo/x") is None
    assert "base_model" not in meta_training_provenance(load_config(shipped_configs()["quickstart"]), {"step": 1})


@pytest.mark.parametrize("fmt, checkpoint, arxiv, title, weights, licence", [
    ("celo2", "celo2_theta0.state", "2602.19142", "Celo2: Towards Learned Optimization Free Lunch",
     "amoudgl/celo2", "mit"),
    ("celo", "celo_published_theta.state", "2501.12670", "Celo: Training Versatile Learned Optimizers on a Compute "
     "Diet", "amoudgl/celo", "mit"),
    ("celo-adam", "celo_adam_published_theta.state", "2501.12670", "Celo: Training Versatile Learned Optimizers on a "
     "Compute Diet", "amoudgl/celo-adam", "mit"),
    ("velo", "velo_4000_random_perturbed_theta.state", "2211.09760", "VeLO: Training Versatile Learned Optimizers "
     "by Scaling Up", "amoudgl/velo-4000", "apache-2.0"),
])
def test_converted_cards_link_the_paper(fmt: str, checkpoint: str, arxiv: str, title: str, weights: str,
                                        licence: str, tmp_path: Path) -> None:
    assert cli_main(["convert", fmt, str(FIXTURES / checkpoint), str(tmp_path / "out")]) == 0
    metadata, body = card_parts((tmp_path / "out" / "README.md").read_text())
    assert f"arxiv:{arxiv}" in metadata["tags"] and metadata["license"] == licence
    section = body.split("## Paper and licence\n\n", 1)[1].split("\n## ", 1)[0]
    assert f"- **Paper**: “{title}”, [arXiv {arxiv}](https://arxiv.org/abs/{arxiv})" in section
    assert "- **Authors**: " in section and "- **Original code**: [https://github.com/" in section
    assert f"- **Published weights**: [{weights}](https://huggingface.co/{weights})" in section
    assert f"- **License of this artifact**: `{licence}`" in section
    assert "| paper |" not in body  # shown in its section, not repeated in the provenance table


def test_a_created_random_theta_says_it_is_untrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["create", "small_fc_lopt", str(tmp_path / "a"), "--seed", "4"]) == 0
    assert "not a usable optimizer" in capsys.readouterr().out
    metadata, body = card_parts((tmp_path / "a" / "README.md").read_text())
    assert {"untrained", "random-init"} <= set(metadata["tags"])
    assert body.lstrip().startswith("# small_fc_lopt (untrained random initialisation, seed 4)\n\n"
                                    "**Untrained: a random initialisation, not a usable optimizer.**")
    assert "use it like any other optimizer" not in body
    assert load_artifact(tmp_path / "a").config.provenance["untrained"] is True
    # a trained artifact's card keeps the usual wording
    assert "use it like any other optimizer" in render({"description": "trained"})


def test_a_scheduled_rule_card_shows_the_planned_steps_and_the_loss(tmp_path) -> None:
    """Celo / VeLO cards: the quickstart calls set_total_steps and step(loss=...), and Trainer needs attach()."""
    from lopt_hf import create_artifact

    create_artifact("celo", seed=0).save_pretrained(tmp_path / "celo")
    create_artifact("small_fc_lopt", seed=0).save_pretrained(tmp_path / "plain")
    scheduled = (tmp_path / "celo" / "README.md").read_text()
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert "optimizer.set_total_steps(num_steps)" in scheduled and "optimizer.step(loss=loss)" in scheduled
    assert "LearnedOptimizerCallback.attach(trainer)" in scheduled
    assert "set_total_steps" not in plain and "optimizer.step()" in plain


# ------------------------------------------------ shipped cards re-rendered (package_pretrained --cards-only)

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_200 = ROOT / "docs" / "eval_published" / "steps200" / "results.json"


def package_pretrained_script():
    """``scripts/package_pretrained.py`` as a module (its ``main`` takes argv), run in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("package_pretrained", ROOT / "scripts" / "package_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_copy(root: Path, name: str) -> Path:
    """The shipped artifact and its evaluation reports, copied under ``root`` as the script lays them out."""
    import shutil

    shutil.copytree(ROOT / "lopt_hf" / "pretrained" / name, root / "lopt_hf" / "pretrained" / name)
    shutil.copytree(ROOT / "docs" / "pretrained" / name, root / "docs" / "pretrained" / name)
    return root / "lopt_hf" / "pretrained" / name


def test_cards_only_rebuilds_the_shipped_card_from_the_run_without_touching_theta(tmp_path: Path) -> None:
    """Re-rendering reproduces the shipped card exactly (so it is current), from config.json's recorded facts."""
    import json

    script = package_pretrained_script()
    folder = shipped_copy(tmp_path, "small-fc-lolo")
    shipped_card = (folder / "README.md").read_text(encoding="utf-8")
    weights = (folder / "model.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["provenance"]["description"] = "meta-trained in about a minute"  # a stale claim to be replaced
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "README.md").write_text("stale", encoding="utf-8")

    assert script.main(["small-fc-lolo", "--cards-only", "--root", str(tmp_path), "--results", str(PUBLISHED_200)]) == 0
    assert (folder / "model.safetensors").read_bytes() == weights
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card == shipped_card, ("shipped card is stale: run scripts/package_pretrained.py NAME --cards-only "
                                  "--results docs/eval_published/steps200/results.json")
    description = load_artifact(folder).config.provenance["description"]  # loads: the sha256 of theta holds
    assert "about a minute" not in description
    assert description.startswith("**A research baseline.**") and "17 min 43 s of meta-training on 1 process" in card
    # the held-out comparison takes the other report's tasks, with its figures
    assert "| mnist_mlp_wide | 200 | 1.731 | **0.270** (tuned lr 0.003) |" in card


def test_cards_only_refuses_what_does_not_describe_the_shipped_weights(tmp_path: Path) -> None:
    import json

    script = package_pretrained_script()
    folder = shipped_copy(tmp_path, "celo2-base-mini")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    other = json.loads(PUBLISHED_200.read_text(encoding="utf-8"))
    other["settings"]["optimizers"]["celo2-base-mini"] = "celo2-base-mini=/somewhere/else"
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    report = tmp_path / "docs" / "pretrained" / "celo2-base-mini" / "eval_200" / "results.json"
    own = json.loads(report.read_text(encoding="utf-8"))
    assert script.main(["celo2-base-mini", "--cards-only", "--root", str(tmp_path),
                        "--results", str(tmp_path / "other.json")]) == 2
    own["settings"]["checkpoint"] = "step-00000100"
    report.write_text(json.dumps(own), encoding="utf-8")
    assert script.main(["celo2-base-mini", "--cards-only", "--root", str(tmp_path)]) == 2
    assert script.main(["celo2-base-mini", str(tmp_path), "--cards-only", "--root", str(tmp_path)]) == 2
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_the_recorded_wall_time_is_read_back_exactly() -> None:
    script = package_pretrained_script()
    state = script.recorded_run_state({"Wall time": "17 min 43 s", "Processes": 2}, "step-00003000")
    assert state == {"step": 3000, "num_processes": 2, "elapsed_s": 1063.0}
    assert script.recorded_run_state({"Wall time": "2 h 3 min", "Processes": 1}, "step-00000010")["elapsed_s"] == 7380
    with pytest.raises(ValueError, match="wall time"):
        script.recorded_run_state({"Wall time": "a while", "Processes": 1}, "step-00000010")


def test_a_card_renders_the_same_from_a_saved_artifact_as_at_export(tmp_path: Path) -> None:
    """config.json stores keys sorted; the card builder shows the meta-training table and config in export's order."""
    import dataclasses

    from lopt_hf import create_artifact
    from lopt_hf.metatrain.config import MetaTrainConfig
    from lopt_hf.model_card import CONFIG_ORDER, SUMMARY_ORDER

    assert CONFIG_ORDER == tuple(field.name for field in dataclasses.fields(MetaTrainConfig))
    config = load_config(shipped_configs()["pretrained/small_fc_lolo"])
    provenance = meta_training_provenance(config, {"step": 3000, "elapsed_s": 5.0,
                                                   "history": {"meta_loss": [0.7, 0.2]}})
    assert tuple(provenance["meta_training"]["summary"]) == SUMMARY_ORDER  # every row export writes, in order
    artifact = create_artifact("small_fc_lopt", seed=0, provenance=provenance)
    artifact.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert card == str(load_artifact(tmp_path / "a").model_card())
    table = card.split("## Meta-training config", 1)[1]
    assert table.index("| **Update rule** |") < table.index("| **Wall time** |") < table.index("| **Seed** |")
    assert re.search(r"```yaml\nname: small_fc_lolo\nseed: 0\nouter_steps: 3000\nrule:\n", card)
