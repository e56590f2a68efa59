"""A language-modelling task family: tiny character-level transformers, written functionally so tasks vmap.

:class:`CharLMTaskFamily` (``"char_lm"``) trains a pre-LayerNorm GPT-style decoder (token and
position embeddings, ``num_layers`` blocks of causal multi-head attention and a 4×-wide GELU MLP,
a final LayerNorm and an untied linear read-out) to predict the next character of windows of a
text. The model is a function of a params dict (``F.embedding``, matmuls, ``F.layer_norm``, causal
softmax attention: :func:`causal_attention`), so ``torch.func.vmap`` batches many
tasks — each with its own initialisation, text segment and re-parameterisation scales — like the
image families of :mod:`lopt_hf.metatrain.tasks`.

Dense weights are stored ``(fan_in, fan_out)`` (the JAX layout, like the MLP family's); the two
embedding tables are ``(rows, model_dim)`` in either framework. The vocabulary is the sorted set of
the text's characters (the convention of ``lopt_hf.evaluation.lm.make_char_data``), and the
normalised loss divides by ``ln(vocab)``, the loss of a uniform guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.corpora import BUILTIN_CORPORA, builtin_corpus
from .tasks import (SCALE_PREFIX, Batch, Params, TaskDescriptor, TaskFamily, check_scale_range, sample_scales, scaled,
                    truncated_normal)

__all__ = ["CharLMTaskFamily", "causal_attention"]

EMBEDDING_STD = 0.02  # GPT-2's initial std of the token and position embeddings (and here of the read-out)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` written out: ``(..., length, head_dim)``.

    Under ``torch.func.vmap`` the fused CPU kernel has no batching rule (PyTorch 2.x warns and loops
    over the members, forward and backward); these plain ops batch into single ``bmm`` calls and trace
    for the compiled inner step.
    """
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v


class CharLMTaskFamily(TaskFamily):
    """Next-character prediction with a tiny transformer on windows of one text.

    Args:
        text: the text to model, ``text_file``: a UTF-8 file holding it, or ``corpus``: the name of a
            built-in text (:data:`BUILTIN_CORPORA`) — exactly one of the three.
        context_length: characters per training window (the model's context).
        model_dim, num_heads, num_layers: the transformer's width, heads per attention and blocks.
        batch_size: windows per inner step.
        segment_length: characters of the text one task trains on, starting at a per-task offset drawn
            uniformly (``None``: the whole text, offset 0). Tasks then differ in data as well as in
            initialisation and re-parameterisation scales.
        param_scale_range: per-tensor re-parameterisation scales, log-uniform (see the image families).
    """

    name = "char_lm"

    def __init__(self, text: str | None = None, text_file: str | None = None, corpus: str | None = None,
                 context_length: int = 32,
                 model_dim: int = 32, num_heads: int = 2, num_layers: int = 1, batch_size: int = 32,
                 segment_length: int | None = None, param_scale_range: Sequence[float] = (1.0, 1.0),
                 dtype: torch.dtype | str = torch.float32) -> None:
        if sum(source is not None for source in (text, text_file, corpus)) != 1:
            raise ValueError("give the text to model as exactly one of text=, text_file= and corpus=")
        if corpus is not None:
            text = builtin_corpus(corpus)
        if text_file is not None:
            try:
                text = Path(text_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"text_file {text_file}: cannot read it as UTF-8 text ({err})") from None
        assert text is not None
        self.text_file, self.corpus = text_file, corpus
        self.context_length, self.model_dim = int(context_length), int(model_dim)
        self.num_heads, self.num_layers, self.batch_size = int(num_heads), int(num_layers), int(batch_size)
        if min(self.context_length, self.model_dim, self.num_heads, self.num_layers, self.batch_size) < 1:
            raise ValueError("context_length, model_dim, num_heads, num_layers and batch_size must be >= 1")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim ({model_dim}) must be a multiple of num_heads ({num_heads})")
        self.param_scale_range = check_scale_range(param_scale_range)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

        self.vocab = sorted(set(text))
        index = {char: position for position, char in enumerate(self.vocab)}
        self.ids = torch.tensor([index[char] for char in text], dtype=torch.int64)
        self.segment_length = len(self.ids) if segment_length is None else int(segment_length)
        if not self.context_length + 1 <= self.segment_length <= len(self.ids):
            raise ValueError(f"segment_length must be between context_length + 1 ({self.context_length + 1}) and the "
                             f"text's {len(self.ids)} characters, got {self.segment_length}")
        if len(self.vocab) < 2:
            raise ValueError(f"the text needs at least 2 distinct characters, got {len(self.vocab)}")
        self.loss_scale = math.log(len(self.vocab))
        self.loss_cap = 1.5 * self.loss_scale

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        d, vocab = self.model_dim, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d), "pos": (self.context_length, d)}
        for layer in range(self.num_layers):
            block = {"ln1_g": (d,), "ln1_b": (d,), "qkv_w": (d, 3 * d), "qkv_b": (3 * d,), "proj_w": (d, d),
                     "proj_b": (d,), "ln2_g": (d,), "ln2_b": (d,), "fc_w": (d, 4 * d), "fc_b": (4 * d,),
                     "out_w": (4 * d, d), "out_b": (d,)}
            shapes.update({f"l{layer}_{key}": shape for key, shape in block.items()})
        shapes.update({"lnf_g": (d,), "lnf_b": (d,), "head_w": (d, vocab), "head_b": (vocab,)})
        return shapes

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "text_file": self.text_file, "corpus": self.corpus, "text_characters": len(self.ids),
                "vocab_size": self.vocab_size, "context_length": self.context_length, "model_dim": self.model_dim,
                "num_heads": self.num_heads, "num_layers": self.num_layers, "batch_size": self.batch_size,
                "segment_length": self.segment_length, "param_scale_range": list(self.param_scale_range)}

    def sample_task(self, generator: torch.Generator) -> TaskDescriptor:
        offset = torch.randint(0, len(self.ids) - self.segment_length + 1, (), generator=generator)
        return {"offset": offset, **sample_scales(self.param_shapes, self.param_scale_range, generator, self.dtype)}

    def init_params(self, task: TaskDescriptor, generator: torch.Generator) -> Params:
        """Embeddings and read-out ~ N(0, 0.02²) (a near-uniform first prediction: loss ≈ ln(vocab)), other
        dense weights ~ N(0, 1/fan_in) (all truncated at 2 std), LayerNorm gains 1, biases 0; each
        divided by its re-parameterisation scale."""
        params = {}
        for key, shape in self.param_shapes.items():
            if key in ("embed", "pos", "head_w"):
                value = truncated_normal(shape, 1.0 / EMBEDDING_STD, generator, self.dtype)
            elif len(shape) == 2:
                value = truncated_normal(shape, math.sqrt(shape[0]), generator, self.dtype)
            elif key.endswith("_g"):
                value = torch.ones(shape, dtype=self.dtype)
            else:
                value = torch.zeros(shape, dtype=self.dtype)
            params[key] = value / task[SCALE_PREFIX + key]
        return params

    def sample_batches(self, task: TaskDescriptor, generator: torch.Generator, num_steps: int) -> Batch:
        """``tokens (num_steps, batch_size, context_length + 1)``: windows inside the task's segment."""
        window = self.context_length + 1
        starts = torch.randint(0, self.segment_length - window + 1, (num_steps, self.batch_size), generator=generator)
        positions = int(task["offset"]) + starts.unsqueeze(-1) + torch.arange(window)
        return {"tokens": self.ids[positions]}

    # ------------------------------------------------------------------------------- the model
    def logits(self, params: Params, tokens: Tensor) -> Tensor:
        """``(batch, length, vocab)`` next-character logits of ``tokens (batch, length)`` (scales applied)."""
        batch, length = tokens.shape
        d, heads = self.model_dim, self.num_heads
        x = F.embedding(tokens, params["embed"]) + params["pos"][:length]
        for layer in range(self.num_layers):
            p = {key: params[f"l{layer}_{key}"] for key in ("ln1_g", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b",
                                                             "ln2_g", "ln2_b", "fc_w", "fc_b", "out_w", "out_b")}
            h = F.layer_norm(x, (d,), p["ln1_g"], p["ln1_b"])
            qkv = (h @ p["qkv_w"] + p["qkv_b"]).reshape(batch, length, 3, heads, d // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, length, head_dim)
            attended = causal_attention(q, k, v)
            x = x + attended.transpose(1, 2).reshape(batch, length, d) @ p["proj_w"] + p["proj_b"]
            h = F.layer_norm(x, (d,), p["ln2_g"], p["ln2_b"])
            x = x + F.gelu(h @ p["fc_w"] + p["fc_b"]) @ p["out_w"] + p["out_b"]
        x = F.layer_norm(x, (d,), params["lnf_g"], params["lnf_b"])
        return x @ params["head_w"] + params["head_b"]

    def loss(self, params: Params, task: TaskDescriptor, batch: Batch) -> Tensor:
        tokens = batch["tokens"]
        logits = self.logits(scaled(params, task), tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), tokens[:, 1:].reshape(-1))
