"""Token sampling and logits processing for generation.

This module owns the step that turns a row of next-token log-probabilities
into a token id, and the processors that adjust logits before that step.

A sampler built by :func:`make_sampler` takes log-probabilities of shape
``(B, V)`` and returns token ids of shape ``(B,)``. With ``temp == 0`` it is
greedy (``argmax``). Otherwise the filters run in this fixed order:

1. top-k: keep the ``top_k`` most likely tokens.
2. top-p (nucleus): sort the surviving probabilities in descending order and
   keep the smallest prefix whose mass is at least ``top_p``.
3. min-p: drop tokens whose probability is below ``min_p`` times the
   probability of the most likely token.
4. temperature: divide the surviving log-probabilities by ``temp``.
5. sample one token per row with ``mx.random.categorical``.

Each filter sees the distribution renormalized over the tokens that survived
the previous one, so the order matters: top-k followed by top-p can keep fewer
tokens than top-p alone. Temperature comes after the filters, so it changes
how the survivors are weighted but never which tokens survive. Top-p and min-p
always keep at least ``min_tokens_to_keep`` tokens. Filtered tokens get
``-inf``. All randomness comes from ``mx.random``, so ``mx.random.seed``
makes sampling reproducible.

Logits processors (see :func:`make_logits_processors`) have the signature
``processor(tokens, logits) -> logits`` and run on the raw logits before the
log-softmax that feeds the sampler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import mlx.core as mx

logger = logging.getLogger(__name__)

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _check_top_k(top_k: int) -> None:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def _check_top_p(top_p: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def _check_min_p(min_p: float) -> None:
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"min_p must be in [0, 1) (0 disables it), got {min_p}")


def _check_min_tokens_to_keep(min_tokens_to_keep: int) -> None:
    if min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep}")


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` largest log-probabilities in each row.

    Exactly ``top_k`` tokens survive per row; among tokens tied at the cut-off
    the choice is arbitrary.

    Args:
        logprobs: Log-probabilities of shape ``(B, V)``.
        top_k: Number of tokens to keep. 0, or a value of at least ``V``,
            keeps every token.

    Returns:
        The log-probabilities with every other token set to ``-inf``.

    Raises:
        ValueError: If ``top_k`` is negative.
    """
    _check_top_k(top_k)
    vocab_size = logprobs.shape[-1]
    if top_k == 0 or top_k >= vocab_size:
        return logprobs

    # Partition on the negated values so the k largest land in front.
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    neg_inf = mx.array(-mx.inf, dtype=logprobs.dtype)
    return mx.put_along_axis(logprobs, dropped, neg_inf, axis=-1)


def apply_top_p(
    logprobs: mx.array, top_p: float, min_tokens_to_keep: int = 1
) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``.

    The probabilities are renormalized over the tokens that are still finite,
    sorted in descending order, and a token survives when the mass of the
    tokens ranked before it is below ``top_p``.

    Args:
        logprobs: Log-probabilities of shape ``(B, V)``; ``-inf`` entries
            count as already filtered.
        top_p: Mass to cover, in ``(0, 1]``. 1 keeps every token.
        min_tokens_to_keep: The most likely tokens always kept per row.

    Returns:
        The log-probabilities with every other token set to ``-inf``.

    Raises:
        ValueError: If ``top_p`` is outside ``(0, 1]`` or
            ``min_tokens_to_keep`` is below 1.
    """
    _check_top_p(top_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    if top_p == 1.0:
        return logprobs

    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.softmax(
        mx.take_along_axis(logprobs, order, axis=-1).astype(mx.float32), axis=-1
    )
    # Exclusive cumulative sum: the mass ranked strictly before each token.
    mass_before = mx.cumsum(sorted_probs, axis=-1, inclusive=False)
    rank = mx.arange(logprobs.shape[-1])
    keep_sorted = (mass_before < top_p) | (rank < min_tokens_to_keep)

    # Scatter the decisions back from sorted order to vocabulary order.
    keep = mx.put_along_axis(
        mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep_sorted, axis=-1
    )
    return mx.where(keep, logprobs, mx.array(-mx.inf, dtype=logprobs.dtype))


def apply_min_p(
    logprobs: mx.array, min_p: float, min_tokens_to_keep: int = 1
) -> mx.array:
    """Drop tokens whose probability is below ``min_p`` times the largest one.

    Args:
        logprobs: Log-probabilities of shape ``(B, V)``.
        min_p: Relative threshold in ``[0, 1)``. 0 keeps every token.
        min_tokens_to_keep: The most likely tokens always kept per row (ties
            at the cut-off are all kept).

    Returns:
        The log-probabilities with the dropped tokens set to ``-inf``.

    Raises:
        ValueError: If ``min_p`` is outside ``[0, 1)`` or
            ``min_tokens_to_keep`` is below 1.
    """
    _check_min_p(min_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    if min_p == 0.0:
        return logprobs

    # Compare in log space: p < min_p * p_max  <=>  logp < logp_max + log(min_p).
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    if min_tokens_to_keep > 1:
        k = min(min_tokens_to_keep, logprobs.shape[-1])
        kth_largest = mx.expand_dims(mx.sort(logprobs, axis=-1)[..., -k], -1)
        threshold = mx.minimum(threshold, kth_largest)
    neg_inf = mx.array(-mx.inf, dtype=logprobs.dtype)
    return mx.where(logprobs >= threshold, logprobs, neg_inf)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
) -> Sampler:
    """Build a sampler from log-probabilities to token ids.

    See the module docstring for the order in which the filters apply.

    Args:
        temp: Sampling temperature; 0 means greedy decoding.
        top_p: Nucleus mass in ``(0, 1]``; 1 disables the filter.
        top_k: Number of most likely tokens to keep; 0 disables the filter.
        min_p: Relative probability floor in ``[0, 1)``; 0 disables it.
        min_tokens_to_keep: Tokens that top-p and min-p always keep.

    Returns:
        A function mapping log-probabilities of shape ``(B, V)`` to token ids
        of shape ``(B,)``.

    Raises:
        ValueError: If any argument is out of range.
    """
    if not (temp >= 0 and math.isfinite(temp)):
        raise ValueError(f"temp must be >= 0 and finite (0 means greedy), got {temp}")
    _check_top_p(top_p)
    _check_top_k(top_k)
    _check_min_p(min_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)

    if temp == 0:
        return _greedy

    def sample(logprobs: mx.array) -> mx.array:
        logprobs = apply_top_k(logprobs, top_k)
        logprobs = apply_top_p(logprobs, top_p, min_tokens_to_keep)
        logprobs = apply_min_p(logprobs, min_p, min_tokens_to_keep)
        return mx.random.categorical(logprobs * (1.0 / temp), axis=-1)

    return sample


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Build a CTRL-style repetition penalty processor.

    Every token among the last ``context_size`` generated tokens has its logit
    divided by ``penalty`` when positive and multiplied by it when negative
    (Keskar et al. 2019, https://arxiv.org/abs/1909.05858, section 4.1, in the
    sign-aware form Hugging Face uses). A token that repeats is penalized
    once.

    Args:
        penalty: Penalty factor, > 0; values above 1 discourage repetition.
        context_size: How many of the most recent tokens to consider, >= 1.

    Returns:
        A processor ``(tokens, logits) -> logits`` where ``tokens`` has shape
        ``(L,)`` (shared by every row) or ``(B, L)`` and ``logits`` has shape
        ``(B, V)``.

    Raises:
        ValueError: If ``penalty`` or ``context_size`` is out of range.
    """
    if not (penalty > 0 and math.isfinite(penalty)):
        raise ValueError(f"repetition_penalty must be > 0 and finite, got {penalty}")
    if context_size < 1:
        raise ValueError(f"repetition_context_size must be >= 1, got {context_size}")

    def repetition_penalty(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[..., -context_size:]
        if recent.ndim == 1:
            recent = mx.broadcast_to(recent, (logits.shape[0], recent.shape[0]))
        recent = recent.astype(mx.int32)

        selected = mx.take_along_axis(logits, recent, axis=-1)
        penalized = mx.where(selected < 0, selected * penalty, selected / penalty)
        # Duplicate indices write the same value, so repeats count once.
        return mx.put_along_axis(logits, recent, penalized.astype(logits.dtype), -1)

    return repetition_penalty


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
) -> list[LogitsProcessor]:
    """Build the logits processors a generation loop applies before sampling.

    Args:
        repetition_penalty: CTRL repetition penalty (> 0), or None for none.
            A penalty of exactly 1 is a no-op and adds no processor.
        repetition_context_size: How many recent tokens the penalty covers.

    Returns:
        The processors in the order to apply them; possibly empty.

    Raises:
        ValueError: If ``repetition_penalty`` is not positive or
            ``repetition_context_size`` is below 1.
    """
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None:
        processor = make_repetition_penalty(repetition_penalty, repetition_context_size)
        if repetition_penalty != 1.0:
            processors.append(processor)
    return processors
