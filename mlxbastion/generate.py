"""Text generation: prefill, decode steps, streaming text and statistics.

The pipeline is split as gpt-fast splits it, so each phase can be timed or
compiled on its own:

- ``prefill`` runs the prompt through the model in chunks of
  ``prefill_step_size`` tokens, so a long prompt never materialises a full
  attention matrix, and returns the logits of its last position;
- ``generate_step`` yields one ``(token, logprobs)`` at a time, scheduling the
  next step's graph (``mx.async_eval``) before handing back the current token;
- ``stream_generate`` turns tokens into text with a streaming detokenizer,
  stops on end-of-sequence tokens and stop strings, and reports speed;
- ``generate`` collects the stream into a string.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from .model import Model
from .sample import make_logits_processors, make_sampler
from .tokenizer import StopMatcher, Tokenizer

logger = logging.getLogger(__name__)

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class GenerationResponse:
    """One streamed piece of output and the running statistics.

    Attributes:
        text: new text since the previous response (may be empty while a
            multi-byte character or a possible stop string is held back).
        token: the token just generated, or None for the closing response.
        prompt_tokens: tokens in the prompt that were run through the model.
        prompt_tps: prompt tokens per second.
        generation_tokens: tokens generated so far.
        generation_tps: generated tokens per second, prompt time excluded.
        peak_memory_gb: peak memory MLX allocated so far, in GB.
        finish_reason: "stop" (EOS or stop string), "length", or None while
            generation goes on.
    """

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None


def check_prompt_length(n_tokens: int, model: Model, cache: list | None) -> None:
    """Refuse an empty prompt or one longer than the model's context.

    Raises:
        ValueError: with the counts, rather than silently truncating.
    """
    if n_tokens == 0:
        raise ValueError("the prompt is empty; give some text to continue")
    context = model.args.max_position_embeddings
    used = cache[0].offset if cache else 0
    if used + n_tokens > context:
        raise ValueError(
            f"the prompt has {n_tokens} tokens"
            + (f" (after {used} already in the cache)" if used else "")
            + f" but the model's context is {context}; shorten the prompt"
        )


def prefill(
    model: Model,
    tokens: mx.array,
    cache: list,
    *,
    prefill_step_size: int = 512,
) -> mx.array:
    """Run the prompt ``tokens`` (shape ``(L,)``) into ``cache``.

    Returns:
        The logits after the last prompt token, shape ``(1, V)``.
    """
    while tokens.shape[0] > prefill_step_size:
        model(tokens[None, :prefill_step_size], cache=cache)
        # Only the cache is evaluated: the chunk's logits are never computed.
        mx.eval([c.state for c in cache])
        tokens = tokens[prefill_step_size:]
    return model(tokens[None], cache=cache, last_only=True)[:, -1, :]


def generate_step(
    prompt: mx.array,
    model: Model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    cache: list | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token, logprobs)`` for up to ``max_tokens`` new tokens.

    Args:
        prompt: token ids, shape ``(L,)``.
        model: the model.
        max_tokens: how many tokens to generate at most.
        sampler: maps logprobs ``(1, V)`` to a token; greedy when None.
        logits_processors: applied in order to the logits before sampling,
            each called as ``processor(tokens_so_far, logits)``.
        cache: a cache from ``model.make_cache()``, updated in place so a
            conversation can continue on it; a fresh one when None.
        max_kv_size: bound a fresh cache to this many tokens.
        kv_bits: quantize a fresh cache's keys and values to 4 or 8 bits.
        kv_group_size: their quantization group size along head_dim.
        prefill_step_size: prompt tokens per prefill chunk.
    """
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    if cache is None:
        cache = model.make_cache(
            max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size
        )
    history = prompt

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        if logits_processors:
            for processor in logits_processors:
                logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token])
        return token, logprobs.squeeze(0)

    token, logprobs = sample(
        prefill(model, prompt, cache, prefill_step_size=prefill_step_size)
    )
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        # Queue the next step before waiting on this one, so the host work
        # of building its graph overlaps with the computation.
        # Limitation: the decode step is not compiled with mx.compile. The
        # cache's write position and length change every step, so a compiled
        # step would be traced again each time; compiling the feed-forward
        # alone measured no gain on the CPU backend.
        if n + 1 < max_tokens:
            next_token, next_logprobs = sample(
                model(token[None], cache=cache)[:, -1, :]
            )
            mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        if n + 1 < max_tokens:
            token, logprobs = next_token, next_logprobs


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    stop: list[str] | None = None,
    cache: list | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
) -> Iterator[GenerationResponse]:
    """Generate text from ``prompt``, yielding it piece by piece.

    A string prompt is tokenized as is (no chat template; use
    ``Tokenizer.encode_prompt`` for that). Generation ends on any of the
    model's end-of-sequence tokens, on a stop string (which is not
    included in the text), or after ``max_tokens``. The last response has
    ``finish_reason`` set.

    Without a ``cache``, a fresh one is made with ``max_kv_size``, ``kv_bits``
    and ``kv_group_size`` (see ``Model.make_cache``); with one, they are
    ignored.

    Raises:
        ValueError: an empty prompt, one longer than the context, bad
            sampling settings, or KV cache quantization the model's head_dim
            does not allow.
    """
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    check_prompt_length(len(prompt), model, cache)
    sampler = make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p)
    processors = make_logits_processors(repetition_penalty, repetition_context_size)
    detokenizer = tokenizer.new_detokenizer()
    matcher = StopMatcher(stop or [])
    mx.reset_peak_memory()

    tic = time.perf_counter()
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        cache=cache,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        prefill_step_size=prefill_step_size,
    )
    prompt_tps, n, finish, stopped = 0.0, 0, "length", False
    for n, (token, _) in enumerate(steps, start=1):
        if n == 1:
            # The first token's arrival marks the end of the prompt phase.
            prompt_tps = len(prompt) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        detokenizer.add_token(token)
        piece, stopped = matcher.feed(detokenizer.last_segment)
        if stopped:
            finish = "stop"
            break
        yield GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=len(prompt),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=_rate(n - 1, tic),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )

    # Release what the detokenizer and the stop matcher still hold back,
    # unless a stop string cut the text short: then the segment's text before
    # the stop string (" " of " Lily" for the stop "Lily") is the last piece.
    if stopped:
        text = piece
    else:
        detokenizer.finalize()
        text, stopped = matcher.feed(detokenizer.last_segment)
        if stopped:
            finish = "stop"
        else:
            text += matcher.flush()
    yield GenerationResponse(
        text=text,
        token=None,
        prompt_tokens=len(prompt),
        prompt_tps=prompt_tps,
        generation_tokens=n,
        generation_tps=_rate(n - 1, tic),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )


def _rate(count: int, since: float) -> float:
    """Tokens per second since ``since``; the first token belongs to the
    prompt phase, so decode speed counts the ones after it."""
    elapsed = time.perf_counter() - since
    return count / elapsed if count > 0 and elapsed > 0 else 0.0


def generate(
    model: Model, tokenizer: Tokenizer, prompt: str | list[int], **kwargs
) -> str:
    """The whole generated text; takes the same arguments as ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
