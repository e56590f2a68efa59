"""Every code block of README.md runs as written.

Each fenced block is one test case, named after the README line of its opening fence:

* ``python`` blocks run as a script (``python block.py``) in a fresh temporary folder (two blocks at a time);
* ``bash`` blocks run with ``bash -e`` in a fresh temporary folder that links the checkout's ``scripts/``,
  ``configs/`` and, as ``.venv/``, the environment running the tests (so ``.venv/bin/python scripts/x.py`` works as from the repository root, but
  nothing is written into the checkout); ``lopt-hf``, ``hf``, ``accelerate``, ``torchrun`` are on ``PATH``;
* ``yaml`` blocks are meta-training config fragments: merged into the shipped ``quickstart`` config, the
  result must build (``lopt_hf.metatrain.config.config_from_dict``).

Every block reaches the Hub only through the local test server (``tests/hub_server.py``, via the
``hub_env`` fixture), which holds, before any block runs, the repos the README loads
(:data:`HUB_REPOS`: ``user/some-lopt`` is the shipped small-fc-lolo, the ``amoudgl/…`` repos hold the
reference Celo-family checkpoints of ``tests/fixtures/refvectors`` laid out like the authors' repos).
Pushes from blocks go to that server too.

A block whose opening fence directly follows the previous block's closing fence (no line between) continues
it: it runs in the same folder, after the previous block (e.g. ``hf download … --local-dir ./lopt``, then Python
that loads ``./lopt``).

A block may be preceded by HTML comments (invisible on GitHub) that say how it is tested:

* ``<!-- readme-test: skip (REASON) -->`` — not run; the reason is required (skips are few: see
  :data:`MAX_SKIPS`);
* ``<!-- readme-test: replace `OLD` with `NEW` (REASON) -->`` — run with OLD replaced by NEW (the smallest
  settings of a long job; OLD must occur in the block);
* ``<!-- readme-test: append ARGS (REASON) -->`` — bash only: ARGS appended to every command of the block
  (e.g. ``--print-config``: the command parses and resolves its config without training).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import FIXTURES, SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
# What a bash block's folder links: the checkout's scripts and configs, and as ".venv" the environment running
# these tests (the checkout's .venv under make test; .venv-latest under make test-latest).
CHECKOUT_LINKS = {"scripts": ROOT / "scripts", "configs": ROOT / "configs", ".venv": Path(sys.prefix)}
MAX_SKIPS = 3
TIMEOUT_S = 240
WORKERS = 2

# repo id -> {path in repo: file} uploaded to the local Hub before the blocks run.
SHIPPED = ROOT / "lopt_hf" / "pretrained" / "small-fc-lolo"
HUB_REPOS = {
    "user/some-lopt": {name: SHIPPED / name for name in ("config.json", "model.safetensors", "README.md")},
    "amoudgl/celo": {"theta.state": FIXTURES / "celo_published_theta.state"},
    "amoudgl/celo-adam": {"theta.state": FIXTURES / "celo_adam_published_theta.state"},
    "amoudgl/celo2": {"theta.state": FIXTURES / "celo2_theta1.state"},
}

DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(?P<kind>skip|replace|append)\b\s*(?P<body>.*?)\s*-->")
REPLACE = re.compile(r"^`(?P<old>[^`]+)`\s+with\s+`(?P<new>[^`]*)`\s*\((?P<reason>.+)\)$")
APPEND = re.compile(r"^(?P<args>[^(]+?)\s*\((?P<reason>.+)\)$")
SKIP = re.compile(r"^\((?P<reason>.+)\)$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
LANGUAGES = ("python", "bash", "yaml")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    end: int = -1  # 0-based index of the closing fence line
    skip: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)
    append: str | None = None
    previous: Block | None = None  # the block this one continues (glued to it in the README)

    def chain(self) -> list[Block]:
        """The blocks to run, in order, to run this one: those it continues, then itself."""
        return (self.previous.chain() if self.previous else []) + [self]

    def prepared(self) -> str:
        """The code as the test runs it: replacements applied, ``append`` arguments added to every command."""
        code = self.code
        for old, new in self.replacements:
            assert old in code, f"README.md line {self.line}: readme-test replace: `{old}` is not in the block"
            code = code.replace(old, new)
        if self.append:
            commands = [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()]
            code = "\n".join(shlex.join(words) + " " + self.append for words in commands if words) + "\n"
        return code


def parse_readme(text: str) -> list[Block]:
    """The fenced code blocks of ``text`` with the ``readme-test`` directives in the lines right above each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        block = Block(line=index + 1, lang=match["lang"], code="\n".join(lines[index + 1:end]) + "\n")
        if blocks and index > 0 and lines[index - 1].startswith("```") and index - 1 == blocks[-1].end:
            block.previous = blocks[-1]
        block.end = end
        above = index - 1
        while above >= 0 and lines[above].lstrip().startswith("<!--"):
            add_directive(block, lines[above])
            above -= 1
        blocks.append(block)
        index = end + 1
    return blocks


def add_directive(block: Block, comment: str) -> None:
    """Record the ``readme-test`` directive of one HTML comment line on ``block`` (other comments are ignored)."""
    match = DIRECTIVE.search(comment)
    if not match:
        assert "readme-test" not in comment, f"README.md line {block.line}: malformed directive {comment!r}"
        return
    kind, body = match["kind"], match["body"]
    parsed = {"skip": SKIP, "replace": REPLACE, "append": APPEND}[kind].match(body)
    assert parsed, f"README.md line {block.line}: `readme-test: {kind}` needs the form in tests/package/test_readme.py"
    if kind == "skip":
        block.skip = parsed["reason"]
    elif kind == "replace":
        block.replacements.append((parsed["old"], parsed["new"]))
    else:
        assert block.lang == "bash", f"README.md line {block.line}: `append` is for bash blocks"
        block.append = parsed["args"]


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
# One case per block that no later block continues (a continued block runs as the first part of its continuation).
CASES = [block for block in BLOCKS if not any(later.previous is block for later in BLOCKS)]


def test_the_readme_has_blocks_in_known_languages_and_few_skips() -> None:
    assert len(BLOCKS) >= 10
    assert [block.line for block in BLOCKS if block.lang not in LANGUAGES] == []
    assert len([block for block in BLOCKS if block.skip]) <= MAX_SKIPS


def test_directives_are_parsed() -> None:
    text = ("<!-- readme-test: replace `--steps 500` with `--steps 2` (minutes otherwise) -->\n"
            "<!-- readme-test: append --print-config (parse only) -->\n```bash\nlopt-hf eval --steps 500 \\\n"
            "  --seeds 0   # all\n# a comment\n```\n\n<!-- readme-test: skip (installs packages) -->\n"
            "```bash\npip x\n```\n")
    first, second = parse_readme(text)
    assert first.previous is None and second.previous is None
    glued = parse_readme("```bash\nhf download x\n```\n```python\nprint(1)\n```\n")
    assert [block.line for block in glued[1].chain()] == [1, 4]
    assert (first.line, first.replacements, first.append) == (3, [("--steps 500", "--steps 2")], "--print-config")
    assert first.prepared() == "lopt-hf eval --steps 2 --seeds 0 --print-config\n"
    assert second.skip == "installs packages" and second.line == 10
    with pytest.raises(AssertionError, match="line 2"):
        parse_readme("<!-- readme-test: skip -->\n```bash\nx\n```\n")  # no reason


@pytest.fixture(scope="module")
def readme_hub(hub_server) -> dict[str, str]:
    """The local Hub with :data:`HUB_REPOS` uploaded; the environment the blocks run in."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    for repo, files in HUB_REPOS.items():
        api.create_repo(repo, exist_ok=True)
        api.create_commit(repo, operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                            for name, path in files.items()], commit_message="upload")
    return {**os.environ, **SUBPROCESS_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MPLBACKEND": "Agg", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module")
def block_failures(request: pytest.FixtureRequest, readme_hub: dict[str, str],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Run every selected python/bash case, :data:`WORKERS` at a time, each in its own folder.

    README line of the case -> its failure message ("" when it ran). Each block is a single-threaded process
    (``OMP_NUM_THREADS=1``) that mostly imports and starts up, so two at a time halve the file's time on 2 cores.
    """
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_readme_block_runs" and item.module is request.module]
    runnable = [block for block in selected if not block.skip and block.lang != "yaml"]

    # the folders made here, one thread: tmp_path_factory makes its base folder on first use, and two
    # threads doing that at once fail with FileExistsError (every block then errors at setup)
    folders = {block.line: tmp_path_factory.mktemp(f"readme-line-{block.line}") for block in runnable}

    def run_case(block: Block) -> str:
        folder = folders[block.line]
        for name, target in CHECKOUT_LINKS.items():
            (folder / name).symlink_to(target)
        try:
            for step in block.chain():
                run_block(step, step.prepared(), folder, readme_hub)
        except (AssertionError, subprocess.TimeoutExpired) as err:
            return str(err)
        return ""

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip([block.line for block in runnable], pool.map(run_case, runnable)))


@pytest.mark.slow
@pytest.mark.parametrize("block", CASES, ids=["+".join(f"README.md:{step.line}-{step.lang}" for step in block.chain())
                                               for block in CASES])
def test_readme_block_runs(block: Block, block_failures: dict[int, str]) -> None:
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    if block.lang == "yaml":
        check_config_fragment(block, block.prepared())
        return
    if block_failures[block.line]:
        pytest.fail(block_failures[block.line], pytrace=False)


def run_block(block: Block, code: str, folder: Path, env: dict[str, str]) -> None:
    """Run one python or bash block in ``folder``; fail naming its README line, with its output."""
    assert block.lang in ("python", "bash"), f"README.md line {block.line}: cannot run a {block.lang} block"
    script = folder / ("readme_block.py" if block.lang == "python" else "readme_block.sh")
    script.write_text(code, encoding="utf-8")
    command = [sys.executable, script.name] if block.lang == "python" else ["bash", "-e", script.name]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (f"README.md line {block.line}: the {block.lang} block failed (exit "
                                    f"{result.returncode})\n{code}\n--- stdout ---\n{result.stdout[-3000:]}\n"
                                    f"--- stderr ---\n{result.stderr[-5000:]}")


def check_config_fragment(block: Block, code: str) -> None:
    """A YAML block is a piece of a meta-training config: the quickstart config with it must build."""
    from lopt_hf.metatrain.config import config_from_dict, load_yaml

    fragment = load_yaml(code)
    assert isinstance(fragment, dict) and fragment, f"README.md line {block.line}: not a YAML mapping"
    base = load_yaml((ROOT / "lopt_hf" / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    config_from_dict({**base, **fragment}, source=f"README.md line {block.line}")
