"""From a meta-training checkpoint to a Hub artifact (and optionally to the Hub).

``export_checkpoint(checkpoint_dir, out_dir)`` writes the artifact folder::

    config.json          rule, hyper-parameters, optimizer defaults, provenance: the meta-training
                         summary and the full config (provenance.meta_training), evaluation
                         (description, the lopt-hf eval table, summary numbers)
    model.safetensors    theta of that checkpoint
    README.md            model card (lopt_hf/templates/model_card.md): YAML metadata, usage,
                         Celo2-style meta-training table, meta-loss plot, evaluation
    meta_loss.png        meta-loss curve, referenced by the card
    evaluation.png       (when evaluated) training curves of the config's evaluation tasks
                         (lopt_hf.evaluation): learned vs its random init θ₀ vs AdamW

The evaluation is ``lopt_hf.evaluation`` (``lopt-hf eval``, see :mod:`lopt_hf.publish.card_evaluation`),
so every card shows the same table as it; the push is :func:`lopt_hf.publish.push.push_artifact_folder`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..hub import LearnedOptimizerModel, create_artifact, staged_folder
from ..metatrain.checkpoint import read_theta, read_trainer_state
from ..metatrain.config import MetaTrainConfig, TaskSection, config_from_dict
from ..plotting import plot_meta_loss
from ..rules import build_rule
from .card_evaluation import evaluate_for_card
from .push import push_artifact_folder

__all__ = ["export_checkpoint", "meta_training_provenance", "run_description", "hub_base_model",
           "describe_rule_architecture", "format_duration", "parse_duration", "META_LOSS_PLOT", "EVALUATION_PLOT"]

META_LOSS_PLOT = "meta_loss.png"
EVALUATION_PLOT = "evaluation.png"
ESTIMATOR_TITLES = {
    "pes": "Persistent Evolution Strategies (PES)",
    "es": "Evolution Strategies (ES), full unrolls",
    "truncated_es": "Truncated Evolution Strategies",
    "full_bptt": "Backpropagation through time (full unrolls)",
    "truncated_bptt": "Truncated backpropagation through time",
}


# ================================================================================ export


def export_checkpoint(checkpoint_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      evaluate: bool | None = None, push_to_hub: str | None = None, progress: bool = False,
                      license: str | None = None, base_model: str | None = None) -> LearnedOptimizerModel:
    """Write the artifact folder of a checkpoint (see the module docstring) and return the artifact.

    Args:
        checkpoint_dir: a ``<run>/checkpoints/step-…`` folder.
        out_dir: the artifact folder (created; existing files of the same names are replaced, all or nothing:
            a failure leaves it as it was, or no folder).
        evaluate: run the config's evaluation (:func:`evaluate_for_card`) for the card;
            ``None``: when the config asks for it (``evaluation.steps > 0``).
        push_to_hub: also publish the folder to this Hub repo id.
        progress: show the evaluation's tqdm bar.
        license, base_model: the card's license and base model (default: the config's ``card`` section;
            ``base_model`` also defaults to ``rule.init_from`` when that is a Hub repo id).
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = read_trainer_state(checkpoint_dir)
    config = config_from_dict(state["config"], source=f"{checkpoint_dir}/trainer_state.json", stored=True)
    theta = read_theta(checkpoint_dir)
    out = Path(out_dir)
    # All or nothing: everything is written into a staging folder first, which then replaces the files of the
    # same names in out_dir (or becomes out_dir); a failure anywhere (the evaluation, a plot, a folder in the
    # way) leaves out_dir as it was, or no out_dir.
    with staged_folder(out) as staging:
        artifact = _write_export(checkpoint_dir, staging, config, state, theta, evaluate=evaluate,
                                 progress=progress, license=license, base_model=base_model)
    if push_to_hub:
        push_artifact_folder(out, push_to_hub)
    return artifact


def _write_export(checkpoint_dir: Path, out: Path, config: MetaTrainConfig, state: Mapping[str, Any],
                  theta: dict[str, Any], *, evaluate: bool | None, progress: bool, license: str | None,
                  base_model: str | None) -> LearnedOptimizerModel:
    """Write the plots, the artifact and its card into the (staging) folder ``out``; returns the artifact."""
    history = state.get("history") or {}
    has_curve = bool(history.get("meta_loss"))
    if has_curve:
        plot_meta_loss(history, out / META_LOSS_PLOT, title=f"{config.name}: meta-loss")
    provenance = meta_training_provenance(config, state, plot=META_LOSS_PLOT if has_curve else None)
    if license:
        provenance["license"] = license
    if base_model:
        provenance["base_model"] = base_model
    provenance["source"] = f"lopt_hf meta-training, checkpoint {checkpoint_dir.name} of run {config.name!r}"
    artifact = create_artifact(config.rule.name, theta=theta, rule_config=config.rule.config, provenance=provenance)

    if evaluate is None:
        evaluate = config.evaluation.steps > 0
    if evaluate:
        evaluation = evaluate_for_card(artifact, config, plot_path=out / EVALUATION_PLOT, progress=progress)
        artifact.config.provenance = {**artifact.config.provenance, "evaluation": evaluation}
    artifact.save_pretrained(out)
    return artifact


def meta_training_provenance(config: MetaTrainConfig, state: Mapping[str, Any], *,
                             plot: str | None = META_LOSS_PLOT) -> dict[str, Any]:
    """The provenance of an exported artifact: card fields plus ``meta_training`` (summary, plot, config)."""
    rule = build_rule(config.rule.name, **config.rule.config)
    estimator = config.estimator
    history = state.get("history") or {}
    losses = [value for value in history.get("meta_loss", []) if isinstance(value, (int, float))]
    datasets = _image_datasets(config)
    step = int(state.get("step", 0))
    truncated = estimator.name in ("pes", "truncated_es", "truncated_bptt")
    summary: dict[str, Any] = {
        "Update rule": f"`{config.rule.name}`",
        "Optimizer architecture": describe_rule_architecture(rule),
        "Meta-training tasks": _describe_tasks(config),
        "Task architecture": _describe_task_models(config, state.get("extra") or {}),
        "Meta-trainer": ESTIMATOR_TITLES.get(estimator.name, estimator.name) + _describe_lolo(config.lolo),
        "Task slots per outer step": (f"{estimator.num_tasks}"
                                      + (f" × {estimator.num_antithetic} antithetic pair"
                                         f"{'s' if estimator.num_antithetic > 1 else ''}"
                                         if estimator.name in ("pes", "es", "truncated_es") else "")),
        "Outer iterations": _count(step) + ("" if step == config.outer_steps
                                            else f" (of {_count(config.outer_steps)} configured)"),
    }
    if truncated:
        summary["Truncation length"] = estimator.truncation_length
    summary["Min unroll length"] = estimator.min_unroll
    summary["Max unroll length"] = estimator.max_unroll
    if estimator.name in ("pes", "es", "truncated_es"):
        summary["Perturbation std"] = estimator.std
    meta = config.meta_optimizer
    summary["Meta-optimizer"] = (f"AdamW (lr {meta.lr:g}, weight decay {meta.weight_decay:g}"
                                 + (f", grad clip {meta.grad_clip:g}" if meta.grad_clip else "") + ")")
    summary["Processes"] = int(state.get("num_processes", 1))
    summary["Wall time"] = format_duration(float(state.get("elapsed_s", 0.0)))
    if losses:
        window = max(1, min(10, len(losses) // 5))
        summary["Meta-loss (first → last)"] = (
            f"{sum(losses[:window]) / window:.4f} → {sum(losses[-window:]) / window:.4f}"
            + (f" (means of {window} outer steps)" if window > 1 else ""))
    summary["Seed"] = config.seed

    meta_training: dict[str, Any] = {"summary": summary}
    if plot:
        meta_training["plot"] = plot
    meta_training["config"] = config.to_dict()
    card = config.card
    # What the run did comes from the run; the config's words only say what the optimizer is for.
    description = run_description(config, state)
    if card.description:
        description += "\n\n" + card.description.strip()
    tags = [*card.tags]
    for tag in ("meta-trained", estimator.name, *datasets):
        if tag not in tags:
            tags.append(tag)
    provenance = {"name": card.name or config.name, "description": description, "license": card.license,
                  "tags": tags, "meta_training": meta_training}
    if card.citation:
        provenance["citation"] = card.citation
    base_model = card.base_model or hub_base_model(config.rule.init_from)
    if base_model:
        provenance["base_model"] = base_model
    return provenance


SHORT_RUN_STEPS = 100  # fewer outer iterations than this: the card says to check the evaluation first


def run_description(config: MetaTrainConfig, state: Mapping[str, Any]) -> str:
    """The card's first paragraph, from what the run did: iterations, estimator, tasks, unrolls, time, processes."""
    estimator = config.estimator
    step = int(state.get("step", 0))
    processes = int(state.get("num_processes", 1))
    unrolls = (f"{estimator.min_unroll}-step" if estimator.min_unroll == estimator.max_unroll
               else f"{estimator.min_unroll}–{estimator.max_unroll}-step")
    truncated = (f", truncations of {estimator.truncation_length} steps"
                 if estimator.name in ("pes", "truncated_es", "truncated_bptt") else "")
    start, base = "from a random initialisation", config.card.base_model
    if config.rule.init_from:  # a local copy of the card's base model is named after it
        start = f"fine-tuned from `{config.rule.init_from}`"
        if base and base != config.rule.init_from:
            start = f"fine-tuned from `{base}` (read from `{config.rule.init_from}`)"
    of_configured = "" if step == config.outer_steps else f" (a checkpoint; the run was configured for " \
                                                          f"{_count(config.outer_steps)})"
    text = (f"Meta-trained by `lopt_hf` {start}: {_count(step)} outer iteration{'s' if step != 1 else ''}"
            f"{of_configured} of {ESTIMATOR_TITLES.get(estimator.name, estimator.name)}"
            f"{_describe_lolo(config.lolo)}, {estimator.num_tasks} task slot{'s' if estimator.num_tasks != 1 else ''} "
            f"per iteration, on {unrolls} training runs of {_describe_task_runs(config)}{truncated}; "
            f"{format_duration(float(state.get('elapsed_s', 0.0)))} of meta-training on {processes} "
            f"process{'es' if processes != 1 else ''}.")
    if step < SHORT_RUN_STEPS:
        text += (f" Only {step} outer iteration{'s' if step != 1 else ''}: check the evaluation "
                 f"(`lopt-hf eval --optimizers PATH`) before relying on it.")
    return text


def hub_base_model(init_from: str | None) -> str | None:
    """``init_from`` when it names a Hub repo (not a local folder or an optimizer shipped with lopt_hf), else None."""
    if not init_from or os.path.exists(os.path.expanduser(init_from)) or init_from.count("/") != 1:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..pretrained import pretrained_path

    if pretrained_path(init_from) is not None:
        return None
    try:
        validate_repo_id(init_from)
    except HFValidationError:
        return None
    return init_from


def _describe_lolo(lolo: Mapping[str, Any] | None) -> str:
    """`` + LoLO (...)`` for a LoLO run (replay buffer and behaviour cloning settings), else ``""``."""
    if not lolo:
        return ""
    parts = []
    if int(lolo.get("buffer_size", 0)) > 0:
        parts.append(f"replay buffer of {lolo['buffer_size']} inner states per task slot, "
                     f"P_th {lolo.get('p_threshold', 0.5):g}")
    if lolo.get("behaviour_cloning", True):
        parts.append(f"behaviour cloning of Adam (lr {float(lolo.get('expert_lr', 1e-3)):g})")
    return " + LoLO (" + "; ".join(parts) + ")" if parts else " + LoLO"


def describe_rule_architecture(rule: Any) -> str:
    """E.g. ``per-element MLP 3→32→2 (1 hidden layer of 32 units, 194 meta-parameters)``."""
    shapes = rule.theta_shapes()
    num = sum(math.prod(shape) for shape in shapes.values())
    biases = []
    index = 0
    while f"b{index}" in shapes and len(shapes[f"b{index}"]) == 1:
        biases.append(shapes[f"b{index}"][0])
        index += 1
    first_layer = [shape for name, shape in shapes.items() if name == "w0" or name.startswith("w0__")]
    if len(biases) < 2 or not first_layer or any(len(shape) != 2 for shape in first_layer):
        return f"{num:,} meta-parameters"
    inputs = sum(shape[0] for shape in first_layer)
    hidden = biases[:-1]
    widths = "→".join(str(width) for width in (inputs, *biases))
    if len(set(hidden)) == 1:
        layers = f"{len(hidden)} hidden layer{'s' if len(hidden) > 1 else ''} of {hidden[0]} units"
    else:
        layers = f"hidden layers {hidden}"
    return f"per-element MLP {widths} ({layers}, {num:,} meta-parameters)"


def _image_datasets(config: MetaTrainConfig) -> list[str]:
    """Every image dataset of the run, in order, once (tags and the card's words)."""
    return list(dict.fromkeys(name for task in config.task_sections() for name in task.datasets()))


def _text_name(task: TaskSection) -> str:
    if task.corpus:
        return f"Python's built-in {task.corpus} text"
    return os.path.basename(task.text_file or "") or "a text file"


def _describe_tasks(config: MetaTrainConfig) -> str:
    """The card's "Meta-training tasks" row: what kind of problems, on which data (each family of a mixture)."""
    sections = config.task_sections()
    rows = []
    for task in sections:
        datasets = task.datasets()
        if task.family == "char_lm":
            rows.append(f"character-level language modelling ({_text_name(task)})")
        elif len(sections) == 1:
            rows.append(f"{len(datasets)} image classification task{'s' if len(datasets) > 1 else ''} "
                        f"({', '.join(datasets)})")
        else:
            kind = "CNN" if task.family == "cnn_image" else "MLP"
            rows.append(f"{kind} classification of {', '.join(datasets)} at {task.image_size}×{task.image_size}")
    return rows[0] if len(rows) == 1 else "a mixture, task slots dealt in turn: " + "; ".join(rows)


def _describe_task_runs(config: MetaTrainConfig) -> str:
    """What the inner training runs trained, for the card's first paragraph."""
    runs = []
    for task in config.task_sections():
        if task.family == "char_lm":
            runs.append(f"character-level transformer language models on {_text_name(task)}")
        else:
            kind = "CNN" if task.family == "cnn_image" else "MLP"
            runs.append(f"{kind} classifiers of {', '.join(task.datasets())}")
    return " and ".join(runs) if len(runs) <= 2 else "; ".join(runs[:-1]) + "; and " + runs[-1]


def _describe_task_models(config: MetaTrainConfig, extra: Mapping[str, Any]) -> str:
    """The card's "Task architecture" row; ``extra``: a checkpoint's record of the task families it built."""
    families = [extra.get("task_family"), *(extra.get("extra_task_families") or [])]
    families += [None] * (len(config.task_sections()) - len(families))
    return "; ".join(_describe_task_model(task, family) for task, family in zip(config.task_sections(), families))


def _describe_task_model(task: TaskSection, family: Mapping[str, Any] | None) -> str:
    family = family if isinstance(family, Mapping) else {}
    classes = family.get("num_classes")
    if task.family == "char_lm":
        vocab = family.get("vocab_size")
        text = (f"transformer LM ({task.num_layers} layer{'s' if task.num_layers != 1 else ''}, width "
                f"{task.model_dim}, {task.num_heads} heads, context {task.context_length}"
                + (f", {vocab} characters" if vocab else "") + f"), batch {task.batch_size}")
    elif task.family == "cnn_image":
        text = (f"CNN (3×3 stride-2 convolutions of {'-'.join(str(c) for c in task.channels)} channels, global "
                f"average pool, linear head{f' to {classes} classes' if classes else ''}), {task.activation}, batch "
                f"{task.batch_size}, {task.image_size}×{task.image_size} grayscale images")
    else:
        widths = "-".join(str(width) for width in [task.image_size ** 2, *task.hidden_sizes]
                          + ([classes] if classes else []))
        text = (f"MLP ({widths}), {task.activation}, batch {task.batch_size}, "
                f"{task.image_size}×{task.image_size} grayscale images")
    if task.reparam_scale_range:
        low, high = task.reparam_scale_range
        text += f", parameter reparameterisation scale ∈ [{low:g}, {high:g}]"
    return text


def _count(value: int) -> str:
    if value >= 1000 and value % 1000 == 0:
        return f"{value // 1000}K"
    return f"{value:,}"


def format_duration(seconds: float) -> str:
    """``95.3`` → ``1 min 35 s``; ``7384`` → ``2 h 3 min``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 0.1:
        return "under 0.1 s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


_WORDS = {"under 0.1 s": 0.0, "unknown": math.nan}  # format_duration's two texts without a number
_UNITS = {"d": 86400.0, "h": 3600.0, "min": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """The seconds a :func:`format_duration` text stands for (``"17 min 43 s"`` → ``1063.0``); the inverse as far as
    the text goes, checked: a text that ``format_duration`` would not write back is a ``ValueError``."""
    seconds = _WORDS.get(text, sum(float(value) * _UNITS[unit]
                                   for value, unit in re.findall(r"([\d.]+) (d|h|min|s)\b", text)))
    if format_duration(seconds) != text:
        raise ValueError(f"not a duration written by format_duration: {text!r}")
    return seconds
