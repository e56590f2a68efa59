"""Output cut short by its reader (``lopt-hf metatrain --list-configs | head -5``) ends quietly.

A write to a pipe whose reader has gone raises ``BrokenPipeError`` — a ``ConnectionError``, which the
CLI otherwise reports as an unreachable Hub. The subprocess tests close the pipe's read end before the
command starts, so every write fails (deterministic, unlike racing a real ``head``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lopt_hf.cli import EXIT_STDOUT_CLOSED, EXIT_USER_ERROR, run_command, stdout_is_closed


@pytest.mark.parametrize("argv", [["metatrain", "--list-configs"], ["rules"]])
def test_a_closed_stdout_is_a_quiet_exit(argv: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        result = subprocess.run([sys.executable, "-m", "lopt_hf.cli", *argv], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)
    assert result.returncode == EXIT_STDOUT_CLOSED == 141, result.stderr
    assert result.stderr == ""  # no "could not reach the Hub", no "Exception ignored ... BrokenPipeError"


def test_a_broken_pipe_elsewhere_is_still_a_network_error(capsys: pytest.CaptureFixture[str]) -> None:
    """With stdout still read, a BrokenPipeError comes from a connection: reported as before."""
    def command() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command("push", command, debug=False) == EXIT_USER_ERROR
    assert "could not reach the Hub" in capsys.readouterr().err


def test_stdout_is_closed_only_once_its_reader_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert not stdout_is_closed()
        os.close(read_end)
        assert stdout_is_closed()
