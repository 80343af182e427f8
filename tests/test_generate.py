"""The generation loop: prefill chunks, stopping, statistics, bounded caches."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from helpers import STORIES_DIR, require

from mlxbastion import generate, generate_step, load, stream_generate
from mlxbastion.convert import convert


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "mlx"
    convert(require(STORIES_DIR / "hf"), out)
    return load(out)


@pytest.fixture(scope="module")
def greedy() -> dict:
    return json.loads((STORIES_DIR / "reference.json").read_text())["greedy_30"]


def test_prefill_chunking_does_not_change_the_tokens(stories, greedy):
    model, _ = stories
    prompt = mx.array(greedy["prompt_ids"])
    for step in (1, 2, 512):
        tokens = [
            t
            for t, _ in generate_step(
                prompt, model, max_tokens=30, prefill_step_size=step
            )
        ]
        assert tokens == greedy["new_ids"], step


def test_generate_step_yields_normalised_logprobs(stories, greedy):
    model, _ = stories
    steps = generate_step(mx.array(greedy["prompt_ids"]), model, max_tokens=3)
    for token, logprobs in steps:
        assert logprobs.shape == (model.args.vocab_size,)
        assert mx.logsumexp(logprobs).item() == pytest.approx(0.0, abs=1e-5)
        assert mx.argmax(logprobs).item() == token


def test_accounting_and_finish_reason_on_the_token_limit(stories, greedy):
    model, tokenizer = stories
    responses = list(
        stream_generate(model, tokenizer, greedy["prompt_ids"], max_tokens=7)
    )
    final = responses[-1]
    assert final.finish_reason == "length"
    assert final.token is None
    assert final.prompt_tokens == 5
    assert final.generation_tokens == 7
    assert [r.generation_tokens for r in responses[:-1]] == list(range(1, 8))
    assert final.prompt_tps > 0 and final.generation_tps > 0
    assert final.peak_memory_gb > 0


def test_stops_on_any_declared_eos_without_printing_it(stories, greedy):
    model, tokenizer = stories
    # Declare the 4th greedy token an end-of-sequence token.
    eos = greedy["new_ids"][3]
    tokenizer.eos_token_ids.add(eos)
    try:
        responses = list(
            stream_generate(model, tokenizer, greedy["prompt_ids"], max_tokens=30)
        )
    finally:
        tokenizer.eos_token_ids.discard(eos)
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].generation_tokens == 4
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode(greedy["new_ids"][:3])


def test_stop_string_cuts_the_text(stories, greedy):
    model, tokenizer = stories
    text = generate(
        model, tokenizer, greedy["prompt_ids"], max_tokens=30, stop=["Lily. She"]
    )
    assert text == ", there was a little girl named "


def test_bounded_cache_matches_full_cache_inside_its_window(stories, greedy):
    model, tokenizer = stories
    full = generate(model, tokenizer, greedy["prompt_ids"], max_tokens=30)
    bounded = generate(
        model, tokenizer, greedy["prompt_ids"], max_tokens=30, max_kv_size=64
    )
    assert bounded == full == greedy["continuation"]
    # A window smaller than the text still generates every token.
    small = list(
        stream_generate(
            model, tokenizer, greedy["prompt_ids"], max_tokens=30, max_kv_size=12
        )
    )
    assert small[-1].generation_tokens == 30


def test_seeded_sampling_is_reproducible(stories, greedy):
    model, tokenizer = stories

    def sample(seed):
        mx.random.seed(seed)
        return generate(model, tokenizer, greedy["prompt_ids"], max_tokens=20, temp=1.0)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize(
    "prompt, message",
    [([], "the prompt is empty"), ([1] * 2049, "2049 tokens.*context is 2048")],
)
def test_bad_prompts(stories, prompt, message):
    model, tokenizer = stories
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, prompt)
