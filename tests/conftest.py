"""Shared pytest fixtures.

Local Hugging Face Hub (see ``hub_server.py``):

* ``hub_server`` (session): a :class:`HubServer` on a free 127.0.0.1 port. ``.endpoint``, ``.store``,
  ``.requests``, ``.repo_id(prefix)`` -> a fresh ``testuser/<prefix>-<hex>`` id.
* ``hub_env`` (function): points the real client at it, for this process *and* subprocesses:
  env vars (``HF_ENDPOINT``, ``HF_TOKEN=hf_test``, ``HF_HOME``/``HF_HUB_CACHE`` in a tmp dir, telemetry and
  update checks off, offline off) via ``monkeypatch.setenv``, plus the module-level copies that
  ``huggingface_hub`` (and ``transformers``) captured at import time (see ``_point_hub_clients_at``).
  ``hub_env.env`` is a ready ``env=`` for ``subprocess.run`` (``hf`` CLI, ``python -c``...).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from hub_server import DEFAULT_TOKEN, HubServer


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """A fake Hub on 127.0.0.1:<free port> for the whole session (stopped, threads joined, at the end)."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class HubEnv:
    server: HubServer
    endpoint: str
    token: str
    home: Path  # HF_HOME
    cache_dir: Path  # HF_HUB_CACHE
    env: dict[str, str] = field(default_factory=dict)  # full environment for subprocesses

    def repo_id(self, prefix: str = "repo") -> str:
        return self.server.repo_id(prefix)


# Module-level names that huggingface_hub / transformers modules copy out of `huggingface_hub.constants` at import
# time (`from ..constants import ENDPOINT`, `HF_MODULES_CACHE = os.path.join(constants.HF_HOME, "modules")`...).
_CAPTURED_NAMES = (
    "ENDPOINT",
    "HUGGINGFACE_CO_URL_TEMPLATE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "AGENT_HARNESSES_PATH",
    "CHECK_FOR_UPDATE_DONE_PATH",
    "CHECK_FOR_SKILL_UPDATE_DONE_PATH",
    "HF_MODULES_CACHE",
)
_SCANNED_PACKAGES = ("huggingface_hub", "transformers")
# Imported eagerly so their import-time copies are patched (and restored) rather than created mid-test.
_EAGER_MODULES = (
    "huggingface_hub.hf_api",
    "huggingface_hub.file_download",
    "huggingface_hub.utils._http",
    "huggingface_hub.utils._cache_manager",
    "huggingface_hub.utils._cache_assets",
    "huggingface_hub.utils._git_credential",
)


def _scanned_modules() -> list[Any]:
    return [m for name, m in list(sys.modules.items())
            if m is not None and name.split(".")[0] in _SCANNED_PACKAGES]


def _point_hub_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> Any:
    """Patch every import-time copy of the Hub endpoint / cache paths; returns an undo-leftovers callable.

    `monkeypatch` restores what existed before the test; the returned callable (run at teardown, before
    monkeypatch's undo) fixes copies made by modules first imported *during* the test.
    """
    from huggingface_hub import HfApi, constants

    for name in _EAGER_MODULES:
        importlib.import_module(name)
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.utils.hub")  # ~0.7 s, no torch; holds the cached `hf_api()`

    hub_cache = home / "hub"
    new: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_MODULES_CACHE": str(home / "modules"),
    }
    old: dict[str, Any] = {k: getattr(constants, k) for k in new if hasattr(constants, k)}
    old["HF_MODULES_CACHE"] = os.path.join(old["HF_HOME"], "modules")

    # 1. huggingface_hub.constants itself (read at call time by most of the library).
    for name in old:
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, new[name])
    extra_hosts = {urlsplit(endpoint).hostname}
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | extra_hosts))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_UPDATE_CHECK", True)

    # 2. Copies captured at import time: `from ..constants import ENDPOINT` & co, `HF_MODULES_CACHE` in
    #    transformers, and HfApi instances built at import (`huggingface_hub.hf_api.api`, behind the module-level
    #    `create_repo`, `upload_folder`, `model_info`... functions) or cached lazily (`transformers.utils.hub._hf_api`).
    patched: set[tuple[int, str]] = set()
    for mod in _scanned_modules():
        if mod is constants:
            continue
        for name in _CAPTURED_NAMES:
            if name in old and isinstance(vars(mod).get(name), str) and vars(mod)[name] == old[name]:
                monkeypatch.setattr(mod, name, new[name])
                patched.add((id(mod), name))
        for value in list(vars(mod).values()):
            if isinstance(value, HfApi) and value.endpoint == old["ENDPOINT"]:
                monkeypatch.setattr(value, "endpoint", endpoint)
                patched.add((id(value), "endpoint"))

    # 3. Progress bars off in-process (the env var was captured by `huggingface_hub.utils.tqdm` at import); this
    #    also keeps tqdm's monitor thread and the upload pipeline's live-display thread from starting.
    hf_tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")  # `utils.tqdm` the attribute is a class

    monkeypatch.setattr(hf_tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    import tqdm.std  # even a disabled tqdm bar starts tqdm's (never-ending) monitor thread unless this is 0

    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)

    # 4. Origins the client follows redirects to with the auth header (frozen at import in utils._http).
    from huggingface_hub.utils import _http

    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))

    def undo_leftovers() -> None:
        for mod in _scanned_modules():
            if mod is constants:
                continue
            for name in _CAPTURED_NAMES:
                if (id(mod), name) not in patched and name in old and vars(mod).get(name) == new[name]:
                    setattr(mod, name, old[name])
            for value in list(vars(mod).values()):
                if isinstance(value, HfApi) and value.endpoint == endpoint and (id(value), "endpoint") not in patched:
                    value.endpoint = old["ENDPOINT"]

    return undo_leftovers


@pytest.fixture
def hub_env(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEnv]:
    """Point huggingface_hub / transformers / subprocesses at `hub_server`, with a private tmp HF_HOME."""
    home = tmp_path / "hf_home"
    home.mkdir()
    endpoint = hub_server.endpoint

    env_vars = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": DEFAULT_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DO_NOT_TRACK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
                "HF_OIDC_ID_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_ASSETS_CACHE",
                "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(key, raising=False)

    undo_leftovers = _point_hub_clients_at(monkeypatch, endpoint, home)
    try:
        yield HubEnv(server=hub_server, endpoint=endpoint, token=DEFAULT_TOKEN, home=home,
                     cache_dir=home / "hub", env=dict(os.environ))
    finally:
        undo_leftovers()


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Run the test with one intra-op thread (restored afterwards).

    The integration tests train tiny models, for which one thread is fastest; on a shared 2-core
    machine two spinning OpenMP threads next to another busy process made a 27K-parameter GPT-2
    step ~100x slower.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def celo2_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both Celo2 variants converted from the reference ``celo2_theta1.state`` (lopt-hf convert celo2)."""
    from lopt_hf.convert.celo2 import convert_celo2
    from refvectors import FIXTURES

    root = tmp_path_factory.mktemp("celo2_artifacts")
    folders = {}
    for variant in ("celo2", "celo2-base"):
        folders[variant] = root / variant
        convert_celo2(FIXTURES / "celo2_theta1.state", folders[variant], variant=variant)
    return folders
