"""Expected failures of every ``lopt-hf`` command: one line on stderr, exit code 2, no traceback (``--debug`` shows it).

In-process (``lopt_hf.cli.main``). Hub cases run against the local test Hub (``hub_env``), an
endpoint nobody listens on (a closed port: connection refused) and a stand-in that refuses every
token (401 / 403). huggingface_hub reads its endpoint and offline mode at import, so those are
switched through its ``constants`` (as ``tests/hub/test_hub_server.py`` does).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from lopt_hf.cli import CommandError, build_parser, check_hub_artifacts, looks_like_local_path, main


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``lopt-hf argv``; it must exit 2 with exactly one line on stderr, no traceback. Returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lopt-hf {argv[0]}: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_errors") / "artifact"
    assert main(["create", "per_param_mlp", str(folder)]) == 0
    return folder


def closed_port_endpoint() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there, connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


# ================================================================== local mistakes: no network at all


@pytest.mark.parametrize("folder", ["nodir", "./nodir", "~/lopt-hf-no-such-dir", "runs/x/final"])
def test_push_of_a_missing_folder_says_so_and_never_calls_the_hub(folder: str, hub_env, capsys) -> None:
    before = len(hub_env.server.requests)
    line = fails(["push", folder, "user/x"], capsys)
    assert f"folder {folder} does not exist" in line
    assert len(hub_env.server.requests) == before


@pytest.mark.parametrize("repo_id", ["bad//id", "user/x/y", "user name", "user/a..b"])
def test_push_checks_the_repo_id_before_the_network(repo_id: str, artifact: Path, hub_env, capsys) -> None:
    before = len(hub_env.server.requests)
    assert "is not a valid Hub repo id" in fails(["push", str(artifact), repo_id], capsys)
    assert len(hub_env.server.requests) == before


def test_card_of_a_missing_folder(hub_env, capsys) -> None:
    before = len(hub_env.server.requests)
    assert "folder nodir does not exist" in fails(["card", "nodir"], capsys)
    assert len(hub_env.server.requests) == before


def test_card_of_a_folder_that_is_not_an_artifact(tmp_path: Path, capsys) -> None:
    assert "config.json" in fails(["card", str(tmp_path)], capsys)  # the ArtifactError, in one line


@pytest.mark.parametrize(("rule_config", "expected"), [
    ("hidden_size=16", "is not JSON"),
    ("[16]", "is a JSON list; expected an object"),
    ('{"nope": 1}', "no hyper-parameter(s) ['nope']"),  # ArtifactError of create_artifact
])
def test_create_with_a_bad_rule_config(rule_config: str, expected: str, tmp_path: Path, capsys) -> None:
    line = fails(["create", "per_param_mlp", str(tmp_path / "out"), "--rule-config", rule_config], capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_create_with_an_unknown_rule_suggests_one(tmp_path: Path, capsys) -> None:
    line = fails(["create", "per_param_mpl", str(tmp_path / "out")], capsys)
    assert "did you mean 'per_param_mlp'?" in line and "celo2-base" in line


def test_create_refuses_a_non_empty_folder_unless_forced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--force" in fails(["create", "per_param_mlp", str(out)], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["create", "per_param_mlp", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    (tmp_path / "file").write_text("")
    assert "is a file" in fails(["create", "per_param_mlp", str(tmp_path / "file")], capsys)


def test_create_into_an_empty_folder_is_fine(tmp_path: Path) -> None:
    assert main(["create", "per_param_mlp", str(tmp_path)]) == 0


@pytest.mark.parametrize(("name", "orthogonalize", "harness"), [("celo2", True, "celo2"), ("celo2-base", False, None)])
def test_create_accepts_the_presets_of_bench(name: str, orthogonalize: bool, harness: str | None,
                                             tmp_path: Path) -> None:
    assert main(["create", name, str(tmp_path / name), "--rule-config", '{"hidden_size": 4}']) == 0
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["rule"] == "celo2"
    assert config["rule_config"]["orthogonalize"] is orthogonalize and config["rule_config"]["hidden_size"] == 4
    assert (config["harness"] or {}).get("type") == harness
    assert config["optimizer_defaults"]["lr"] == 1e-3  # Celo2's step multiplier, as `lopt-hf convert` writes


def test_export_of_a_missing_checkpoint_lists_what_exists(tmp_path: Path, capsys) -> None:
    checkpoints = tmp_path / "runs" / "quickstart" / "checkpoints"
    for step in ("step-00000100", "step-00000150"):
        (checkpoints / step).mkdir(parents=True)
    line = fails(["export", str(checkpoints / "step-00000200"), str(tmp_path / "out")], capsys)
    assert "does not exist" in line and "step-00000100, step-00000150" in line


def test_export_checks_the_push_repo_id_first(tmp_path: Path, capsys) -> None:
    assert "not a valid Hub repo id" in fails(["export", str(tmp_path), str(tmp_path / "o"), "--push-to-hub", "a//b"],
                                              capsys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["bench", "--rules", "celo2-bse"], "did you mean 'celo2-base'?"),
    (["bench", "--layers", "512,x"], "comma-separated integer widths"),
    (["bench", "--compile", "--warmup", "0"], "--compile needs --warmup >= 1"),
    (["eval", "--optimizers", "./no-such-lopt"], "folder ./no-such-lopt does not exist"),
    (["eval", "--optimizers", "adamw:-1"], "learning rate must be a positive number"),
    (["convert", "celo2", "no-such-theta.state", "out"], "no-such-theta.state"),
])
def test_other_commands(argv: list[str], expected: str, capsys) -> None:
    assert expected in fails(argv, capsys)


def test_debug_shows_the_traceback(capsys) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        main(["--debug", "push", "nodir", "user/x"])
    with pytest.raises(CommandError, match="does not exist"):
        main(["push", "nodir", "user/x", "--debug"])


def test_debug_before_metatrain(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:  # metatrain's own parser still answers --help
        main(["--debug", "metatrain", "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_looks_like_local_path(tmp_path: Path) -> None:
    for text in ("./x", "../x", "~/x", "/abs/x", "runs/x/final", str(tmp_path)):
        assert looks_like_local_path(text), text
    for text in ("user/name", "name"):
        assert not looks_like_local_path(text), text


# ============================================================================== offline / unreachable


def test_offline_push_fails_at_once(artifact: Path, hub_env, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_env.server.requests)
    assert "HF_HUB_OFFLINE is set" in fails(["push", str(artifact), hub_env.repo_id("offline")], capsys)
    assert len(hub_env.server.requests) == before


def test_offline_eval_of_an_uncached_hub_artifact_fails_before_training(hub_env, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    line = fails(["eval", "--optimizers", hub_env.repo_id("uncached"), "--tasks", "digits_mlp"], capsys)
    assert "not in the local Hub cache (HF_HUB_OFFLINE is set" in line
    assert time.perf_counter() - start < 10


def test_unreachable_hub_push_fails_fast(artifact: Path, monkeypatch, capsys) -> None:
    endpoint = closed_port_endpoint()
    use_endpoint(monkeypatch, endpoint)
    start = time.perf_counter()
    line = fails(["push", str(artifact), "user/x"], capsys)
    assert f"could not reach the Hub at {endpoint}" in line and "HF_HUB_OFFLINE=1" in line
    assert time.perf_counter() - start < 10


def test_unreachable_hub_eval_fails_fast_instead_of_retrying(monkeypatch, tmp_path: Path, capsys) -> None:
    # Without the probe, hf_hub_download retries an uncached file for ~25 s (1+2+4+8+8 s backoff) first.
    endpoint = closed_port_endpoint()
    use_endpoint(monkeypatch, endpoint)
    start = time.perf_counter()
    line = fails(["eval", "--optimizers", "user/not-cached", "--tasks", "digits_mlp", "--steps", "1", "--seeds", "0",
                  "--out", str(tmp_path / "eval")], capsys)
    assert "user/not-cached" in line and f"the Hub at {endpoint} could not be reached" in line
    assert "not in the local cache" in line and "HF_HUB_OFFLINE=1" in line
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "eval").exists()


def test_unreachable_hub_with_a_cached_artifact_is_no_error(artifact: Path, hub_env, monkeypatch) -> None:
    from huggingface_hub import hf_hub_download

    repo = hub_env.repo_id("cached")
    assert main(["push", str(artifact), repo]) == 0
    hf_hub_download(repo, "config.json")
    hf_hub_download(repo, "model.safetensors")
    use_endpoint(monkeypatch, closed_port_endpoint())
    check_hub_artifacts([repo])  # the load then falls back to the cache after one failed request
    with pytest.raises(CommandError, match="not in the local cache"):
        check_hub_artifacts([hub_env.repo_id("never-downloaded")])


# ======================================================================================== auth


class RefusingHub(BaseHTTPRequestHandler):
    """Answers every request with the status in ``server.status`` (401 / 403), as the Hub does for a bad token."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = answer


@pytest.fixture
def refusing_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    server.status = 401  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_gets_the_login_hint(status: int, artifact: Path, refusing_hub, capsys) -> None:
    refusing_hub.status = status  # type: ignore[attr-defined]
    line = fails(["push", str(artifact), "user/x"], capsys)
    assert str(status) in line and "hf auth login" in line and "HF_TOKEN" in line


# ========================================================================================= help


def test_version(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lopt-hf {version('lopt_hf')}"


def test_every_argument_has_help() -> None:
    import argparse

    parser = build_parser()
    missing = []
    for sub_action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public listing
        for name, sub in sub_action.choices.items():
            missing += [f"{name} {action.dest}" for action in sub._actions  # noqa: SLF001
                        if not isinstance(action, argparse._HelpAction) and not action.help]  # noqa: SLF001
    missing += [action.dest for action in parser._actions if not action.help]  # noqa: SLF001
    assert not missing


def test_metatrain_checks_push_to_hub_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    run = ["metatrain", "--steps", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert "not a valid Hub repo id" in fails([*run, "--push-to-hub", "bad//id"], capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in fails([*run, "--set", "push_to_hub=user/x"], capsys)
    assert not (tmp_path / "run").exists()
