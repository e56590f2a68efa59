"""What a load does with each keyword argument: forward it to the download, ignore it, or refuse it.

``LearnedOptimizerModel.from_pretrained`` / ``LearnedOptimizerConfig.from_pretrained`` are reached
directly, through ``load_lopt`` and through transformers' ``AutoModel`` / ``AutoConfig``, which
pass along whatever hub keywords the installed transformers knows (``proxies`` since 5.25, and
more later). One policy, here, decides for all of them:

* **download options** — every keyword ``huggingface_hub.hf_hub_download`` accepts in the
  installed version (``cache_dir``, ``token``, ``proxies``, ``user_agent``, ``headers``,
  ``etag_timeout``, ``endpoint``, ...), read from its signature so a new hub keyword is forwarded,
  never a crash. Those lopt_hf sets itself (``repo_type``, ``library_name``, ...) are not taken.
* **refused** — options that would run code or unpickle (``trust_remote_code=True``,
  ``use_safetensors=False``, ``weights_only=False``, ``gguf_file``, ``from_tf``, ...): a
  :class:`UnsafeLoadOptionError` naming the option. Their harmless values (``False`` / ``None``)
  are accepted, since the Auto classes always pass them.
* **theta dtype** — ``dtype`` / ``torch_dtype`` may only be float32 or ``"auto"``.
* **not applicable** — model-building options of transformers (``device_map``,
  ``low_cpu_mem_usage``, ``attn_implementation``, ...) mean nothing for a few float32 tensors:
  ignored, with a warning when set to something.
* **bookkeeping** — transformers' private keywords (``_from_auto``, ``_commit_hash``, ...),
  ``adapter_kwargs``, ``name_or_path``: ignored.
* anything else is ignored when unset (``None`` / ``False`` / empty) and a ``TypeError`` naming
  it when set, so a typo such as ``local_file_only=True`` is not silently dropped.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["UnsafeLoadOptionError", "LoadOptions", "download_option_names", "network_error_types",
           "split_load_options"]

# Keywords of hf_hub_download that lopt_hf fills in itself.
_SET_BY_LOPT_HF = frozenset({"repo_id", "filename", "repo_type", "revision", "library_name", "library_version",
                             "dry_run"})
# Download keywords older/newer huggingface_hub versions take through their argument validator
# rather than the signature (``proxies``: dropped with a warning since huggingface_hub 1.0).
_LEGACY_DOWNLOAD_OPTIONS = frozenset({"proxies", "resume_download"})


def _refuse_truthy(value: Any) -> bool:
    return bool(value)


def _refuse_false(value: Any) -> bool:
    return value is False


def _refuse_set(value: Any) -> bool:
    return value is not None


# option -> (is this value unsafe?, why it is refused)
_REFUSED: dict[str, tuple[Any, str]] = {
    "trust_remote_code": (_refuse_truthy, "learned-optimizer artifacts never run code from the artifact or the Hub"),
    "code_revision": (_refuse_set, "learned-optimizer artifacts never run code from the artifact or the Hub"),
    "use_safetensors": (_refuse_false, "learned-optimizer artifacts are read from model.safetensors only; "
                                       "pickled weights are never loaded"),
    "weights_only": (_refuse_false, "pickled weights are never loaded"),
    "from_tf": (_refuse_truthy, "only model.safetensors is read"),
    "from_flax": (_refuse_truthy, "only model.safetensors is read (convert Flax checkpoints with lopt_hf.convert)"),
    "gguf_file": (_refuse_set, "only model.safetensors is read"),
    "state_dict": (_refuse_set, "theta is read from the artifact's model.safetensors; to build an artifact from "
                                "tensors use lopt_hf.create_artifact(rule, theta=...)"),
}
_DTYPE_OPTIONS = ("dtype", "torch_dtype")
_FLOAT32_DTYPES = (None, "auto", "float32", torch.float32)
# transformers' model-building options: no meaning for theta (a few float32 tensors loaded whole on the CPU).
_NOT_APPLICABLE = frozenset({
    "device_map", "max_memory", "offload_folder", "offload_buffers", "offload_state_dict", "low_cpu_mem_usage",
    "attn_implementation", "experts_implementation", "quantization_config", "output_loading_info",
    "ignore_mismatched_sizes", "variant", "key_mapping", "tp_plan", "tp_size", "device_mesh",
    "distributed_config", "generation_config", "use_kernels", "kernel_config", "kernels_mode",
    "allow_all_kernels", "fusion_config", "disable_mmap", "adapter_name", "return_unused_kwargs",
})
_BOOKKEEPING = frozenset({"adapter_kwargs", "name_or_path"})


class UnsafeLoadOptionError(ValueError):
    """A load option that would run code or unpickle data was asked for; lopt_hf never does either."""


@functools.lru_cache(maxsize=1)
def download_option_names() -> frozenset[str]:
    """Keywords forwarded to ``hf_hub_download``: its signature in the installed version, plus legacy ones."""
    from huggingface_hub import hf_hub_download

    parameters = inspect.signature(hf_hub_download).parameters
    accepted = {name for name, parameter in parameters.items()
                if parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return frozenset((accepted - _SET_BY_LOPT_HF) | _LEGACY_DOWNLOAD_OPTIONS)


@dataclass
class LoadOptions:
    """The keyword arguments of one load, sorted by :func:`split_load_options`."""

    download: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, dict, list, tuple)) and not value)


def split_load_options(options: dict[str, Any], caller: str) -> LoadOptions:
    """Sort a load's keyword arguments (see the module docstring); raise on refused or unknown set ones.

    Args:
        options: the keyword arguments given to the load, ``revision`` and ``config`` excluded.
        caller: named in errors and warnings (``"LearnedOptimizerModel.from_pretrained"``).

    Returns:
        :class:`LoadOptions`: ``download`` holds the options to forward to ``hf_hub_download``
        (unset ones dropped), ``ignored`` the names dropped as not applicable.

    Raises:
        UnsafeLoadOptionError: an option that would run code or unpickle.
        ValueError: a dtype other than float32.
        TypeError: an option lopt_hf does not know, set to something.
    """
    result = LoadOptions()
    unknown = []
    download_names = download_option_names()
    for name, value in options.items():
        if name in _REFUSED:
            is_unsafe, why = _REFUSED[name]
            if is_unsafe(value):
                raise UnsafeLoadOptionError(f"{caller}: {name}={value!r} is refused: {why}")
        elif name in _DTYPE_OPTIONS:
            if value not in _FLOAT32_DTYPES:
                raise ValueError(f"{caller}: learned-optimizer theta is float32; {name}={value!r} is not supported")
        elif name in download_names:
            if value is not None:
                result.download[name] = value
        elif name in _NOT_APPLICABLE:
            if not _is_unset(value):
                result.ignored.append(name)
        elif name.startswith("_") or name in _BOOKKEEPING:
            continue
        elif not _is_unset(value):
            unknown.append(name)
    if unknown:
        raise TypeError(f"{caller} got unexpected keyword argument(s) {sorted(unknown)}; download options are "
                        f"{sorted(download_names)}")
    if result.ignored:
        warnings.warn(f"{caller}: {sorted(result.ignored)} do not apply to a learned optimizer's theta "
                      "(a few float32 tensors, loaded whole on the CPU) and are ignored", stacklevel=3)
    return result


def network_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions meaning "the Hub could not be reached" (of the HTTP clients already imported)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)
