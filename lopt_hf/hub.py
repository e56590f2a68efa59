"""The Hub artifact of a learned optimizer: ``config.json`` + ``model.safetensors`` + ``README.md``.

``LearnedOptimizerConfig`` / ``LearnedOptimizerModel`` are a transformers config / model pair
registered with ``AutoConfig`` / ``AutoModel`` (model type ``learned_optimizer``), so the usual
``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` work — but every one of them is
overridden here:

* loading reads ``config.json`` as JSON and ``model.safetensors`` as safetensors, validates
  both against the update rule named in the config (looked up in lopt_hf's own registry) and
  only then builds the model; it never unpickles, never imports or runs code from the artifact,
  and never random-initialises a missing tensor (transformers' loader would); it reads nothing through a
  link leaving the artifact folder, and verifies model.safetensors against the sha256 config.json records;
* saving writes exactly the three files, with our model card;
* ``push_to_hub`` uploads exactly those three files (transformers' own would replace our card
  with its auto-generated one).

Problems with an artifact raise :class:`ArtifactError` naming the file and the problem.

A repo or folder without ``config.json`` but with a ``theta.state`` — the authors' own Celo, Celo-Adam,
VeLO, Celo2 repos (``amoudgl/celo`` …) — is recognised by its tree, converted (no JAX, nothing
unpickled: :mod:`lopt_hf.convert.flax_msgpack`) and the converted artifact cached, then loaded
like any other; see :mod:`lopt_hf.convert.foreign`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .artifact_validation import (CONFIG_NAME, DEFAULT_OPTIMIZER_DEFAULTS, FORMAT_VERSION, MAX_CONFIG_BYTES,
                                  MODEL_CARD_NAME, MODEL_TYPE, TRANSFORMERS_KEYS, WEIGHTS_NAME, WEIGHTS_SHA256_KEY,
                                  ArtifactError, build_rule_checked, check_theta_tensors, expected_theta,
                                  read_config_file, read_theta_file, validate_config, validate_config_dict)
from .loader_options import UnsafeLoadOptionError, network_error_types, split_load_options
from .pretrained import pretrained_path
from .rules import UpdateRule

__all__ = ["ArtifactError", "FORMAT_VERSION", "LearnedOptimizerConfig", "LearnedOptimizerModel",
           "MissingArtifactFileError", "UnsafeLoadOptionError", "create_artifact", "load_artifact", "lopt_hf_version",
           "staged_folder", "write_file_atomic"]

# Keyword arguments of PreTrainedConfig's constructor that from_dict may pass; anything else is a typo.
_CONFIG_INIT_KWARGS = TRANSFORMERS_KEYS | {"name_or_path", "attn_implementation", "experts_implementation",
                                           "num_labels"}
_SNAPSHOT_COMMIT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]")
# Marks a config dict that from_dict has already validated, so __post_init__ does not validate it again.
# A private object: it cannot come from a config.json or a caller.
_ALREADY_VALIDATED = object()


def lopt_hf_version() -> str:
    """The installed lopt_hf version (``"unknown"`` when running from a source tree that is not installed)."""
    try:
        from importlib.metadata import version

        return version("lopt_hf")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


@dataclass(frozen=True)
class _CheckedTheta:
    """Theta (or ``None``: draw ``rule.init_theta``) already checked against ``rule``, handed to the model."""

    rule: UpdateRule
    tensors: dict[str, Tensor] | None


# ================================================================================ config


class LearnedOptimizerConfig(PretrainedConfig):
    """``config.json`` of a learned-optimizer artifact.

    Args:
        rule: name of a registered update rule (``lopt_hf.available_rules()``).
        rule_config: the rule's hyper-parameters; missing ones take the rule's defaults and the
            stored value always lists every hyper-parameter (``rule.hyperparameters()``).
        optimizer_defaults: settings ``load_lopt`` uses unless overridden, a free dict of JSON
            values (``lr`` in [0, 1e3], ``weight_decay`` in [0, 1], ``lr * weight_decay <= 1``); default
            ``{"lr": 1.0, "weight_decay": 0.0}``.
        harness: ``None`` (or ``{}``) or a harness dict routing some parameters elsewhere (e.g. AdamW
            for 1-D parameters, :mod:`lopt_hf.harness`); it must have a known ``type`` and valid settings
            (checked as ``load_lopt`` resolves it); stored as given.
        format_version: artifact format, at most :data:`FORMAT_VERSION`.
        provenance: free JSON dict: ``created_by``, ``created_at``, ``source``, ``meta_training``,
            ``evaluation``, ``license``, ... (see ``lopt_hf.model_card`` for the keys the card uses);
            ``save_pretrained`` records ``weights_sha256`` (of model.safetensors), which loading verifies.

    Invalid values raise :class:`ArtifactError`. ``from_pretrained`` takes a local folder or a Hub
    repo id and validates ``config.json`` before building the config; ``AutoConfig`` goes through
    the same checks via :meth:`from_dict`.
    """

    model_type = MODEL_TYPE

    rule: str | None = None
    rule_config: dict[str, Any] | None = None
    optimizer_defaults: dict[str, Any] | None = None
    harness: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    provenance: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        validated = kwargs.pop("_validated", None) is _ALREADY_VALIDATED
        unknown = sorted(set(kwargs) - _CONFIG_INIT_KWARGS)
        if unknown:
            raise TypeError(f"LearnedOptimizerConfig got unknown argument(s) {unknown}")
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if validated:
            return
        if self.rule is None:
            raise ArtifactError("LearnedOptimizerConfig()", "a rule name is required (e.g. rule='per_param_mlp')")
        fields = validate_config_dict(
            {"model_type": MODEL_TYPE, "rule": self.rule, "rule_config": self.rule_config,
             "optimizer_defaults": self.optimizer_defaults, "harness": self.harness,
             "format_version": self.format_version, "provenance": self.provenance},
            "LearnedOptimizerConfig()")
        for key, value in fields.items():
            setattr(self, key, value)

    def build_rule(self) -> UpdateRule:
        """A new ``UpdateRule`` instance with this config's rule name and hyper-parameters."""
        return build_rule_checked(str(self.rule), self.rule_config or {}, "LearnedOptimizerConfig")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Build from a ``config.json`` dict, validating it first (the ``AutoConfig`` path).

        ``kwargs`` are what ``AutoConfig.from_pretrained`` did not use itself; they go through the same
        policy as a load's (:mod:`lopt_hf.loader_options`), so e.g. ``AutoConfig.from_pretrained(path,
        use_safetensors=False)`` is refused here as it is by ``AutoModel``.

        Raises ``ArtifactError`` naming ``<name_or_path>/config.json`` when the dict is invalid.
        """
        split_load_options({key: value for key, value in kwargs.items()
                            if key not in ("name_or_path", "return_unused_kwargs")},
                           f"{cls.__name__}.from_dict")
        name_or_path = kwargs.get("name_or_path")
        source = f"{name_or_path}/{CONFIG_NAME}" if name_or_path else f"{CONFIG_NAME} dict"
        if name_or_path and os.path.lexists(Path(name_or_path) / CONFIG_NAME):
            # transformers read a local folder's config.json itself: refuse one that links outside the folder
            file_inside(name_or_path, CONFIG_NAME, source)
        fields = validate_config_dict(config_dict, source)
        return cls.from_validated_fields(fields, config_dict, **kwargs)

    @classmethod
    def from_validated_fields(cls, fields: dict[str, Any], config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Build from what :func:`~lopt_hf.artifact_validation.validate_config` returned for ``config_dict``.

        The fields are not validated again; transformers' bookkeeping keys of ``config_dict`` are kept.
        """
        extra = {key: config_dict[key] for key in ("transformers_version", "architectures") if key in config_dict}
        return super().from_dict({**fields, **extra, "_validated": _ALREADY_VALIDATED}, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *, revision: str | None = None,
                        **hub_kwargs: Any) -> "LearnedOptimizerConfig":
        """Load and validate ``config.json`` from a local artifact folder or a Hub repo id.

        Args:
            pretrained_model_name_or_path: local folder or Hub repo id (``"user/name"``).
            revision: branch, tag or commit on the Hub.
            **hub_kwargs: download options (``cache_dir``, ``force_download``, ``local_files_only``,
                ``token``, ``subfolder``, ``endpoint``, ``proxies``, ``user_agent``, ... — whatever
                ``hf_hub_download`` takes); see :mod:`lopt_hf.loader_options` for what is ignored or refused.
        """
        caller = "LearnedOptimizerConfig.from_pretrained"
        options = split_load_options(hub_kwargs, caller)
        location = _ArtifactLocation.create(pretrained_model_name_or_path, revision, options.download)
        config, _, _ = location.load_config()
        return config

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: push the whole artifact with ``LearnedOptimizerModel.push_to_hub``.

        (transformers' config push would upload config.json with its own auto-generated README.)
        """
        raise NotImplementedError("push the whole artifact with LearnedOptimizerModel.push_to_hub(repo_id)")


# ================================================================================= model


class LearnedOptimizerModel(PreTrainedModel):
    """A learned optimizer's meta-parameters ``theta`` plus its config, as a transformers model.

    ``theta`` is held as float32 ``nn.Parameter`` s (``requires_grad=False``) whose names are
    exactly the rule's theta names (no prefix), so ``state_dict()`` and ``model.safetensors`` keys
    are e.g. ``w0``, ``b0``. Theta names may be any string (``mlp/~/linear_0/w``), so they are not
    necessarily Python attributes: use :meth:`theta` or ``state_dict()``.

    Args:
        config: the artifact config.
        theta: name → tensor for every meta-parameter (validated against the rule: names,
            shapes, floating dtype, finite; stored as float32 copies); ``None`` draws a fresh
            ``rule.init_theta`` from a ``torch.Generator`` seeded with ``seed``.
        seed: seed of the random init when ``theta`` is ``None``.

    This is not a callable network: apply it through ``lopt_hf.load_lopt`` (a
    ``torch.optim.Optimizer``) or ``model.rule.update(model.theta(), ...)``.
    """

    config_class = LearnedOptimizerConfig
    config: LearnedOptimizerConfig
    base_model_prefix = ""
    main_input_name = "theta"
    _no_split_modules: list[str] = []
    _keys_to_ignore_on_load_missing = None
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: LearnedOptimizerConfig, theta: dict[str, Tensor] | None = None, *,
                 seed: int | None = 0) -> None:
        if not isinstance(config, LearnedOptimizerConfig):
            raise TypeError(f"LearnedOptimizerModel needs a LearnedOptimizerConfig, got {type(config).__name__}")
        super().__init__(config)
        if isinstance(theta, _CheckedTheta):  # from_pretrained / create_artifact: rule built and theta checked
            self._rule, theta = theta.rule, theta.tensors
            if theta is None:
                theta = self._rule.init_theta(_generator(seed))
        else:
            self._rule = config.build_rule()
            if theta is None:
                theta = self._rule.init_theta(_generator(seed))
            check_theta_tensors(theta, self._rule, "LearnedOptimizerModel(theta=...)", require_float32=False)
        for name in expected_theta(self._rule):
            # Direct insertion rather than register_parameter: theta names are arbitrary strings
            # (may contain '.', or shadow attributes such as 'config'), and must stay unprefixed.
            value = theta[name].detach().to(dtype=torch.float32).clone().contiguous()
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
        config.architectures = [type(self).__name__]
        self.post_init()

    # -------------------------------------------------------------------- accessors
    @property
    def rule(self) -> UpdateRule:
        """The ``UpdateRule`` built from the config (immutable; shared, not copied)."""
        return self._rule

    def theta(self) -> dict[str, Tensor]:
        """The meta-parameters as **detached clones** (float32, on the model's device), in rule order.

        Modifying the returned tensors does not modify the model; use ``state_dict()`` /
        ``named_parameters()`` for the live tensors.
        """
        return {name: self._parameters[name].detach().clone() for name in expected_theta(self._rule)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable: use ``lopt_hf.load_lopt(...)`` or ``self.rule.update(self.theta(), ...)``."""
        raise NotImplementedError("a LearnedOptimizerModel is not called; build an optimizer with "
                                  "lopt_hf.load_lopt(artifact, model) or use "
                                  "artifact.rule.update(artifact.theta(), ...)")

    def _init_weights(self, module: nn.Module) -> None:
        # theta is set in __init__ (rule.init_theta or given tensors); transformers' generic
        # initialisation must not touch it.
        return

    # ------------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike[str], *, repo_id: str | None = None,
                        is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``save_directory``.

        Args:
            save_directory: created if missing; other files in it are left alone. The three files are
                written all or nothing (:func:`staged_folder`): a failure leaves the folder as it was.
            repo_id: Hub repo the card's usage snippets should name (``push_to_hub`` passes it).
            is_main_process: only the main process writes (distributed runs).
            push_to_hub: after saving, also push to ``repo_id`` (default: the folder's name) with
                the remaining ``kwargs`` (see :meth:`push_to_hub`).
            **kwargs: ``max_shard_size`` / ``safe_serialization=True`` are accepted for
                transformers compatibility and ignored; anything else is an error.

        Raises ``ArtifactError`` (writing nothing) if theta is no longer valid, e.g. non-finite.
        """
        if push_to_hub:
            target = repo_id or Path(save_directory).name
            self.save_pretrained(save_directory, repo_id=target, is_main_process=is_main_process)
            self.push_to_hub(target, **kwargs)
            return
        kwargs.pop("max_shard_size", None)
        if kwargs.pop("safe_serialization", True) is not True:
            raise ValueError("learned-optimizer artifacts are saved as safetensors only")
        if kwargs.pop("state_dict", None) is not None:
            raise ValueError("save_pretrained saves the model's own theta; pass theta to create_artifact instead")
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword argument(s) {sorted(kwargs)}")
        if not is_main_process:
            return
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory")

        theta = {name: tensor.to(device="cpu", dtype=torch.float32).contiguous()
                 for name, tensor in self.theta().items()}
        check_theta_tensors(theta, self._rule, f"{directory / WEIGHTS_NAME} (refusing to save)")
        from safetensors.torch import save as save_safetensors

        weights = save_safetensors(theta, metadata={"format": "pt"})
        # config.json records the digest of the weights it goes with; loading verifies it.
        self.config.provenance = {**(self.config.provenance or {}),
                                  WEIGHTS_SHA256_KEY: hashlib.sha256(weights).hexdigest()}
        # Validate the config exactly as a loader will see it, before writing anything.
        config_text = self.config.to_json_string(use_diff=True)
        validate_config_dict(json.loads(config_text), f"{directory / CONFIG_NAME} (refusing to save)")
        card = self.model_card(repo_id=repo_id)

        # All or nothing: a failure on any file leaves the folder as it was (or no folder). config.json goes
        # in last, so even a process killed between the renames leaves a config whose recorded sha256 names
        # the mismatch.
        with staged_folder(directory) as staging:
            for name, data in ((WEIGHTS_NAME, weights), (MODEL_CARD_NAME, str(card).encode("utf-8")),
                               (CONFIG_NAME, config_text.encode("utf-8"))):
                (staging / name).write_bytes(data)

    def model_card(self, repo_id: str | None = None) -> Any:
        """The ``huggingface_hub.ModelCard`` written as ``README.md``."""
        from .model_card import render_model_card

        config = self.config
        return render_model_card(rule=str(config.rule), rule_config=config.rule_config or {},
                                 theta_shapes=expected_theta(self._rule),
                                 optimizer_defaults=config.optimizer_defaults or {}, harness=config.harness,
                                 provenance=config.provenance or {}, format_version=config.format_version,
                                 repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, endpoint: str | None = None,
                    extra_files: Mapping[str, str | os.PathLike[str]] | None = None, **kwargs: Any) -> Any:
        """Upload ``config.json``, ``model.safetensors`` and our ``README.md`` to a Hub model repo.

        The one Hub push of lopt_hf (``lopt-hf push`` / ``export --push-to-hub`` come here too).
        Creates the repo (and the ``revision`` branch) if needed. Other files already in the repo
        are left as they are; an existing README.md is replaced by the rendered card.

        Args:
            extra_files: path in the repo → local file, uploaded in the same commit (e.g. the
                images the card shows, :func:`lopt_hf.model_card.card_images`).

        Returns:
            the ``huggingface_hub.CommitInfo`` of the upload (a ``str`` subclass: the commit URL).
        """
        kwargs.pop("max_shard_size", None)
        kwargs.pop("safe_serialization", None)
        if kwargs:
            raise TypeError(f"push_to_hub got unexpected keyword argument(s) {sorted(kwargs)}")
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token, library_name="lopt_hf", library_version=lopt_hf_version())
        repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        extra_files = dict(extra_files or {})
        for name in extra_files:
            in_repo = PurePosixPath(name)
            if (not name or in_repo.is_absolute() or ".." in in_repo.parts
                    or in_repo.as_posix() in (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME)):
                raise ValueError(f"push_to_hub: extra_files path {name!r} must be a relative path in the repo "
                                 f"(no '..') other than {CONFIG_NAME}, {WEIGHTS_NAME}, {MODEL_CARD_NAME}")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            for name, local_path in extra_files.items():
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_regular_file(local_path, target)
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp,
                                     allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, *extra_files],
                                     commit_message=commit_message or f"Upload learned optimizer ({self.config.rule})",
                                     commit_description=commit_description, revision=revision, create_pr=create_pr)

    # ------------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
                        config: LearnedOptimizerConfig | None = None, revision: str | None = None,
                        **kwargs: Any) -> "LearnedOptimizerModel":
        """Load a validated artifact from a local folder or a Hub repo id.

        Everything is checked before the model is built (all-or-nothing): config.json (model
        type, format version, rule, hyper-parameters), model.safetensors (header sanity, exactly
        the rule's tensors, float32, shapes, finite values). Only ``config.json`` and
        ``model.safetensors`` are read; nothing is unpickled and no code is run. Without a
        ``config.json``, a foreign ``theta.state`` (the authors' Celo-family repos) is converted
        and cached (:mod:`lopt_hf.convert.foreign`) and the converted artifact loaded.

        Args:
            pretrained_model_name_or_path: local folder or Hub repo id.
            config: use this config instead of the artifact's ``config.json`` (``AutoModel``
                passes the one it already loaded and validated).
            revision: branch, tag or commit on the Hub (both files come from the same commit).
            **kwargs: download options (``cache_dir``, ``force_download``, ``local_files_only``, ``token``,
                ``subfolder``, ``endpoint``, ``proxies``, ``user_agent``, ... — whatever ``hf_hub_download``
                takes) are forwarded; ``dtype`` / ``torch_dtype`` may only be float32 or ``"auto"``;
                options that would run code or unpickle (``trust_remote_code=True``,
                ``use_safetensors=False``, ``weights_only=False``, ...) are refused; transformers'
                bookkeeping and model-building options are ignored (see :mod:`lopt_hf.loader_options`).

        Raises:
            ArtifactError: any problem with the artifact, naming the file and the problem.
            UnsafeLoadOptionError: an option that would run code or unpickle.
        """
        if model_args:
            raise TypeError("LearnedOptimizerModel.from_pretrained takes no extra positional arguments")
        caller = "LearnedOptimizerModel.from_pretrained"
        options = split_load_options(kwargs, caller)
        location = _ArtifactLocation.create(pretrained_model_name_or_path, revision, options.download)
        if config is None:
            try:
                config, rule, _ = location.load_config()
            except MissingArtifactFileError as missing:  # maybe the authors' own checkpoint: convert it
                model = location.load_foreign(missing)
                model.config.name_or_path = str(pretrained_model_name_or_path)
                return model
        elif isinstance(config, LearnedOptimizerConfig):
            _, rule = validate_config(config.to_dict(), "config argument")
        else:
            raise TypeError(f"config must be a LearnedOptimizerConfig, got {type(config).__name__}")
        weights_path, weights_source = location.fetch(WEIGHTS_NAME)
        theta = read_theta_file(weights_path, rule, weights_source,  # the one theta check
                                expected_sha256=(config.provenance or {}).get(WEIGHTS_SHA256_KEY))
        config.name_or_path = str(pretrained_model_name_or_path)
        model = cls(config, theta=_CheckedTheta(rule, theta))
        model.eval()
        return model


# ============================================================================== helpers


def create_artifact(rule: str, *, seed: int | None = 0, theta: dict[str, Tensor] | None = None,
                    rule_config: dict[str, Any] | None = None, optimizer_defaults: dict[str, Any] | None = None,
                    harness: dict[str, Any] | None = None,
                    provenance: dict[str, Any] | None = None) -> LearnedOptimizerModel:
    """Build an artifact in memory (``save_pretrained`` / ``push_to_hub`` it afterwards).

    Args:
        rule: registered rule name.
        seed: seed of the ``torch.Generator`` for ``rule.init_theta`` when ``theta`` is None
            (``None``: a non-deterministic seed). Ignored when ``theta`` is given.
        theta: meta-parameters to use; must match ``rule.theta_shapes()`` exactly, be floating
            point and finite; stored as float32.
        rule_config: rule hyper-parameters (missing ones take the rule's defaults).
        optimizer_defaults: default ``{"lr": 1.0, "weight_decay": 0.0}``.
        harness: ``None`` or a dict (see :class:`LearnedOptimizerConfig`).
        provenance: merged over ``created_by`` / ``created_at`` / ``source`` defaults.

    Raises:
        ArtifactError: unknown rule or hyper-parameter, or theta not matching the rule.
    """
    source = "create_artifact()"
    base_provenance: dict[str, Any] = {
        "created_by": f"lopt_hf {lopt_hf_version()}",
        "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "source": (f"create_artifact: random init (rule.init_theta, seed {seed})" if theta is None
                   else "create_artifact: given theta"),
    }
    fields, built_rule = validate_config({
        "model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "rule": rule, "rule_config": rule_config,
        "optimizer_defaults": (dict(DEFAULT_OPTIMIZER_DEFAULTS) if optimizer_defaults is None
                               else optimizer_defaults),
        "harness": harness, "provenance": {**base_provenance, **(provenance or {})},
    }, source)
    config = LearnedOptimizerConfig.from_validated_fields(fields, {})
    if theta is not None:
        check_theta_tensors(theta, built_rule, f"{source} theta", require_float32=False)
    return LearnedOptimizerModel(config, theta=_CheckedTheta(built_rule, theta), seed=seed)


def load_artifact(path_or_repo_id: str | os.PathLike[str], revision: str | None = None,
                  **hub_kwargs: Any) -> LearnedOptimizerModel:
    """Load and validate an artifact from a local folder or a Hub repo id.

    Same as ``LearnedOptimizerModel.from_pretrained``; ``hub_kwargs``: ``cache_dir``,
    ``force_download``, ``local_files_only``, ``token``, ``subfolder``, ``endpoint``.

    Raises:
        ArtifactError: naming the file and the problem (see ``lopt_hf.artifact_validation``).
    """
    return LearnedOptimizerModel.from_pretrained(path_or_repo_id, revision=revision, **hub_kwargs)


def register_auto_classes() -> None:
    """Register the config / model with transformers' ``AutoConfig`` / ``AutoModel`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, LearnedOptimizerConfig, exist_ok=True)
    AutoModel.register(LearnedOptimizerConfig, LearnedOptimizerModel, exist_ok=True)
    _install_strict_config_reader()


def _install_strict_config_reader() -> None:
    """Make transformers read a learned-optimizer ``config.json`` as :func:`load_artifact` does (idempotent).

    ``AutoConfig`` / ``AutoModel`` parse ``config.json`` with transformers' own ``json.loads`` before the
    model type, hence our class, is known: JSON nested 1,000 deep raised ``RecursionError``, a 4,301-digit
    integer ``ValueError``, and duplicate keys were accepted. transformers' reader is wrapped: a file whose
    parsed ``model_type`` is ``learned_optimizer`` is read again by
    :func:`~lopt_hf.artifact_validation.read_config_file` (size limit, duplicate keys, nesting) and validated
    (``auto_map``, which transformers inspects before our class is called, is refused), and a file
    transformers could not parse at all that names ``learned_optimizer`` gets that function's
    ``ArtifactError``. Every other model's config.json is read exactly as before.
    """
    original = PretrainedConfig.__dict__["_dict_from_json_file"]
    if getattr(original, "lopt_hf_strict", False):
        return

    def read(cls: type, json_file: str | os.PathLike[str]) -> Any:
        try:
            config_dict = original.__func__(cls, json_file)
        except (RecursionError, ValueError) as err:
            if not isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)) and _names_our_model_type(json_file):
                read_config_file(Path(json_file), os.fspath(json_file))  # raises the ArtifactError
            raise
        if isinstance(config_dict, dict) and config_dict.get("model_type") == MODEL_TYPE:
            config_dict = read_config_file(Path(json_file), os.fspath(json_file))
            # Validated here too, before transformers looks at it: it reads e.g. config_dict["auto_map"] itself.
            validate_config_dict(config_dict, os.fspath(json_file))
        return config_dict

    strict = classmethod(read)
    setattr(strict, "lopt_hf_strict", True)
    PretrainedConfig._dict_from_json_file = strict  # type: ignore[method-assign, assignment]


def _names_our_model_type(json_file: str | os.PathLike[str]) -> bool:
    """Whether the (unparseable) file mentions our model type within its first :data:`MAX_CONFIG_BYTES`."""
    try:
        with open(json_file, "rb") as handle:
            return MODEL_TYPE.encode() in handle.read(MAX_CONFIG_BYTES)
    except OSError:
        return False


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file in the same folder and ``os.replace``.

    Never writes through a link: a symbolic link at ``path`` is replaced by the new regular file
    (its target is left untouched), and the temporary file is created with ``O_EXCL | O_NOFOLLOW``.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a folder is in the way; nothing was written", os.fspath(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(tmp, flags, 0o644), "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


@contextmanager
def staged_folder(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder all or nothing: yields an empty staging folder; what is in it when the block ends replaces
    the entries of the same names in ``directory``.

    ``directory`` missing: the staging folder is made beside it and renamed to it, so a failure leaves no
    folder. ``directory`` present: the staging folder is made inside it (same file system) and each of
    its entries then replaces its namesake; should any replacement fail, those already made are undone,
    so the folder is left as it was. Other files of ``directory`` are left alone. When the block raises,
    nothing in ``directory`` changes. Entries are renamed, never written through: a link at a target
    is replaced, its target untouched.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a folder.
        IsADirectoryError: a staged file would replace a folder (checked before anything is replaced).
    """
    directory = Path(directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", os.fspath(directory))
    existed = directory.is_dir()
    if not existed:
        directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name or 'folder'}.tmp-",
                                    dir=directory if existed else directory.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would otherwise become the new folder's mode
        yield staging
        if existed:
            _replace_entries(staging, directory)
        else:
            os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_entries(staging: Path, directory: Path) -> None:
    """Move every entry of ``staging`` into ``directory``, replacing namesakes; undo them all if one fails."""
    names = sorted(entry.name for entry in staging.iterdir())
    for name in names:
        target = directory / name
        if target.is_dir() and not target.is_symlink() and not (staging / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, f"a folder is in the way of {name}; nothing was written",
                                    os.fspath(target))
    backups = Path(tempfile.mkdtemp(prefix=".old-", dir=staging))
    done: list[tuple[str, bool]] = []  # (name, whether its old entry is kept in backups)
    try:
        for name in names:
            target, backup = directory / name, backups / name
            had_old = os.path.lexists(target)
            if had_old:
                try:  # a second name for the old entry: the target itself never goes missing
                    os.link(target, backup, follow_symlinks=False)
                except OSError:  # a file system without hard links
                    os.rename(target, backup)
            done.append((name, had_old))
            os.replace(staging / name, target)
    except BaseException:
        for name, had_old in reversed(done):
            target = directory / name
            if had_old:
                os.replace(backups / name, target)
            elif not os.path.lexists(staging / name):  # the new entry was moved in: take it out again
                os.rename(target, staging / name)
        raise


def _copy_regular_file(source: str | os.PathLike[str], target: Path) -> None:
    """Copy ``source`` to ``target`` only if ``source`` is a regular file itself, not a link (nor a device, a FIFO)."""
    try:
        handle = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise ValueError(f"push_to_hub: extra file {os.fspath(source)!r} cannot be opened without following a "
                         f"link ({err.strerror}); only regular files are uploaded") from None
    with os.fdopen(handle, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise ValueError(f"push_to_hub: extra file {os.fspath(source)!r} is not a regular file")
        with open(target, "wb") as out:
            shutil.copyfileobj(stream, out)


def _cache_blobs(folder: Path) -> Path | None:
    """``models--X/blobs`` when ``folder`` is a huggingface_hub cache snapshot (whose files link there)."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        blobs = folder.parent.parent / "blobs"
        return blobs if blobs.is_dir() else None
    return None


def file_inside(folder: str | os.PathLike[str], relative: str | os.PathLike[str], source: str) -> Path:
    """The regular file ``relative`` of ``folder``, refusing one that is (or is reached through) a link leaving it.

    A path with ``..`` or an absolute path is refused; links are allowed only when they resolve to a
    file inside ``folder`` (or, for a huggingface_hub cache snapshot folder, inside that repo's
    ``blobs/``, where the cache links its files). Raises ``ArtifactError`` naming ``source``.
    """
    relative_path = Path(relative)
    if relative_path.is_absolute() or ".." in relative_path.parts:
        raise ArtifactError(source, f"{os.fspath(relative)!r} must be a path inside the artifact folder "
                                    "(no '..', not absolute)")
    root = Path(folder).resolve()
    path = Path(folder) / relative_path
    if not os.path.lexists(path):
        raise ArtifactError(source, "missing file")
    target = path.resolve()
    allowed = [root] + [blobs.resolve() for blobs in [_cache_blobs(root)] if blobs is not None]
    if not any(target == base or base in target.parents for base in allowed):
        raise ArtifactError(source, f"is a link to {target}, outside the artifact folder {root}; refusing to read "
                                    "through it")
    if not target.is_file():
        raise ArtifactError(source, "not a regular file")
    return target


class MissingArtifactFileError(ArtifactError):
    """A file an artifact needs is not there: not in the folder, not in the Hub repo, or not cached offline."""


@dataclass
class _ArtifactLocation:
    """Where an artifact's files come from: a local folder or a Hub repo at one revision."""

    name: str
    local_dir: Path | None
    revision: str | None
    hub_options: dict[str, Any]

    @classmethod
    def create(cls, path_or_repo_id: str | os.PathLike[str], revision: str | None,
               download: dict[str, Any]) -> "_ArtifactLocation":
        """``download``: the download options :func:`~lopt_hf.loader_options.split_load_options` kept."""
        hub_options = {key: value for key, value in download.items() if value is not None}
        name = os.fspath(path_or_repo_id)
        subfolder = hub_options.get("subfolder") or ""
        if not isinstance(subfolder, str) or Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise ArtifactError(name, f"subfolder={subfolder!r} must be a relative path inside the artifact "
                                      "(no '..', not absolute)")
        if os.path.isdir(name):
            local_dir = Path(name)
            if subfolder:
                inner = Path(name) / subfolder
                root = Path(name).resolve()
                if not (inner.resolve() == root or root in inner.resolve().parents):
                    raise ArtifactError(str(inner), f"subfolder {subfolder!r} is a link leading outside {root}; "
                                                    "refusing to read through it")
                local_dir = inner
            return cls(name, local_dir, revision, hub_options)
        if os.path.exists(name):
            raise ArtifactError(name, "is a file; expected an artifact folder (config.json + model.safetensors) "
                                      "or a Hub repo id")
        shipped = pretrained_path(name)
        if shipped is not None:
            # A learned optimizer shipped inside lopt_hf: always offline, so Hub-only options make no sense.
            hub_only = sorted(key for key in ("revision", "force_download", "subfolder", "endpoint")
                              if (revision if key == "revision" else hub_options.get(key)))
            if hub_only:
                raise ArtifactError(name, f"is shipped inside lopt_hf ({shipped}) and always loads from there; "
                                          f"{hub_only} only apply to Hub repos")
            return cls(name, shipped, None, {})
        return cls(name, None, revision, hub_options)

    def fetch(self, filename: str) -> tuple[Path, str]:
        """Local path of ``filename`` (downloading it from the Hub if needed) and its label for errors."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if not os.path.lexists(path):
                raise MissingArtifactFileError(str(path), f"missing file: a learned-optimizer artifact needs "
                                                          f"{filename}")
            return file_inside(self.local_dir, filename, str(path)), str(path)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        subfolder = self.hub_options.get("subfolder") or ""
        in_repo = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
        at = f"@{self.revision}" if self.revision else ""
        label = f"{self.name}{at}/{in_repo}"
        self._fail_fast_if_unreachable(in_repo, label)
        try:
            path = hf_hub_download(self.name, filename, revision=self.revision, repo_type="model",
                                   library_name="lopt_hf", library_version=lopt_hf_version(), **self.hub_options)
        except HFValidationError:
            raise ArtifactError(self.name, "no such local folder, and not a valid Hub repo id") from None
        except RepositoryNotFoundError:
            raise ArtifactError(self.name, "no such local folder, and no such Hub repo (or it is private or gated: "
                                           "pass token=)") from None
        except RevisionNotFoundError:
            raise ArtifactError(f"{self.name}{at}", f"revision {self.revision!r} not found on the Hub") from None
        except LocalEntryNotFoundError:
            from huggingface_hub import constants

            why = ("HF_HUB_OFFLINE is set: unset it to download it once" if constants.HF_HUB_OFFLINE else
                   "local_files_only=True, or the Hub could not be reached")
            raise MissingArtifactFileError(label, f"not in the local Hub cache ({why})") from None
        except EntryNotFoundError:
            raise MissingArtifactFileError(label, f"missing file: a learned-optimizer artifact needs {filename}") \
                from None
        if self.revision is None or not re.fullmatch(r"[0-9a-f]{40}", self.revision):
            # Pin the commit the first file came from, so config and theta always match.
            match = _SNAPSHOT_COMMIT.search(os.fspath(path))
            if match:
                self.revision = match.group(1)
        return Path(path), f"{label} ({path})"

    def _fail_fast_if_unreachable(self, in_repo: str, label: str) -> None:
        """One request, no retries, for a file that is not cached: huggingface_hub would otherwise retry a
        failed connection for ≈ 25 s before the "not in the local cache" error."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE or self.hub_options.get("local_files_only") or self.hub_options.get("local_dir"):
            return
        try:
            cached = try_to_load_from_cache(self.name, in_repo, cache_dir=self.hub_options.get("cache_dir"),
                                            revision=self.revision)
        except Exception:  # noqa: BLE001  (an invalid repo id: hf_hub_download names it)
            return
        if isinstance(cached, str):
            return
        endpoint = self.hub_options.get("endpoint")
        try:
            get_hf_file_metadata(hf_hub_url(self.name, in_repo, revision=self.revision, endpoint=endpoint),
                                 token=self.hub_options.get("token"), library_name="lopt_hf",
                                 library_version=lopt_hf_version(), user_agent=self.hub_options.get("user_agent"),
                                 headers=self.hub_options.get("headers"), endpoint=endpoint,
                                 timeout=self.hub_options.get("etag_timeout", 10))
        except network_error_types() as err:
            if cached is not None:  # the cache knows the file is not in the repo (a foreign checkpoint's config.json)
                raise MissingArtifactFileError(label, "missing file (known from the local Hub cache; the Hub could "
                                                      "not be reached)") from None
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ArtifactError(label, f"not in the local cache and the Hub at {endpoint or constants.ENDPOINT} "
                                       f"could not be reached ({first_line}): check the network, or set "
                                       "HF_HUB_OFFLINE=1 to use only cached artifacts") from None
        except Exception:  # noqa: BLE001  (HTTP answers — 404, 401, ...: hf_hub_download reports them)
            return

    def load_foreign(self, missing: MissingArtifactFileError) -> "LearnedOptimizerModel":
        """The artifact converted from a foreign ``theta.state`` here (a repo or folder without ``config.json``).

        See :mod:`lopt_hf.convert.foreign` (which optimizer, where the conversion is cached).
        Raises ``missing`` (the config.json error) when there is no ``theta.state`` either.
        """
        from .convert.foreign import FOREIGN_CHECKPOINT_NAME, load_foreign_checkpoint

        try:
            path, source = self.fetch(FOREIGN_CHECKPOINT_NAME)
        except MissingArtifactFileError:
            raise missing from None
        name = self.name if self.local_dir is None else os.fspath(Path(self.local_dir).resolve())
        return load_foreign_checkpoint(path, name, source)

    def load_config(self) -> tuple[LearnedOptimizerConfig, UpdateRule, str]:
        """The validated config, the rule it names (built once, by the validation) and its label for errors."""
        path, source = self.fetch(CONFIG_NAME)
        raw = read_config_file(path, source)
        fields, rule = validate_config(raw, source)
        config = LearnedOptimizerConfig.from_validated_fields(fields, raw, name_or_path=self.name)
        return config, rule, source


register_auto_classes()
