"""Shared test helpers: tiny real tasks, a hand-built descending artifact, and the JAX reference vectors.

Tiny real tasks for the integration tests: models built from configs, data made locally.

* a character-level causal LM (``GPT2LMHeadModel`` from a 2-layer ``GPT2Config``) on public-domain
  text embedded here, tokenized by a character vocabulary built from that text;
* a sequence classifier (``BertForSequenceClassification`` from a tiny ``BertConfig``) on
  scikit-learn's digits: each 8×8 image is a sequence of 64 tokens (pixel intensity 0–16) after a
  ``[CLS]`` token, labelled with its digit.

Nothing is downloaded. Also a learned-optimizer artifact whose theta is *built by hand* to
descend (clipped momentum, see :func:`clipped_momentum_artifact`), for tests that need the loss
to go down — random-init theta does not promise that. And access to the JAX reference vectors
copied into ``tests/fixtures/refvectors`` (see ``fixtures/refvectors/SOURCE_README.md`` for how
they were produced): :func:`load_refvectors`, :func:`subtree`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file
from torch.utils.data import Dataset

# The Gettysburg Address (Lincoln, 1863, Bliss copy) and the opening of "A Tale of Two Cities"
# (Dickens, 1859): both in the public domain.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great "
    "civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We "
    "are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final "
    "resting place for those who here gave their lives that that nation might live. It is altogether fitting "
    "and proper that we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- "
    "we can not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated it, "
    "far above our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. It is for us the living, rather, to be dedicated here "
    "to the unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
    "be here dedicated to the great task remaining before us -- that from these honored dead we take increased "
    "devotion to that cause for which they gave the last full measure of devotion -- that we here highly "
    "resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new "
    "birth of freedom -- and that government of the people, by the people, for the people, shall not perish "
    "from the earth. "
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way."
)

BLOCK_SIZE = 32


class CharTokenizer:
    """Characters ↔ ids, vocabulary = the sorted characters of a text."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {char: i for i, char in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[char] for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class LMBlocks(Dataset):
    """Non-overlapping blocks of ``block_size`` token ids; ``labels`` = ``input_ids`` (the model shifts)."""

    def __init__(self, ids: list[int], block_size: int = BLOCK_SIZE) -> None:
        usable = len(ids) // block_size * block_size
        self.blocks = torch.tensor(ids[:usable]).view(-1, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def lm_data() -> tuple[CharTokenizer, LMBlocks]:
    tokenizer = CharTokenizer(TEXT)
    return tokenizer, LMBlocks(tokenizer.encode(TEXT))


def tiny_gpt2(vocab_size: int, seed: int = 0, dropout: float = 0.1):
    """lopt_hf's tiny GPT-2 (:func:`lopt_hf.evaluation.lm.make_char_gpt2`) at the size these tests use."""
    from lopt_hf.evaluation.lm import make_char_gpt2

    return make_char_gpt2(vocab_size, BLOCK_SIZE, n_layer=2, n_embd=32, n_head=2, dropout=dropout, seed=seed)


class DigitTokens(Dataset):
    """scikit-learn digits (``lopt_hf.data``, training split) as token sequences: ``[CLS]`` then 64 pixel
    intensities (tokens 0–16)."""

    CLS = 17
    VOCAB_SIZE = 18

    def __init__(self, limit: int | None = None) -> None:
        from lopt_hf.data import load_image_dataset

        digits = load_image_dataset("digits", split="train")
        tokens = (digits.images[:limit] * 16).round().long()
        self.input_ids = torch.cat([torch.full((len(tokens), 1), self.CLS), tokens], dim=1)
        self.labels = digits.labels[:limit].clone()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


def tiny_bert_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=DigitTokens.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=65, num_labels=10)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def clipped_momentum_theta(step_size: float = 2e-3, sharpness: float = 1e3) -> dict[str, torch.Tensor]:
    """``per_param_mlp`` theta whose step is ``step_size · clip(sharpness · momentum, −1, 1)``.

    Hidden units ``relu(k·m + 1)`` and ``relu(k·m − 1)``; their difference minus 1 is ``clip(k·m, −1, 1)``
    (the rule multiplies the first output by its ``step_mult`` 0.01 and ``exp(0.01 · 0)`` = 1).
    A sign-descent-with-momentum optimizer written as a learned one: it reliably lowers a loss.
    """
    theta = {"w0": torch.zeros(3, 64), "b0": torch.zeros(64), "w1": torch.zeros(64, 2), "b1": torch.zeros(2)}
    theta["w0"][1, 0], theta["b0"][0] = sharpness, 1.0
    theta["w0"][1, 1], theta["b0"][1] = sharpness, -1.0
    scale = step_size / 0.01
    theta["w1"][0, 0], theta["w1"][1, 0], theta["b1"][0] = scale, -scale, -scale
    return theta


def clipped_momentum_artifact(directory: Path, step_size: float = 2e-3) -> Path:
    """Save a :func:`clipped_momentum_theta` artifact (a real artifact folder) and return its path."""
    from lopt_hf import create_artifact

    create_artifact("per_param_mlp", theta=clipped_momentum_theta(step_size),
                    provenance={"source": "tests/support.py: hand-built clipped-momentum theta"}
                    ).save_pretrained(directory)
    return directory


# Trainer settings that run the learned step as meta-trained (constant, no clipping), plus quiet, fast test settings.
RECOMMENDED = {"lr_scheduler_type": "constant", "max_grad_norm": 0.0, "learning_rate": 1.0}


def training_args(output_dir: Path, **overrides):
    """``TrainingArguments`` for a quick CPU test run: recommended learned-optimizer settings, no reporting."""
    from transformers import TrainingArguments

    settings = {"output_dir": str(output_dir), "max_steps": 8, "per_device_train_batch_size": 8, "logging_steps": 1,
                "save_strategy": "no", "report_to": [], "use_cpu": True, "dataloader_num_workers": 0,
                "disable_tqdm": True, "seed": 0, **RECOMMENDED, **overrides}
    return TrainingArguments(**settings)


def train_losses(trainer) -> list[float]:
    """Per-log training losses from ``trainer.state.log_history`` (one per step with ``logging_steps=1``)."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# Environment for subprocess launches: one intra-op thread per process (see conftest.single_torch_thread).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- reference vectors

FIXTURES = Path(__file__).parent / "fixtures" / "refvectors"
# Leaves of the parameter tree in every file (JAX layout: kernels (in, out), conv HWIO).
PARAM_NAMES = ("conv/kernel", "dense1/bias", "dense1/kernel", "dense2/bias", "dense2/kernel", "scale")
NUM_STEPS = 6


def load_refvectors(stem: str) -> dict[str, torch.Tensor]:
    """All arrays of ``fixtures/refvectors/<stem>.safetensors`` as torch tensors.

    A file without its ``theta/…`` arrays (velo_4000's: 2.3M floats, stored once, in the original flax
    ``<stem>_theta.state`` beside it — checked identical when they were split) gets them from that file.
    """
    arrays = load_file(str(FIXTURES / f"{stem}.safetensors"))
    state = FIXTURES / f"{stem}_theta.state"
    if not any(key.startswith("theta/") for key in arrays) and state.is_file():
        from lopt_hf.convert.flax_msgpack import flatten_tree, read_flax_msgpack, to_torch

        arrays.update({f"theta/{name}": to_torch(value).to(torch.float32)
                       for name, value in flatten_tree(read_flax_msgpack(state)).items()})
    return arrays


def subtree(arrays: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Arrays under ``prefix/`` with the prefix stripped."""
    start = prefix.rstrip("/") + "/"
    return {key[len(start):]: value for key, value in arrays.items() if key.startswith(start)}


def theta_for(rule, seed: int = 1) -> dict[str, torch.Tensor]:
    """``rule``'s init theta plus N(0, 0.3²) noise (seeded), float64: a theta with no special structure."""
    generator = torch.Generator().manual_seed(seed)
    theta = rule.init_theta(generator)
    return {key: (value + 0.3 * torch.randn(value.shape, generator=generator)).double() for key, value in theta.items()}


def scheduled_refvector_steps(rule, stem: str, theta: dict[str, torch.Tensor] | None = None):
    """Replay ``stem`` (a Celo / Celo-Adam / VeLO reference file) through ``rule``'s own functions —
    ``tensor_summary`` → ``schedule`` → ``update`` per tensor, as both engines compose them — and
    yield, per step ``k``, ``(k, arrays, steps, states, schedule_state)``: the reference arrays, our
    step of each tensor (to compare with ``params − params_out``), each tensor's full state after the
    step and the whole-model state. Parameters and gradients are the stored inputs of each step.
    ``theta``: the meta-parameters to run with (default: the file's own ``theta/…``, e.g. to replay
    with a converted checkpoint's theta)."""
    import json

    arrays = load_refvectors(stem)
    meta = json.loads((FIXTURES / f"{stem}.json").read_text())
    theta = subtree(arrays, "theta") if theta is None else theta
    num_steps = int(meta["call"]["init"].split("num_steps=")[1].split(")")[0])
    states = {name: rule.init_state(arrays[f"init_params/{name}"]) for name in PARAM_NAMES}
    schedule_state = rule.init_schedule_state(num_steps)
    for k in range(NUM_STEPS):
        params = {name: arrays[f"step{k}/params/{name}"] for name in PARAM_NAMES}
        grads = {name: arrays[f"step{k}/grads/{name}"] for name in PARAM_NAMES}
        summaries = torch.stack([rule.tensor_summary(params[n], grads[n], states[n]) for n in PARAM_NAMES])
        rows = {key: torch.stack([states[n][key] for n in PARAM_NAMES]) for key in rule.schedule_tensor_keys}
        controls, schedule_state, rows = rule.schedule(theta, schedule_state, rows, summaries,
                                                       torch.full((len(PARAM_NAMES),), k), arrays[f"step{k}/loss"])
        steps = {}
        for index, name in enumerate(PARAM_NAMES):
            steps[name], new_state = rule.update(theta, params[name], grads[name], states[name], k,
                                                 control=controls[index])
            states[name] = {**states[name], **new_state, **{key: value[index] for key, value in rows.items()}}
        yield k, arrays, steps, states, schedule_state


# Rules whose default architecture is too large for the tests that run every registered rule, and the
# smallest published architecture of each (VeLO's default is velo_4000: 2.3M meta-parameters).
SMALL_RULE_CONFIGS: dict[str, dict] = {"velo": {"lstm_hidden_size": 64, "param_inits": 32, "ff_mult": 1.0}}


# Shapes for "a stack of same-shape tensors steps as each tensor alone" (Celo2's rule and kernel): 1-D,
# scalar, wide/tall/square matrices, conv kernels whose channel axes are the largest (closed-form sums)
# and one where a spatial axis is (element-wise), and one larger than a chunk (slow: `make test-all`).
STACK_SHAPES = [(7,), (), (13, 29), (29, 13), (16, 16), (3, 3, 4, 8), (9, 2, 3, 5),
                pytest.param((300, 200), marks=pytest.mark.slow, id="300x200")]


def small_rule(name: str):
    """``build_rule(name)`` with :data:`SMALL_RULE_CONFIGS` applied (the rule's defaults otherwise)."""
    from lopt_hf.rules import build_rule

    return build_rule(name, **SMALL_RULE_CONFIGS.get(name, {}))


# Our state names → the original's (decay axis last there, first here).
SCHEDULED_STATE_NAMES = {"momentum": "mom_rolling/m", "rms": "rms_rolling/rms", "v_row": "fac_rolling/v_row",
                         "v_col": "fac_rolling/v_col", "v_diag": "fac_rolling/v_diag"}


def assert_scheduled_state_matches(arrays: dict[str, torch.Tensor], k: int, states: dict, schedule_state: dict,
                                   keeps_every_accumulator: bool) -> None:
    """After step ``k`` of :func:`scheduled_refvector_steps`: every tensor's accumulators (relative: after the
    gradient spike rms entries reach ~1e4), LSTM rows and the loss buffer equal the reference's.
    ``keeps_every_accumulator``: the rule keeps every accumulator the original has (Celo-Adam drops the
    factored ones its step never reads)."""
    for index, name in enumerate(PARAM_NAMES):
        for ours, theirs in SCHEDULED_STATE_NAMES.items():
            key = f"step{k}/state/{theirs}/{name}"
            if ours in states[name]:
                expected = arrays[key]
                torch.testing.assert_close(states[name][ours].movedim(0, -1).reshape(expected.shape), expected,
                                           rtol=1e-5, atol=1e-9, msg=f"step {k} {name} {ours}")
            elif keeps_every_accumulator:
                assert arrays[key].numel() == 0, (k, name, ours)
        for ours, theirs in (("lstm_hidden", "hidden"), ("lstm_cell", "cell")):
            torch.testing.assert_close(states[name][ours], arrays[f"step{k}/state/lstm_hidden_state/{theirs}"][index],
                                       rtol=1e-5, atol=5e-6, msg=f"step {k} {name} {ours}")
    for ours, theirs in (("loss_means", "means"), ("loss_running_min", "running_min"), ("loss_decays", "decays")):
        torch.testing.assert_close(schedule_state[ours], arrays[f"step{k}/state/loss_buffer/{theirs}"],
                                   rtol=1e-5, atol=1e-6)
    assert float(schedule_state["iteration"]) == float(arrays[f"step{k}/state/iteration"]) == k + 1


def metatrain_cli(run_dir: Path, steps: int, overrides: list[str], *flags: str) -> int:
    """``lopt-hf metatrain --no-progress --steps STEPS FLAGS --set output_dir=RUN_DIR --set …`` (the exit code)."""
    from lopt_hf.cli import main as cli_main

    argv = ["metatrain", "--no-progress", "--steps", str(steps), *flags,
            *[arg for item in [f"output_dir={run_dir}", *overrides] for arg in ("--set", item)]]
    return cli_main(argv)


class RepeatedBlocks(nn.Module):
    """An embedding, three identical residual blocks (same-shape Linear weights, biases and norms), two
    convolutions and a head: a model whose tensors come in same-shape groups (what the optimizer stacks)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 12)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(12), "up": nn.Linear(12, 24),
                                                   "down": nn.Linear(24, 12)}) for _ in range(3))
        self.conv = nn.ModuleList(nn.Conv1d(12, 12, 3, padding=1) for _ in range(2))
        self.head = nn.Linear(12, 40)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](block["norm"](x))))
        for conv in self.conv:
            x = x + conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)
