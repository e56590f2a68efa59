"""Shared pytest fixtures.

Local Hugging Face Hub (see ``hub_server.py``), reached through the real clients by their public
configuration only — environment variables, set once here, before anything imports
``huggingface_hub`` (which reads them at import):

* the session's :class:`HubServer` on a free 127.0.0.1 port is started when this file is loaded;
  ``HF_ENDPOINT`` points at it, ``HF_TOKEN=hf_test``, ``HF_HOME``/``HF_HUB_CACHE`` are a fresh
  temporary folder, telemetry, update checks and progress bars are off. So every test — and every
  subprocess it starts — talks to the local server, never to huggingface.co.
* ``hub_server`` (session): that server (``.endpoint``, ``.store``, ``.requests``, ``.repo_id(prefix)``
  -> a fresh ``testuser/<prefix>-<hex>`` id, so tests never share a repo or its cache entries).
* ``hub_env`` (function): the server plus the environment above; ``hub_env.env`` is a ready ``env=``
  for ``subprocess.run`` (``hf`` CLI, ``python -c`` ...).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from hub_server import DEFAULT_TOKEN, HubServer

assert "huggingface_hub" not in sys.modules, "conftest must configure the Hub client before it is imported"

_SERVER = HubServer().start()
_HOME = Path(tempfile.mkdtemp(prefix="lopt_hf_test_hf_home_"))
atexit.register(shutil.rmtree, _HOME, True)
atexit.register(_SERVER.stop)

HUB_ENVIRONMENT = {
    "HF_ENDPOINT": _SERVER.endpoint,
    "HF_TOKEN": DEFAULT_TOKEN,
    "HF_HOME": str(_HOME),
    "HF_HUB_CACHE": str(_HOME / "hub"),
    "HF_XET_CACHE": str(_HOME / "xet"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DO_NOT_TRACK": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
os.environ.update(HUB_ENVIRONMENT)
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
              "HF_OIDC_ID_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_ASSETS_CACHE",
              "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_XET"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The local Hub of this session (started when conftest loads, stopped at exit)."""
    return _SERVER


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


@pytest.fixture
def hub_env(hub_server: HubServer) -> Iterator[HubEnv]:
    """The local Hub, with the environment every client in and out of this process uses to reach it."""
    import tqdm

    previous_interval = tqdm.tqdm.monitor_interval
    tqdm.tqdm.monitor_interval = 0  # even a disabled tqdm bar starts tqdm's (never-ending) monitor thread
    try:
        yield HubEnv(server=hub_server, endpoint=hub_server.endpoint, token=DEFAULT_TOKEN, home=_HOME,
                     cache_dir=_HOME / "hub", env=dict(os.environ))
    finally:
        tqdm.tqdm.monitor_interval = previous_interval


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
    from support import FIXTURES

    root = tmp_path_factory.mktemp("celo2_artifacts")
    folders = {}
    for variant in ("celo2", "celo2-base"):
        folders[variant] = root / variant
        convert_celo2(FIXTURES / "celo2_theta1.state", folders[variant], variant=variant)
    return folders
