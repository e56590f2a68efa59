"""Meta-training configuration: a YAML file → a typed, validated :class:`MetaTrainConfig`.

A config is a YAML mapping with the sections below (every key optional; defaults shown by
``MetaTrainConfig()``)::

    name: quickstart              # run name: default output_dir is runs/<name>
    seed: 0
    outer_steps: 300
    rule:            {name: per_param_mlp, config: {hidden_sizes: [32]}, init_from: null}
    task:            {family: mlp_image, dataset: digits, hidden_sizes: [32], batch_size: 128, image_size: 8, ...}
    extra_tasks:     []            # more families in the same run, e.g. [{family: char_lm, corpus: python_docs}]
    estimator:       {name: pes, num_tasks: 8, truncation_length: 10, min_unroll: 50, max_unroll: 100, std: 0.01,
                      final_fraction: 1.0}   # PES: meta-loss over the last final_fraction of each trajectory
    meta_optimizer:  {lr: 0.003, weight_decay: 0.0, grad_clip: 1.0,
                      frozen: []}   # theta keys / key prefixes held fixed, e.g. [ff_mod_stack/] (Celo's phase 2)
    checkpoint_every: 50
    keep_checkpoints: 2
    log_every: 10
    output_dir: null              # default runs/<name>
    push_to_hub: null             # a Hub repo id to publish the final artifact to
    card:            {name: ..., description: ..., license: apache-2.0, base_model: null, tags: [...], citation: ...}
    evaluation:      {steps: 200, tasks: [digits_mlp], ...}   # post-training evaluation for the model card
    lolo: null                    # LoLO (PES only; one family or a mixture): {buffer_size: 4, p_threshold: 0.5, behaviour_cloning: true, expert_lr: 0.001}

The schema is the dataclasses below (the ``estimator:`` section reuses
:class:`~lopt_hf.metatrain.estimators.EstimatorOptions`, so YAML runs and direct estimator calls
share one set of defaults); ``dacite`` builds them from the parsed YAML, strictly. Unknown keys
are errors naming the key (``estimator.num_task: unknown key; did you mean 'num_tasks'?``),
values are checked against the field types, and any value can be overridden from the command
line with ``--set estimator.num_tasks=8`` or ``--estimator.num_tasks 8`` (values are parsed as
YAML, so ``--set task.hidden_sizes=[64,32]`` works).

The names in ``evaluation.tasks`` are checked where the evaluation runs
(``lopt_hf.publish``): meta-training does not depend on the evaluation harness.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import dacite
import yaml

from .estimators import EstimatorOptions

__all__ = ["ConfigError", "MetaTrainConfig", "RuleSection", "TaskSection", "EstimatorSection",
           "MetaOptimizerSection", "CardSection", "EvaluationSection", "load_config", "config_from_dict",
           "config_to_dict", "apply_overrides", "parse_override", "ESTIMATOR_NAMES", "REMOVED_KEYS",
           "TASK_FAMILY_CHOICES"]

ESTIMATOR_NAMES = ("full_bptt", "truncated_bptt", "es", "truncated_es", "pes")
# task.family values (tasks.TASK_FAMILY_NAMES less the test-only linear_regression, which has no options here)
TASK_FAMILY_CHOICES = ("mlp_image", "cnn_image", "char_lm")


class ConfigError(ValueError):
    """An invalid meta-training config: unknown key, wrong type or out-of-range value."""


# =============================================================================== sections


@dataclass
class RuleSection:
    """The update rule being meta-trained (``lopt_hf.available_rules()``).

    ``init_from``: an artifact (local folder or Hub repo id, e.g. a converted published Celo
    checkpoint) whose theta meta-training starts from instead of ``rule.init_theta`` — to fine-tune
    published weights. Its rule and hyper-parameters must be ``name`` / ``config`` (defaults
    included); checked when training starts (``lopt_hf.metatrain.trainer.initial_theta``).
    """

    name: str = "per_param_mlp"
    config: dict[str, Any] = field(default_factory=dict)  # rule hyper-parameters, others default
    init_from: Union[str, None] = None


@dataclass
class TaskSection:
    """The inner problems: a task family (``lopt_hf.metatrain.tasks``) and its options.

    ``family`` is ``mlp_image`` (MLP classifiers, ``tasks.MLPImageTaskFamily``), ``cnn_image``
    (small conv nets, ``tasks.CNNImageTaskFamily``: one strided ``3×3`` convolution per entry of
    ``channels``, global average pool, linear head) or ``char_lm`` (a tiny character-level
    transformer, ``lm_tasks.CharLMTaskFamily``). Each family reads only its own keys below.

    Image families: ``dataset`` is one name or a list (each task draws one uniformly; all need
    the same number of classes): ``digits`` (scikit-learn, offline), ``fashion_mnist``, ``mnist``,
    a local path (an ``.npz``, a ``save_to_disk`` folder, a folder of data files) or a Hugging Face
    ``datasets`` id (see ``lopt_hf.data``). Images are resized to ``image_size × image_size``.

    ``char_lm``: ``text_file`` (UTF-8 text) or ``corpus`` (a text that ships with Python, e.g.
    ``python_docs``; exactly one of the two) is read as characters; windows of
    ``context_length`` characters train a ``num_layers``-layer transformer of width ``model_dim``
    with ``num_heads`` heads; each task trains on ``segment_length`` characters from its own random
    offset (null: the whole text).

    All families: ``reparam_scale_range: [low, high]`` rescales every parameter tensor of a task by
    a log-uniform factor (null: no rescaling).
    """

    family: str = "mlp_image"
    dataset: Union[str, list[str]] = "digits"
    hidden_sizes: list[int] = field(default_factory=lambda: [32])  # mlp_image
    channels: list[int] = field(default_factory=lambda: [8, 16])  # cnn_image
    batch_size: int = 128
    image_size: int = 8
    activation: str = "relu"  # mlp_image, cnn_image
    reparam_scale_range: Union[list[float], None] = None
    data_dir: Union[str, None] = None  # dataset cache folder (default $LOPT_HF_CACHE or ~/.cache/lopt_hf)
    text_file: Union[str, None] = None  # char_lm: a UTF-8 text file, or
    corpus: Union[str, None] = None  # char_lm: a text shipped with Python (data.corpora.BUILTIN_CORPORA)
    context_length: int = 32  # char_lm
    model_dim: int = 32  # char_lm
    num_heads: int = 2  # char_lm
    num_layers: int = 1  # char_lm
    segment_length: Union[int, None] = None  # char_lm: characters per task from a random offset (null: whole text)

    def own_keys(self) -> list[str]:
        """The keys that matter for the chosen family (a saved config and a card show only these)."""
        image = ["dataset", "image_size", "activation", "data_dir"]
        own = {"mlp_image": ["hidden_sizes", *image], "cnn_image": ["channels", *image],
               "char_lm": ["text_file", "corpus", "context_length", "model_dim", "num_heads", "num_layers",
                           "segment_length"]}
        keys = {"family", "batch_size", "reparam_scale_range", *own.get(self.family, [])}
        return [field.name for field in dataclasses.fields(self) if field.name in keys]

    def datasets(self) -> list[str]:
        """The image datasets of this family as a list (``dataset`` may be one name); none for ``char_lm``."""
        if self.family == "char_lm":
            return []
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    def family_options(self) -> dict[str, Any]:
        """Keyword arguments of ``tasks.build_task_family(self.family, ...)``: the chosen family's options."""
        scales = list(self.reparam_scale_range or [1.0, 1.0])
        if self.family == "char_lm":
            return {"text_file": self.text_file, "corpus": self.corpus, "context_length": self.context_length,
                    "model_dim": self.model_dim,
                    "num_heads": self.num_heads, "num_layers": self.num_layers, "batch_size": self.batch_size,
                    "segment_length": self.segment_length, "param_scale_range": scales}
        options: dict[str, Any] = {"datasets": self.datasets(), "image_size": self.image_size, "batch_size": self.batch_size,
                                   "activation": self.activation, "param_scale_range": scales,
                                   "cache_dir": self.data_dir}
        if self.family == "cnn_image":
            return {**options, "channels": list(self.channels)}
        return {**options, "hidden_sizes": list(self.hidden_sizes)}


@dataclass(frozen=True)
class _EstimatorChoice:
    """The two keys of the ``estimator:`` section that are not estimator hyper-parameters."""

    name: str = "pes"
    num_tasks: int = 8  # task slots (inner problems) per outer step, split across processes


@dataclass(frozen=True)
class EstimatorSection(EstimatorOptions, _EstimatorChoice):
    """The meta-gradient estimator (``lopt_hf.metatrain.estimators.build_estimator``).

    ``name`` and ``num_tasks``, then every :class:`EstimatorOptions` field with its default
    (dataclass fields follow the reversed MRO, so ``name`` and ``num_tasks`` come first, as
    they always have in saved configs).
    """

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:
            raise ConfigError(f"estimator.{err}") from None

    def options(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of ``estimators.build_estimator``."""
        return {"seed": seed, **{item.name: getattr(self, item.name)
                                 for item in dataclasses.fields(EstimatorOptions)}}


@dataclass
class MetaOptimizerSection:
    """AdamW on theta."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: Union[float, None] = None  # clip the meta-gradient's global L2 norm (null: no clipping)
    # theta keys (or key prefixes) held fixed: not perturbed, not updated — e.g. Celo's two phases:
    # [rnn_params/, lstm_init_state/] trains the update rule only, [ff_mod_stack/] the scheduler only
    frozen: list[str] = field(default_factory=list)


@dataclass
class CardSection:
    """What the exported artifact's model card says about itself."""

    name: Union[str, None] = None  # card title (default: the run name)
    # What the optimizer is for, in words; the card adds what the run did (steps, time, tasks) itself.
    description: Union[str, None] = None
    license: str = "apache-2.0"  # Hub license id of the exported weights (card metadata)
    # Hub model id the card's `base_model` metadata names (default: rule.init_from when it is a Hub id)
    base_model: Union[str, None] = None
    tags: list[str] = field(default_factory=list)
    citation: Union[str, None] = None  # BibTeX shown at the end of the card


@dataclass
class EvaluationSection:
    """Post-training evaluation for the model card, run by ``lopt_hf.evaluation`` (``lopt-hf eval``).

    ``steps: 0`` skips it. The exported optimizer, the same rule with the meta-parameters
    meta-training started from (``random init θ₀``) and AdamW at every lr of ``adamw_lrs`` (the
    default 1e-3 and a tuned-for-small-MLPs 1e-2, so the card does not only compare against an
    untuned baseline) each train every task of ``tasks`` (names from ``lopt_hf.evaluation.TASKS``,
    which define model and batch size; checked by ``lopt_hf.publish``, which runs the evaluation)
    for ``steps`` steps from every seed of ``seeds``.
    """

    steps: int = 0
    tasks: list[str] = field(default_factory=lambda: ["digits_mlp"])
    adamw_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


# Keys older versions had, with what to do instead; a config naming one is an error that says so.
# Configs stored in checkpoints by those versions (trainer_state.json) load with them dropped.
REMOVED_KEYS: dict[str, str] = {
    key: ("removed: the evaluation now runs lopt_hf.evaluation tasks (as `lopt-hf eval` does), whose model and "
          "batch size are fixed by the task; delete this key and choose tasks with evaluation.tasks (e.g. "
          "[digits_mlp, digits_cnn]; see lopt_hf.evaluation.TASKS)")
    for key in ("evaluation.hidden_sizes", "evaluation.batch_size")
}


@dataclass
class MetaTrainConfig:
    """A whole meta-training run."""

    name: str = "metatrain"
    seed: int = 0
    outer_steps: int = 100
    rule: RuleSection = field(default_factory=RuleSection)
    task: TaskSection = field(default_factory=TaskSection)
    # Further task families meta-trained in the same run (lopt_hf.metatrain.mixture): the estimator's task
    # slots are dealt to task, extra_tasks[0], extra_tasks[1], ... in turn. []: task alone.
    extra_tasks: list[TaskSection] = field(default_factory=list)
    estimator: EstimatorSection = field(default_factory=EstimatorSection)
    meta_optimizer: MetaOptimizerSection = field(default_factory=MetaOptimizerSection)
    checkpoint_every: int = 50  # outer steps between checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    log_every: int = 10  # outer steps between TensorBoard / console log lines
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # Accelerate trackers ([] for none)
    # torch intra-op threads per process (null: torch's default). On a shared CPU machine 1 is far
    # more robust: two spinning OpenMP threads next to another busy process ran 20x slower here.
    num_threads: Union[int, None] = None
    output_dir: Union[str, None] = None  # default: runs/<name>
    push_to_hub: Union[str, None] = None  # Hub repo id the final artifact is pushed to
    card: CardSection = field(default_factory=CardSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    # LoLO replay buffer + behaviour cloning on top of PES (lopt_hf.metatrain.lolo); null: plain estimator
    lolo: Union[dict[str, Any], None] = None

    def __post_init__(self) -> None:
        _check_values(self)

    def task_sections(self) -> list[TaskSection]:
        """``task`` and then each of ``extra_tasks``: the run's task families, in slot order."""
        return [self.task, *self.extra_tasks]

    @property
    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<name>`` when it is not set."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


# ============================================================================== checking


def _check_values(config: MetaTrainConfig) -> None:
    def need(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{key}: {message}")

    need(config.outer_steps >= 1, "outer_steps", f"must be >= 1, got {config.outer_steps}")
    need(config.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {config.checkpoint_every}")
    need(config.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {config.keep_checkpoints}")
    need(config.num_threads is None or config.num_threads >= 1, "num_threads",
         f"must be >= 1 or null, got {config.num_threads}")
    need(config.log_every >= 1, "log_every", f"must be >= 1, got {config.log_every}")
    need(bool(config.name) and "/" not in config.name, "name", f"must be a non-empty name without '/', "
                                                               f"got {config.name!r}")
    estimator = config.estimator
    need(estimator.name in ESTIMATOR_NAMES, "estimator.name",
         f"unknown estimator {estimator.name!r}; choose one of {list(ESTIMATOR_NAMES)}")
    need(estimator.num_tasks >= 1, "estimator.num_tasks", f"must be >= 1, got {estimator.num_tasks}")
    meta = config.meta_optimizer
    need(meta.lr > 0, "meta_optimizer.lr", f"must be > 0, got {meta.lr}")
    need(meta.weight_decay >= 0, "meta_optimizer.weight_decay", f"must be >= 0, got {meta.weight_decay}")
    need(len(meta.betas) == 2 and all(0 <= b < 1 for b in meta.betas), "meta_optimizer.betas",
         f"must be two numbers in [0, 1), got {meta.betas}")
    need(meta.grad_clip is None or meta.grad_clip > 0, "meta_optimizer.grad_clip",
         f"must be > 0 or null, got {meta.grad_clip}")
    _check_task(config.task, "task", need)
    for index, extra in enumerate(config.extra_tasks):
        _check_task(extra, f"extra_tasks[{index}]", need)
    need(config.estimator.num_tasks >= 1 + len(config.extra_tasks), "estimator.num_tasks",
         f"must give every task family a slot: >= {1 + len(config.extra_tasks)} with "
         f"{len(config.extra_tasks)} extra_tasks, got {config.estimator.num_tasks}")
    need(config.rule.init_from is None or bool(config.rule.init_from.strip()), "rule.init_from",
         "must be an artifact folder or Hub repo id, or null")
    try:
        from ..rules import build_rule

        config.rule.config = _coerce_rule_config(config.rule.name, config.rule.config)
        rule = build_rule(config.rule.name, **config.rule.config)
    except (ValueError, TypeError) as err:  # RuleConfigError is a ValueError
        raise ConfigError(f"rule: {err}") from None
    keys = list(rule.theta_shapes())
    for prefix in meta.frozen:
        need(any(key.startswith(prefix) for key in keys), "meta_optimizer.frozen",
             f"{prefix!r} is no theta key (prefix) of rule {config.rule.name!r}; its keys: {keys}")
    need(len(frozen_theta_keys(keys, meta.frozen)) < len(keys), "meta_optimizer.frozen",
         "freezes every theta key: nothing would be meta-trained")
    _check_evaluation(config.evaluation, need)
    need(config.estimator.final_fraction == 1.0 or config.estimator.name == "pes", "estimator.final_fraction",
         f"only pes (and LoLO) weight the meta-loss by trajectory position; {config.estimator.name} needs 1.0")
    if config.lolo is not None:
        from .lolo import LOLO_KEYS, LoLOOptions

        unknown = sorted(set(config.lolo) - set(LOLO_KEYS))
        need(not unknown, f"lolo.{unknown[0] if unknown else ''}",
             f"unknown key; known: {list(LOLO_KEYS)}")
        need(config.estimator.name == "pes", "lolo", f"LoLO needs estimator.name: pes, got {config.estimator.name!r}")
        try:
            LoLOOptions(**config.lolo)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"lolo: {err}") from None
    unknown_trackers = sorted(set(config.log_with) - {"tensorboard", "wandb", "mlflow", "comet_ml", "aim",
                                                      "clearml", "dvclive", "swanlab", "trackio"})
    need(not unknown_trackers, "log_with", f"unknown tracker(s) {unknown_trackers}")


def frozen_theta_keys(keys: list[str], prefixes: list[str]) -> list[str]:
    """The theta ``keys`` that ``meta_optimizer.frozen``'s ``prefixes`` hold fixed (a key is its own prefix)."""
    return [key for key in keys if any(key.startswith(prefix) for prefix in prefixes)]


def _check_task(task: TaskSection, key: str, need: Any) -> None:
    need(task.family in TASK_FAMILY_CHOICES, f"{key}.family",
         f"unknown task family {task.family!r}; choose one of {list(TASK_FAMILY_CHOICES)}")
    need(all(size >= 1 for size in task.channels) and bool(task.channels), f"{key}.channels",
         f"must be one or more positive numbers, got {task.channels}")
    if task.family == "char_lm":
        from ..data.corpora import BUILTIN_CORPORA

        need(bool(task.text_file) != bool(task.corpus), f"{key}.text_file",
             "char_lm needs exactly one text to model: text_file (a UTF-8 file) or corpus "
             f"({' or '.join(BUILTIN_CORPORA)})")
        need(task.corpus is None or task.corpus in BUILTIN_CORPORA, f"{key}.corpus",
             f"unknown corpus {task.corpus!r}; choose one of {list(BUILTIN_CORPORA)}")
    need(task.context_length >= 1, f"{key}.context_length", f"must be >= 1, got {task.context_length}")
    need(task.segment_length is None or task.segment_length > task.context_length, f"{key}.segment_length",
         f"must be null or > {key}.context_length ({task.context_length}), got {task.segment_length}")
    need(task.num_layers >= 1, f"{key}.num_layers", f"must be >= 1, got {task.num_layers}")
    need(task.num_heads >= 1 and task.model_dim >= 1 and task.model_dim % task.num_heads == 0, f"{key}.model_dim",
         f"must be a positive multiple of {key}.num_heads, got {task.model_dim} and {task.num_heads} heads")
    need(task.activation in ("relu", "tanh"), f"{key}.activation", f"must be relu or tanh, got {task.activation!r}")
    need(task.image_size >= 1, f"{key}.image_size", f"must be >= 1, got {task.image_size}")
    need(bool(task.dataset), f"{key}.dataset", "name at least one dataset")
    need(task.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {task.batch_size}")
    need(all(size >= 1 for size in task.hidden_sizes), f"{key}.hidden_sizes",
         f"must be positive, got {task.hidden_sizes}")
    if task.reparam_scale_range is not None:
        low_high = task.reparam_scale_range
        need(len(low_high) == 2 and 0 < low_high[0] <= low_high[1], f"{key}.reparam_scale_range",
             f"must be [low, high] with 0 < low <= high, got {low_high}")


def _check_evaluation(evaluation: EvaluationSection, need: Any) -> None:
    need(evaluation.steps >= 0, "evaluation.steps", f"must be >= 0, got {evaluation.steps}")
    need(bool(evaluation.tasks), "evaluation.tasks", "name at least one task (see lopt_hf.evaluation.TASKS)")
    need(len(set(evaluation.tasks)) == len(evaluation.tasks), "evaluation.tasks",
         f"names a task twice: {evaluation.tasks}")
    need(bool(evaluation.seeds) and len(set(evaluation.seeds)) == len(evaluation.seeds), "evaluation.seeds",
         f"must be distinct seeds, at least one, got {evaluation.seeds}")
    need(all(lr > 0 for lr in evaluation.adamw_lrs) and len(set(evaluation.adamw_lrs)) == len(evaluation.adamw_lrs),
         "evaluation.adamw_lrs", f"must be distinct positive learning rates, got {evaluation.adamw_lrs}")


def _coerce_rule_config(rule_name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Rule hyper-parameters typed like the rule's defaults (YAML reads ``1e-3`` as a string)."""
    from ..rules import rule_class

    try:
        fields = {item.name: item for item in dataclasses.fields(rule_class(rule_name))}  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return values
    coerced = dict(values)
    for key, value in values.items():
        default = fields[key].default if key in fields else None
        if isinstance(default, float) and not isinstance(default, bool) and isinstance(value, (str, int)) \
                and not isinstance(value, bool):
            try:
                coerced[key] = float(value)
            except ValueError:
                raise ConfigError(f"rule.config.{key}: expected a number, got {value!r}") from None
        elif isinstance(default, tuple) and default and isinstance(default[0], float) and isinstance(value, list):
            try:
                coerced[key] = [float(item) for item in value]
            except (TypeError, ValueError):
                raise ConfigError(f"rule.config.{key}: expected a list of numbers, got {value!r}") from None
    return coerced


def config_from_dict(values: Any, *, source: str = "config", stored: bool = False) -> MetaTrainConfig:
    """Build a :class:`MetaTrainConfig` from a plain dict (e.g. parsed YAML), strictly.

    ``stored=True`` is for configs an older lopt_hf wrote (a checkpoint's ``trainer_state.json``):
    keys it had that have since been removed (:data:`REMOVED_KEYS`) are dropped instead of being errors.
    """
    if values is None:
        values = {}
    if stored:
        values = _drop_removed_keys(values)
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: config must be a mapping, got {type(values).__name__} {values!r}")
    _check_keys(MetaTrainConfig, values, prefix="", source=source)
    try:
        return dacite.from_dict(MetaTrainConfig, values, config=_DACITE)
    except dacite.WrongTypeError as err:
        raise ConfigError(f"{source}: {_wrong_type_message(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _drop_removed_keys(values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    values = copy.deepcopy(values)
    for dotted in REMOVED_KEYS:
        *sections, key = dotted.split(".")
        node = values
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return values


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON/YAML-serialisable data (round-trips through :func:`config_from_dict`); the
    ``task`` section (and each of ``extra_tasks``) keeps only its family's keys (the others are unused defaults);
    an empty ``extra_tasks`` is left out."""
    values = _plain(dataclasses.asdict(config))
    task = getattr(config, "task", None)
    if isinstance(task, TaskSection) and isinstance(values.get("task"), dict):
        values["task"] = {key: values["task"][key] for key in task.own_keys()}
    extras = getattr(config, "extra_tasks", None)
    if isinstance(extras, list) and isinstance(values.get("extra_tasks"), list):
        values["extra_tasks"] = [{key: plain[key] for key in extra.own_keys()}
                                 for extra, plain in zip(extras, values["extra_tasks"])]
        if not extras:  # one family: the config reads (and single-family cards stay) as before extra_tasks existed
            del values["extra_tasks"]
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MetaTrainConfig:
    """Read a YAML config (``None``: all defaults) and apply ``key.sub=value`` overrides."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(loaded).__name__}")
        values = loaded
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values, source=source)


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``3e-3``), which YAML 1.1 reads as strings."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse a config (or an override value): ``lr: 3e-3`` is the float 0.003, as a reader expects."""
    return yaml.load(text, Loader=_Yaml12FloatLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"estimator.num_tasks=8"`` → ``("estimator.num_tasks", 8)`` (the value is parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. estimator.num_tasks=8")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``values`` with every ``key.sub=value`` override set (sections created as needed).

    Keys are checked against the config schema so a typo fails naming the key.
    """
    result = copy.deepcopy(values)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        _check_key_path(parts, text)
        target = result
        for depth, part in enumerate(parts[:-1]):
            node = target.get(part)
            if node is None:
                node = target[part] = {}
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not a section")
            target = node
        target[parts[-1]] = value
    return result


def _check_key_path(parts: list[str], text: str) -> None:
    """Every component of an override key must be a field (free dicts like ``rule.config`` end the check)."""
    cls: Any = MetaTrainConfig
    for depth, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # inside a free dict (rule.config.*, lolo.*): anything goes
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"override {text!r}: {_unknown_key_message('.'.join(parts[:depth + 1]), part, hints)}")
        cls = hints[part]


# ====================================================================== building (dacite)


def _unknown_key_message(dotted: str, key: str, known: Any) -> str:
    if dotted in REMOVED_KEYS:
        return f"{dotted}: {REMOVED_KEYS[dotted]}"
    suggestion = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
    return f"{dotted}: unknown key{hint} (known: {', '.join(sorted(known))})"


def _check_keys(cls: type, values: dict[str, Any], *, prefix: str, source: str) -> None:
    """Every key of ``values`` (and of its sections) must be a field; the error names the key and a near miss.

    dacite's strict mode rejects unknown keys too, but without the section path or a suggestion.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: {_unknown_key_message(prefix + str(key), str(key), hints)}")
        section = hints[key]
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            _check_keys(section, value, prefix=f"{prefix}{key}.", source=source)
        item_types = typing.get_args(section) if typing.get_origin(section) is list else ()
        if item_types and dataclasses.is_dataclass(item_types[0]) and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    _check_keys(item_types[0], item, prefix=f"{prefix}{key}[{index}].", source=source)


def _to_int(value: Any) -> Any:
    """YAML reads ``1e5`` as a float: integral numbers (and number strings) become ints; bools are refused."""
    if isinstance(value, bool):
        raise dacite.WrongTypeError(field_type=int, value=value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # dacite reports the wrong type
        return int(number) if number.is_integer() else value
    return value


def _to_float(value: Any) -> Any:
    """Ints and number strings (PyYAML reads ``1e-3`` without a dot as a string) become floats; bools are refused."""
    if isinstance(value, bool):
        raise dacite.WrongTypeError(field_type=float, value=value)
    if isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            return value  # dacite reports the wrong type
    return value


def _to_bool(value: Any) -> Any:
    if not isinstance(value, bool):  # dacite would accept nothing else either; say so with the field's path
        raise dacite.WrongTypeError(field_type=bool, value=value)
    return value


_SECTIONS = (RuleSection, TaskSection, EstimatorSection, MetaOptimizerSection, CardSection, EvaluationSection)
_DACITE = dacite.Config(
    strict=True,
    type_hooks={int: _to_int, float: _to_float, bool: _to_bool,
                # an empty section (`card:` with nothing under it) is all defaults
                **{section: (lambda value: {} if value is None else value) for section in _SECTIONS}},
)


def _wrong_type_message(err: dacite.WrongTypeError) -> str:
    key = err.field_path or "config"
    if dataclasses.is_dataclass(err.field_type):
        return f"{key} must be a mapping, got {type(err.value).__name__} {err.value!r}"
    return f"{key}: expected {_type_name(err.field_type)}, got {err.value!r}"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if option is type(None) else _type_name(option)
                           for option in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list ({_type_name(item)} each)"
    if origin is dict:
        return "a mapping"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
