"""Keyword arguments of a load: download options forwarded, code/pickle options refused, typos caught.

Every entry point goes through ``lopt_hf.loader_options``: ``AutoModel`` / ``AutoConfig`` (which pass
whatever hub keywords the installed transformers knows, e.g. ``proxies`` since 5.25),
``LearnedOptimizerModel`` / ``LearnedOptimizerConfig.from_pretrained``, ``load_artifact``, ``load_lopt``.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import AutoConfig, AutoModel

from lopt_hf import (ArtifactError, LearnedOptimizerConfig, LearnedOptimizerModel, create_artifact, load_artifact,
                     load_lopt)
from lopt_hf.loader_options import UnsafeLoadOptionError, download_option_names

LOADERS: dict[str, Callable[..., Any]] = {
    "AutoModel": AutoModel.from_pretrained,
    "AutoConfig": AutoConfig.from_pretrained,
    "LearnedOptimizerModel": LearnedOptimizerModel.from_pretrained,
    "LearnedOptimizerConfig": LearnedOptimizerConfig.from_pretrained,
    "load_artifact": load_artifact,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("artifact")
    create_artifact("small_fc_lopt", seed=4).save_pretrained(directory)
    return directory


# Values transformers and huggingface_hub may pass for each download option.
TRANSFORMERS_HUB_KWARGS = {"proxies": None, "cache_dir": None, "force_download": False, "local_files_only": False,
                           "token": None, "subfolder": "", "user_agent": {"my-app": "1.0"}, "etag_timeout": 5,
                           "headers": {"X-Custom": "1"}, "tqdm_class": None}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_hub_keywords_that_transformers_passes_load_a_local_folder(folder: Path, loader: str) -> None:
    loaded = LOADERS[loader](folder, **TRANSFORMERS_HUB_KWARGS)
    assert type(loaded) in (LearnedOptimizerModel, LearnedOptimizerConfig)
    loaded = LOADERS[loader](folder, proxies={"http": "http://proxy.invalid:3128"})  # a local folder needs no proxy
    assert type(loaded) in (LearnedOptimizerModel, LearnedOptimizerConfig)


def test_every_download_option_of_the_installed_hub_client_is_accepted(folder: Path) -> None:
    """What hf_hub_download takes (bar what lopt_hf sets itself) is forwarded, never a crash — read from its signature."""
    parameters = inspect.signature(hf_hub_download).parameters
    ours = {"repo_id", "filename", "repo_type", "revision", "library_name", "library_version", "dry_run"}
    for name, parameter in parameters.items():
        if name in ours:
            assert name not in download_option_names()
            continue
        assert name in download_option_names()
        LearnedOptimizerModel.from_pretrained(folder, **{name: parameter.default})
    assert "proxies" in download_option_names()  # transformers still passes it; the hub client drops it


REFUSED = [("trust_remote_code", True), ("use_safetensors", False), ("weights_only", False), ("from_tf", True),
           ("from_flax", True), ("gguf_file", "theta.gguf"), ("code_revision", "main")]
# Options transformers' Auto classes handle themselves and never pass on to our classes. None of them can run
# code for a learned_optimizer artifact: our registered classes win over an auto_map, which we refuse anyway.
CONSUMED_BY_TRANSFORMERS = {"AutoConfig": ("trust_remote_code", "code_revision", "gguf_file"),
                            "AutoModel": ("code_revision", "gguf_file")}


@pytest.mark.parametrize(("loader", "option", "value"),
                         [(loader, option, value) for loader in sorted(LOADERS) for option, value in REFUSED
                          if option not in CONSUMED_BY_TRANSFORMERS.get(loader, ())])
def test_options_that_would_run_code_or_unpickle_are_refused(folder: Path, loader: str, option: str,
                                                             value: Any) -> None:
    with pytest.raises(UnsafeLoadOptionError, match=rf"{option}={value!r} is refused"):
        LOADERS[loader](folder, **{option: value})


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_harmless_values_of_the_refused_options_are_accepted(folder: Path, loader: str) -> None:
    LOADERS[loader](folder, trust_remote_code=False, use_safetensors=True, weights_only=True, gguf_file=None)


def test_auto_classes_with_trust_remote_code_run_no_code(folder: Path, tmp_path: Path) -> None:
    """transformers consumes trust_remote_code before our class sees it; the registered class wins and auto_map is refused."""
    marker = tmp_path / "CODE_RAN"
    directory = tmp_path / "with_code"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((folder / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for loader in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises((ArtifactError, UnsafeLoadOptionError)):
            loader(directory, trust_remote_code=True)
    assert not marker.exists()


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_mistyped_option_is_an_error_naming_it(folder: Path, loader: str) -> None:
    with pytest.raises(TypeError, match="local_file_only"):
        LOADERS[loader](folder, local_file_only=True)


def test_unset_unknown_options_are_ignored(folder: Path) -> None:
    """A keyword a future transformers passes with its default (None / False / empty) changes nothing."""
    AutoModel.from_pretrained(folder, some_future_option=None, another_one=False, third="")


def test_model_building_options_are_ignored_with_a_warning(folder: Path) -> None:
    with pytest.warns(UserWarning, match="device_map"):
        model = LearnedOptimizerModel.from_pretrained(folder, device_map="cpu", low_cpu_mem_usage=None)
    assert type(model) is LearnedOptimizerModel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LearnedOptimizerModel.from_pretrained(folder, device_map=None, low_cpu_mem_usage=False)


def test_dtype_other_than_float32_is_refused(folder: Path) -> None:
    assert AutoModel.from_pretrained(folder, dtype="auto").theta()["b0"].dtype == torch.float32
    LearnedOptimizerModel.from_pretrained(folder, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="float32"):
        LearnedOptimizerModel.from_pretrained(folder, dtype=torch.bfloat16)


def test_load_lopt_takes_the_same_download_options(folder: Path) -> None:
    model = nn.Linear(3, 2)
    optimizer = load_lopt(folder, model, proxies=None, user_agent={"my-app": "1"}, lr=0.5)
    assert optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError, match="local_file_only"):
        load_lopt(folder, model, local_file_only=True)


def test_download_options_reach_the_hub(hub_env) -> None:
    """user_agent / headers are forwarded to the real client and arrive at the (local) Hub; proxies=None is fine."""
    repo = hub_env.repo_id("options")
    create_artifact("small_fc_lopt", seed=1).push_to_hub(repo)
    start = len(hub_env.server.request_headers)
    model = AutoModel.from_pretrained(repo, proxies=None, user_agent={"lopt-test-agent": "7"},
                                      headers={"X-Lopt-Test": "yes"}, etag_timeout=5)
    assert type(model) is LearnedOptimizerModel
    downloads = [headers for (method, path), headers in zip(hub_env.server.requests[start:],
                                                            hub_env.server.request_headers[start:])
                 if "/resolve/" in path and path.endswith("model.safetensors")]
    assert downloads, "model.safetensors was not fetched from the Hub"
    assert all("lopt-test-agent/7" in headers.get("user-agent", "") for headers in downloads)
    assert all(headers.get("x-lopt-test") == "yes" for headers in downloads)
    assert all("lopt_hf" in headers.get("user-agent", "") for headers in downloads)
