"""The local Hub server (tests/hub_server.py) driven through the REAL clients only: HfApi, hf_hub_download,
snapshot_download, the `hf` CLI, transformers' push_to_hub / from_pretrained."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    create_repo,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import load_file, save_file

from hub_server import HubServer

README = "---\nlicense: apache-2.0\ntags:\n- learned-optimizer\n---\n# Test model\n"
TENSORS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}


def _client_threads() -> set[threading.Thread]:
    """Live threads, minus the fake Hub's own per-request handlers (they may still be closing their socket)."""
    return {t for t in threading.enumerate() if "process_request_thread" not in t.name}


def _make_folder(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "README.md").write_text(README)
    save_file(TENSORS, str(root / "model.safetensors"))
    return root


@pytest.fixture
def pushed_repo(hub_env, tmp_path):
    """A repo with two commits: v1 (config a=1 + weights + README), then v2 changing config.json only."""
    threads_before = _client_threads()
    api = HfApi()
    repo_id = hub_env.repo_id("roundtrip")
    url = api.create_repo(repo_id, exist_ok=True)
    assert url.repo_id == repo_id and url.endpoint == hub_env.endpoint
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # idempotent (409 swallowed)
    folder = _make_folder(tmp_path / "upload", {"a": 1})
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1")
    second = api.upload_file(path_or_fileobj=b'{"a": 2}', path_in_repo="config.json", repo_id=repo_id,
                             commit_message="v2")
    assert first.oid != second.oid and len(first.oid) == 40 and len(second.oid) == 40
    # upload_folder (pipelined when hf_xet is installed) joined its committer thread; nothing else started.
    assert _client_threads() <= threads_before
    return repo_id, folder, first.oid, second.oid


def test_upload_then_download_pinned_revision(hub_env, pushed_repo):
    repo_id, folder, v1, v2 = pushed_repo
    api = HfApi()

    # Pinned to the first commit: the old content comes back; default/main: the new one.
    old = hf_hub_download(repo_id, "config.json", revision=v1)
    assert json.loads(Path(old).read_text()) == {"a": 1}
    assert f"snapshots/{v1}/" in Path(old).as_posix() and str(hub_env.cache_dir) in old
    assert json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text()) == {"a": 2}
    assert json.loads(Path(hf_hub_download(repo_id, "config.json", revision="main")).read_text()) == {"a": 2}
    assert json.loads(Path(hf_hub_download(repo_id, "config.json", revision=v1[:10])).read_text()) == {"a": 1}

    weights = hf_hub_download(repo_id, "model.safetensors", revision=v1)
    assert Path(weights).read_bytes() == (folder / "model.safetensors").read_bytes()
    loaded = load_file(weights)
    for k, v in TENSORS.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype

    # The HEAD metadata the client relies on.
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "model.safetensors", revision="main"))
    data = (folder / "model.safetensors").read_bytes()
    assert meta.commit_hash == v2 and meta.etag == git_hash(data) and meta.size == len(data)
    assert meta.xet_file_data is None

    # Repo metadata / listings.
    files = [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert sorted(api.list_repo_files(repo_id)) == files
    assert sorted(api.list_repo_files(repo_id, revision=v1)) == files
    info = api.model_info(repo_id)
    assert info.sha == v2 and sorted(s.rfilename for s in info.siblings) == files
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert "learned-optimizer" in info.tags
    assert api.model_info(repo_id, revision=v1).sha == v1
    assert model_info(repo_id, files_metadata=True).siblings[0].size is not None  # module-level HfApi instance
    tree = {e.path: e for e in api.list_repo_tree(repo_id, revision=v1)}
    assert tree["model.safetensors"].size == len(data) and tree["model.safetensors"].blob_id == git_hash(data)
    assert api.repo_exists(repo_id) and api.revision_exists(repo_id, v1)
    assert api.file_exists(repo_id, "model.safetensors") and not api.file_exists(repo_id, "nope.bin")

    # Re-uploading identical content: the client skips it (preupload returns the remote oid) -> no new commit.
    again = api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=["*.safetensors"])
    assert again.oid == v2


def test_snapshot_download_and_hf_cli(hub_env, pushed_repo, tmp_path):
    repo_id, folder, v1, v2 = pushed_repo

    snap = Path(snapshot_download(repo_id, revision=v1))
    assert snap.name == v1
    for name in ("README.md", "model.safetensors", "config.json"):
        assert filecmp.cmp(snap / name, folder / name, shallow=False), name

    local = Path(snapshot_download(repo_id, local_dir=tmp_path / "local"))
    assert json.loads((local / "config.json").read_text()) == {"a": 2}
    assert filecmp.cmp(local / "model.safetensors", folder / "model.safetensors", shallow=False)

    # The real CLI, as a subprocess that only gets the env vars.
    hf = Path(sys.executable).with_name("hf")
    out_dir = tmp_path / "cli"
    proc = subprocess.run([str(hf), "download", repo_id, "--revision", v1, "--local-dir", str(out_dir)],
                          env=hub_env.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("README.md", "model.safetensors", "config.json"):
        assert filecmp.cmp(out_dir / name, folder / name, shallow=False), name
    assert (out_dir / ".gitattributes").is_file()


def test_offline_mode_reuses_cache(hub_env, pushed_repo, monkeypatch):
    repo_id, folder, v1, v2 = pushed_repo
    cached_cfg = hf_hub_download(repo_id, "config.json")
    cached_snap = snapshot_download(repo_id)
    n_requests = len(hub_env.server.requests)

    script = textwrap.dedent(f"""
        import json, sys
        from huggingface_hub import constants, hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        assert constants.HF_HUB_OFFLINE
        print(json.dumps({{
            "cfg": hf_hub_download({repo_id!r}, "config.json"),
            "snap": snapshot_download({repo_id!r}),
        }}))
        try:
            hf_hub_download({repo_id!r}, "config.json", revision={v1!r})  # never downloaded at v1
        except LocalEntryNotFoundError:
            sys.exit(0)
        sys.exit("expected LocalEntryNotFoundError")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**hub_env.env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert paths == {"cfg": cached_cfg, "snap": cached_snap}
    assert len(hub_env.server.requests) == n_requests  # the offline process never called the server

    # Same thing in-process: offline mode is the constant, captured at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hf_hub_download(repo_id, "config.json") == cached_cfg
    assert len(hub_env.server.requests) == n_requests


def test_errors_map_to_client_exceptions(hub_env, pushed_repo):
    repo_id, _, v1, _ = pushed_repo
    api = HfApi()
    missing = hub_env.repo_id("missing")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing, "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(missing)
    assert not api.repo_exists(missing)

    with pytest.raises(EntryNotFoundError) as err:
        hf_hub_download(repo_id, "does-not-exist.json")
    assert isinstance(err.value, RemoteEntryNotFoundError)
    with pytest.raises(EntryNotFoundError):  # the cached `.no_exist` marker answers the second time
        hf_hub_download(repo_id, "does-not-exist.json")

    bad_rev = "0" * 40
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision=bad_rev)
    assert not api.revision_exists(repo_id, bad_rev)


def test_commit_api_and_branches_without_xet(hub_env, monkeypatch):
    # Force the legacy (non-pipelined) upload path too; with hf_xet installed upload_folder pipelines.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    repo_id = hub_env.repo_id("commits")
    create_repo(repo_id)  # module-level function -> `huggingface_hub.hf_api.api`, built from HF_ENDPOINT at import
    api = HfApi()
    c1 = api.create_commit(repo_id, commit_message="add", operations=[
        CommitOperationAdd("a/x.txt", b"x1"), CommitOperationAdd("a/y.txt", b"y1"), CommitOperationAdd("z.bin", b""),
    ])
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "a/x.txt", "a/y.txt", "z.bin"]
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="a")] == ["a/x.txt", "a/y.txt"]

    with pytest.raises(HfHubHTTPError) as err:  # stale parent commit
        api.create_commit(repo_id, commit_message="stale", parent_commit="0" * 40,
                          operations=[CommitOperationAdd("q.txt", b"q")])
    assert err.value.response.status_code == 412

    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    c2 = api.create_commit(repo_id, revision="dev", commit_message="dev work", operations=[
        CommitOperationDelete("a/"), CommitOperationAdd("x.txt", b"dev"),
    ])
    assert sorted(api.list_repo_files(repo_id, revision="dev")) == [".gitattributes", "x.txt", "z.bin"]
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "a/x.txt", "a/y.txt", "z.bin"]
    assert Path(hf_hub_download(repo_id, "x.txt", revision="dev")).read_bytes() == b"dev"
    assert api.model_info(repo_id, revision="dev").sha == c2.oid

    assert api.model_info(repo_id).sha == c1.oid  # main is where it was


def test_module_level_upload_folder_and_missing_namespace(hub_env, tmp_path):
    # `create_repo("name")` without a namespace lands in the token owner's namespace, like on the Hub.
    url = create_repo(f"bare-{os.urandom(4).hex()}")
    assert url.namespace == hub_env.server.store.user
    folder = _make_folder(tmp_path / "f", {"b": 1})
    info = upload_folder(repo_id=url.repo_id, folder_path=folder)
    assert info.commit_url.startswith(hub_env.endpoint)
    assert HfApi().whoami()["name"] == hub_env.server.store.user


def test_transformers_push_to_hub_and_from_pretrained(hub_env):
    from transformers import AutoConfig, BertConfig

    repo_id = hub_env.repo_id("bert-config")
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37)
    commit = config.push_to_hub(repo_id)
    assert HfApi().model_info(repo_id).sha == commit.oid
    assert sorted(HfApi().list_repo_files(repo_id)) == [".gitattributes", "README.md", "config.json"]

    loaded = AutoConfig.from_pretrained(repo_id)
    assert type(loaded) is BertConfig
    assert (loaded.vocab_size, loaded.hidden_size, loaded.intermediate_size) == (99, 32, 37)
    assert AutoConfig.from_pretrained(repo_id, revision=commit.oid).hidden_size == 32

    # A second push: transformers loads the existing model card (README.md) first, then commits again.
    config.hidden_size = 64
    commit2 = config.push_to_hub(repo_id, commit_message="bigger")
    assert AutoConfig.from_pretrained(repo_id).hidden_size == 64
    assert AutoConfig.from_pretrained(repo_id, revision=commit.oid).hidden_size == 32
    assert HfApi().model_info(repo_id).sha == commit2.oid


def test_server_stop_leaves_no_threads():
    before = set(threading.enumerate())
    with HubServer() as server:
        req = urllib.request.Request(f"{server.endpoint}/api/repos/create", method="POST",
                                     data=json.dumps({"name": "t"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["url"] == f"{server.endpoint}/testuser/t"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.endpoint}/api/models/testuser/nope", timeout=10)
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "RepoNotFound"
    assert set(threading.enumerate()) <= before


def test_transformers_model_weights_roundtrip(hub_env):
    from transformers import AutoModel, BertConfig, BertModel

    repo_id = hub_env.repo_id("tiny-bert")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=20, max_position_embeddings=32))
    model.push_to_hub(repo_id)
    assert "model.safetensors" in HfApi().list_repo_files(repo_id)
    loaded = AutoModel.from_pretrained(repo_id)
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
