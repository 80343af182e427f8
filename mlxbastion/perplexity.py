"""Perplexity and next-token divergence on held-out text.

The protocol, shared by ``mlxbastion perplexity`` and the quantization
report: the text is tokenized without special tokens (documents joined with
the end-of-sequence token), cut into consecutive windows of
``sequence_length`` tokens, and each window is scored with the BOS token in
front, so every window's first token is predicted too. Perplexity is
``exp(mean NLL)`` over all scored tokens; its standard error comes from the
standard error of the mean NLL by the delta method (``ppl * se(nll)``),
treating tokens as independent, as mlx-lm and llama.cpp do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class PerplexityResult:
    """Perplexity over ``tokens`` scored tokens in ``windows`` windows."""

    perplexity: float
    standard_error: float
    mean_nll: float
    tokens: int
    windows: int


def read_texts(path: str | Path, tokenizer: Tokenizer | None = None) -> list[str]:
    """Documents from a text file (one document) or a JSON Lines file.

    Each JSON line may hold ``text``, ``prompt`` and ``completion``, or
    ``messages`` (rendered with the tokenizer's chat template).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, or a line is not a usable JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        return [text]

    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from e
        texts.append(_record_text(record, path, number, tokenizer))
    if not texts:
        raise ValueError(f"data file {path} has no records")
    return texts


def _record_text(record, path: Path, number: int, tokenizer: Tokenizer | None) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number} must be a JSON object")
    if "text" in record:
        return str(record["text"])
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]) + str(record["completion"])
    if "messages" in record:
        if tokenizer is None or not tokenizer.has_chat_template:
            raise ValueError(
                f"{path}:{number} holds chat messages but the model has no chat "
                "template; use text records"
            )
        return tokenizer.hf.apply_chat_template(record["messages"], tokenize=False)
    raise ValueError(
        f"{path}:{number} needs a 'text', 'prompt'+'completion' or 'messages' key"
    )


def make_windows(
    tokenizer: Tokenizer,
    texts: list[str],
    *,
    sequence_length: int,
    num_windows: int | None = None,
) -> mx.array:
    """Token windows of shape ``(N, sequence_length + 1)``, BOS first when the
    tokenizer has one (otherwise the first token of each window is context).

    Raises:
        ValueError: the text is shorter than one window.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence length must be positive, got {sequence_length}")
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))

    bos = tokenizer.bos_token_id
    span = sequence_length if bos is not None else sequence_length + 1
    available = len(ids) // span
    if available == 0:
        raise ValueError(
            f"the data has {len(ids)} tokens, fewer than one window of {span}; "
            "give more text or a shorter --sequence-length"
        )
    n = available if num_windows is None else min(num_windows, available)
    windows = mx.array(ids[: n * span]).reshape(n, span)
    if bos is not None:
        windows = mx.concatenate(
            [mx.full((n, 1), bos, dtype=windows.dtype), windows], 1
        )
    return windows


def _batches(windows: mx.array, batch_size: int) -> Iterator[mx.array]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def token_logprobs(model: nn.Module, batch: mx.array) -> mx.array:
    """Log-probabilities ``(B, L, V)`` of each next token, in float32."""
    logits = model(batch[:, :-1]).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def check_context(model: nn.Module, windows: mx.array) -> None:
    """Refuse windows longer than the model's context: positions past it
    were never trained, and the score would mean nothing."""
    context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    length = windows.shape[1] - 1
    if context is not None and length > context:
        raise ValueError(
            f"a sequence length of {length} is longer than the model's context "
            f"({context}); use --sequence-length {context} or less"
        )


def perplexity(
    model: nn.Module,
    windows: mx.array,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` (from ``make_windows``)."""
    check_context(model, windows)
    nll = []
    for done, batch in enumerate(_batches(windows, batch_size), start=1):
        logprobs = token_logprobs(model, batch)
        targets = batch[:, 1:, None]
        nll.append(-mx.take_along_axis(logprobs, targets, axis=-1).reshape(-1))
        mx.eval(nll[-1])
        if progress is not None:
            progress(min(done * batch_size, windows.shape[0]), windows.shape[0])
    return summarize(mx.concatenate(nll), windows.shape[0])


def summarize(nll: mx.array, windows: int) -> PerplexityResult:
    """Perplexity and its standard error from per-token NLLs."""
    n = nll.size
    mean = nll.mean().item()
    se_nll = math.sqrt(nll.var(ddof=1).item() / n) if n > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * se_nll, mean, n, windows)


@dataclass
class Comparison:
    """A model against a reference on the same windows."""

    reference: PerplexityResult
    model: PerplexityResult
    mean_kl: float


def compare(
    reference: nn.Module,
    models: list[nn.Module],
    windows: mx.array,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> list[Comparison]:
    """Perplexity of the reference and of each model, and the mean
    KL(reference || model) over every next-token distribution. The reference
    runs once for all of them."""
    check_context(reference, windows)
    nll_ref: list[mx.array] = []
    nll = [[] for _ in models]
    kl = [[] for _ in models]
    for done, batch in enumerate(_batches(windows, batch_size), start=1):
        targets = batch[:, 1:, None]
        ref = token_logprobs(reference, batch)
        nll_ref.append(-mx.take_along_axis(ref, targets, axis=-1).reshape(-1))
        for i, model in enumerate(models):
            out = token_logprobs(model, batch)
            nll[i].append(-mx.take_along_axis(out, targets, axis=-1).reshape(-1))
            kl[i].append((mx.exp(ref) * (ref - out)).sum(axis=-1).reshape(-1))
            mx.eval(nll_ref[-1], nll[i][-1], kl[i][-1])
        if progress is not None:
            progress(min(done * batch_size, windows.shape[0]), windows.shape[0])
    n = windows.shape[0]
    reference_result = summarize(mx.concatenate(nll_ref), n)
    return [
        Comparison(
            reference_result,
            summarize(mx.concatenate(nll[i]), n),
            mx.concatenate(kl[i]).mean().item(),
        )
        for i in range(len(models))
    ]
