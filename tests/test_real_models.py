"""Real models, real text: stories260K against transformers' reference output,
and SmolLM2-135M-Instruct answering a chat question.

stories260K comes both as the GGUF file llama.cpp wrote and as the Hugging
Face folder transformers wrote from it; ``reference.json`` holds what
transformers (float32, PyTorch CPU) produces. Both forms must reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import STORIES_DIR, find_smollm2_gguf, require

from mlxbastion import generate, load, stream_generate
from mlxbastion.convert import convert


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(require(STORIES_DIR / "reference.json").read_text())


@pytest.fixture(scope="module", params=["hf", "gguf"])
def stories(request, tmp_path_factory) -> tuple:
    source = {"hf": STORIES_DIR / "hf", "gguf": STORIES_DIR / "stories260K.gguf"}
    out = tmp_path_factory.mktemp(f"stories-{request.param}") / "mlx"
    convert(require(source[request.param]), out)
    return load(out)


def test_greedy_tokens_match_transformers(stories, reference):
    model, tokenizer = stories
    greedy = reference["greedy_30"]
    prompt = tokenizer.encode(reference["prompt"])
    assert prompt == greedy["prompt_ids"]

    tokens = [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=30)
        if r.token is not None
    ]
    assert tokens == greedy["new_ids"]
    text = generate(model, tokenizer, prompt, max_tokens=30)
    assert text == greedy["continuation"]


def test_next_token_logprobs_match_transformers(stories, reference):
    model, tokenizer = stories
    expected = reference["next_token_logprobs_after_prompt"]
    logits = model(mx.array([reference["greedy_30"]["prompt_ids"]]))[0, -1]
    logprobs = logits - mx.logsumexp(logits)
    top5 = mx.argsort(-logprobs)[:5].tolist()

    assert top5 == expected["top5_ids"]
    assert mx.allclose(
        logprobs[mx.array(top5)], mx.array(expected["top5_logprobs"]), atol=1e-4
    ).item()


def test_perplexity_matches_transformers(stories, reference):
    # The reference protocol: the whole file tokenized without special tokens,
    # the first 64 windows of 256 tokens, BOS prepended to each.
    model, tokenizer = stories
    protocol = reference["perplexity"]
    text = STORIES_DIR.parents[1] / "data" / "tinystories" / protocol["file"]
    ids = tokenizer.encode(require(text).read_text(), add_special_tokens=False)
    assert len(ids) == protocol["total_tokens_in_file"]

    n, size = protocol["windows"], protocol["window"]
    windows = mx.array(ids[: n * size]).reshape(n, size)
    inputs = mx.concatenate([mx.full((n, 1), tokenizer.bos_token_id), windows], 1)
    logits = model(inputs[:, :-1])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, windows[..., None], axis=-1).mean().item()

    assert nll == pytest.approx(protocol["mean_nll"], abs=1e-4)


def test_multi_turn_cache_continues_where_it_left(stories, reference):
    # Two calls on one cache equal one call over the concatenated tokens.
    model, tokenizer = stories
    prompt = reference["greedy_30"]["prompt_ids"]
    new = reference["greedy_30"]["new_ids"]
    cache = model.make_cache()
    first = [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=10, cache=cache)
        if r.token
    ]
    assert first == new[:10]
    # The 10th token was sampled but not yet fed; feed it as the next turn.
    second = [
        r.token
        for r in stream_generate(
            model, tokenizer, [first[-1]], max_tokens=10, cache=cache
        )
        if r.token
    ]
    assert cache[0].offset == len(prompt) + 10 + 9
    assert second == new[10:20]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("smollm2") / "mlx"
    convert(find_smollm2_gguf(), out)
    return out, load(out)


def test_smollm2_answers_the_capital_of_france(smollm2):
    _, (model, tokenizer) = smollm2
    prompt = tokenizer.encode_prompt("What is the capital of France?")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=40))

    text = "".join(r.text for r in responses)
    assert text == "The capital of France is Paris."
    # It stopped on <|im_end|> (id 2), not on the token limit.
    assert responses[-1].finish_reason == "stop"
    assert 2 in tokenizer.eos_token_ids


def test_smollm2_folder_loads_in_mlx_lm(smollm2):
    # mlx-lm reads our quantized layout (4-bit layers, 8-bit embedding) and
    # gives the same greedy tokens.
    import mlx_lm

    folder, (model, tokenizer) = smollm2
    theirs, _ = mlx_lm.load(str(folder))
    # Their default keeps float16 scales, whose quantized matmul is very
    # slow on this CPU; compare in float32 like ours.
    theirs.set_dtype(mx.float32)
    prompt = mx.array(tokenizer.encode("The capital of France is"))

    def greedy(m, n=8) -> list[int]:
        tokens = prompt
        for _ in range(n):
            next_token = mx.argmax(m(tokens[None])[0, -1])
            tokens = mx.concatenate([tokens, next_token[None]])
        return tokens[len(prompt) :].tolist()

    assert greedy(model) == greedy(theirs)


def test_smollm2_config_is_what_mlx_swift_reads(smollm2):
    folder, _ = smollm2
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == 100000
    assert config["tie_word_embeddings"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"] == {
        "group_size": 32,
        "bits": 8,
    }
    tokenizer_config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
