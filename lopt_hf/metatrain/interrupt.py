"""Stopping meta-training cleanly on SIGINT / SIGTERM.

Ctrl-C (SIGINT) or a scheduler's SIGTERM must not lose the work since the last periodic
checkpoint, nor leave a half-finished outer step: :class:`StopSignals` turns the first such
signal into a request (``requested``) that the trainer honours at the next safe point — the end
of the current outer step — by writing a checkpoint, printing the command that resumes it and
raising :class:`MetaTrainingInterrupted`. A second signal of the same kind aborts at once (the
previous handler's behaviour), for a run that must stop now.

In a distributed run every process may receive the signal at a slightly different moment; the
trainer all-reduces the request with the meta-gradient, so all processes stop after the same
outer step.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["MetaTrainingInterrupted", "StopSignals", "exit_code", "resume_command"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status for a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class MetaTrainingInterrupted(SystemExit):
    """Meta-training stopped on a signal after checkpointing; exits with ``128 + signum``.

    A ``SystemExit`` so that any entry point (``scripts/metatrain.py``, ``lopt-hf metatrain``,
    ``accelerate launch``) ends with the conventional status and no traceback; code that drives
    :class:`~lopt_hf.metatrain.trainer.MetaTrainer` itself can catch it.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(exit_code(signum))
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set ``requested`` (the signal number) instead of killing.

    Handlers are only installed from the main thread (Python allows nothing else) and the
    previous ones are restored on exit.
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested == signum:  # the same signal again: stop now, as without this handler
            previous = self._previous.get(signum)
            self.__exit__(None, None, None)
            if callable(previous):
                previous(signum, frame)
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(exit_code(signum))
        if self.requested is None:
            self.requested = signum
            if self.announce:
                name = signal.Signals(signum).name
                print(f"\n{name}: stopping after this outer step and writing a checkpoint "
                      f"(send {name} again to stop at once, without one)", file=sys.stderr, flush=True)


def resume_command(argv: list[str] | None = None, *, distributed: bool = False) -> str:
    """The command line that continues this run: the one that started it, with ``--resume``.

    ``argv`` defaults to ``sys.argv``. A script run under ``accelerate launch`` (``distributed``)
    is shown with that launcher (add your launch options again); ``python -m`` packages and console
    scripts (``lopt-hf metatrain``) are shown as such. Anything that does not look like the
    meta-training command (a notebook, a test) gets the library form.
    """
    import shlex

    argv = list(sys.argv if argv is None else argv)
    program, args = (argv[0] if argv else ""), argv[1:]
    if not any(arg == "--resume" or arg.startswith("--resume=") for arg in args):
        args.append("--resume")
    name = Path(program).name
    if name == "__main__.py":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        package = (spec.name.removesuffix(".__main__") if spec is not None else Path(program).parent.name)
        words = ["python", "-m", package, *args]
    elif name.endswith(".py"):
        words = [*(["accelerate", "launch"] if distributed else ["python"]), program, *args]
    else:
        words = [name, *args]
    if "metatrain" not in " ".join(words[:4]):
        return "MetaTrainer(config, resume=True).train() (or the metatrain command with --resume)"
    return shlex.join(words)
