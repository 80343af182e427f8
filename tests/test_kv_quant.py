"""Quantized KV caches: attention over them, their logits, memory and CLI.

Tiny random models (hidden 128, grouped-query heads of head_dim 32 or 64) are
built straight from ``ModelArgs``; SmolLM2-135M-Instruct, converted from its
GGUF, checks the feature on a real chat model.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import STORIES_DIR, find_smollm2_gguf, require
from mlx.utils import tree_flatten

from mlxbastion import load, stream_generate
from mlxbastion.cache import (
    KVCache,
    RotatingKVCache,
    kv_cache_bytes,
    kv_group_size_for,
)
from mlxbastion.cli import main
from mlxbastion.config import ModelArgs
from mlxbastion.convert import convert
from mlxbastion.generate import generate_step
from mlxbastion.model import Model, quantized_attention

VOCAB = 256
# Measured on these tiny models (logits' std about 1.2): the largest
# |quantized - float| logit gap is 0.09-0.11 at 8 bits and 1.4-1.7 at 4 bits,
# the mean gap 0.013 and 0.20-0.23.
BOUNDS = {8: (0.15, 0.02), 4: (2.5, 0.3)}
SMOLLM2 = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)


def tiny_model(head_dim: int, n_heads: int = 4, n_kv_heads: int = 2, **overrides):
    config = dict(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=256,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
    )
    model = Model(ModelArgs.from_dict({**config, **overrides}))
    mx.random.seed(3)
    weights = []
    for name, param in tree_flatten(model.parameters()):
        noise = mx.random.normal(param.shape)
        weights.append((name, 1.0 + 0.5 * noise if "norm" in name else 0.1 * noise))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=[(32, 4, 2), (64, 4, 1)], ids=["hd32", "hd64"])
def model(request) -> Model:
    """GQA models: head_dim 32 with 2 query heads per kv head, 64 with 4."""
    return tiny_model(*request.param)


def make_tokens(length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, (2, length)))


def run_schedule(model: Model, tokens: mx.array, sizes: list[int], cache: list):
    """Logits from feeding ``tokens`` in consecutive pieces of ``sizes``."""
    starts = np.cumsum([0] + sizes)
    pieces = [
        model(tokens[:, a:b], cache)
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    return mx.concatenate(pieces, axis=1)


def gap(a: mx.array, b: mx.array) -> tuple[float, float]:
    """Largest and mean absolute difference."""
    diff = np.abs(np.array(a) - np.array(b))
    return float(diff.max()), float(diff.mean())


# ---------------------------------------------------------------------------
# quantized_attention


def _mask(kind: str, B: int, n_heads: int, L: int, S: int):
    rng = np.random.default_rng(5)
    allowed = rng.random((L, S)) > 0.4
    allowed[:, 0] = True  # every query sees at least one key
    if kind == "bool":
        return mx.array(allowed)
    if kind == "bool-per-head":
        per_head = rng.random((B, n_heads, L, S)) > 0.4
        per_head[..., 0] = True
        return mx.array(per_head)
    if kind == "additive":
        return mx.array(np.where(allowed, 0.0, -1e9).astype(np.float32))
    return {"none": None, "causal": "causal"}[kind]


@pytest.mark.parametrize("L", [1, 6])
@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "bool", "bool-per-head", "additive"]
)
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("bits, head_dim, group_size", [(8, 64, 64), (4, 32, 32)])
def test_quantized_attention_equals_sdpa_on_dequantized_keys(
    L, mask_kind, n_heads, n_kv_heads, bits, head_dim, group_size
):
    B, S = 2, 13 + L
    k1, k2, k3 = mx.random.split(mx.random.key(L + n_heads), 3)
    queries = mx.random.normal((B, n_heads, L, head_dim), key=k1)
    keys = mx.random.normal((B, n_kv_heads, S, head_dim), key=k2)
    values = mx.random.normal((B, n_kv_heads, S, head_dim), key=k3)
    quant = dict(group_size=group_size, bits=bits)
    q_keys = mx.quantize(keys, **quant)
    q_values = mx.quantize(values, **quant)
    mask = _mask(mask_kind, B, n_heads, L, S)

    out = quantized_attention(
        queries, q_keys, q_values, scale=head_dim**-0.5, mask=mask, **quant
    )

    expected = mx.fast.scaled_dot_product_attention(
        queries,
        mx.dequantize(*q_keys, **quant),
        mx.dequantize(*q_values, **quant),
        scale=head_dim**-0.5,
        mask=mask,
    )
    assert out.shape == (B, n_heads, L, head_dim)
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=1e-5)


def test_quantized_attention_causal_is_aligned_to_the_last_key():
    # Query i of 3 new ones after 5 cached keys sees keys 0 .. 5 + i.
    queries = mx.random.normal((1, 2, 3, 32), key=mx.random.key(1))
    kv = [mx.quantize(mx.random.normal((1, 2, 8, 32)), group_size=32, bits=8)] * 2
    quant = dict(scale=0.2, group_size=32, bits=8)
    explicit = mx.arange(5, 8)[:, None] >= mx.arange(8)[None]

    causal = quantized_attention(queries, *kv, mask="causal", **quant)

    by_hand = quantized_attention(queries, *kv, mask=explicit, **quant)
    unmasked = quantized_attention(queries, *kv, mask=None, **quant)
    np.testing.assert_array_equal(np.array(causal), np.array(by_hand))
    np.testing.assert_array_equal(
        np.array(causal[:, :, 2]), np.array(unmasked[:, :, 2])
    )
    assert not np.allclose(np.array(causal[:, :, 0]), np.array(unmasked[:, :, 0]))


# ---------------------------------------------------------------------------
# The model on a quantized cache


def assert_stored(stored: tuple, x: mx.array, group_size: int, bits: int) -> None:
    expected = mx.quantize(x, group_size=group_size, bits=bits)
    for part, want in zip(stored, expected, strict=True):
        np.testing.assert_array_equal(np.array(part), np.array(want))


def test_quantized_kv_cache_holds_what_mx_quantize_gives():
    cache = KVCache(bits=4, group_size=32)
    shape = (2, 2, 259, 32)
    keys = mx.random.normal(shape, key=mx.random.key(1))
    values = mx.random.normal(shape, key=mx.random.key(2))

    start = 0
    for size in [5, 1, 250, 3]:
        end = start + size
        k, v = cache.update_and_fetch(
            keys[..., start:end, :], values[..., start:end, :]
        )
        assert cache.offset == end
        assert_stored(k, keys[..., :end, :], 32, 4)
        assert_stored(v, values[..., :end, :], 32, 4)
        start = end

    # 512 slots of 4 uint32 codes plus a float32 scale and bias per group.
    assert [a.shape[2] for a in cache.keys] == [512] * 3
    assert cache.nbytes == 2 * (2 * 2 * 512) * (4 * 4 + 2 * 4)
    assert cache.trim(9) == 9
    k, _ = cache.update_and_fetch(keys[..., :1, :], values[..., :1, :])
    assert_stored(k, mx.concatenate([keys[..., :250, :], keys[..., :1, :]], 2), 32, 4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_logits_stay_close_to_the_float_cache(model, bits):
    tokens = make_tokens(40)
    sizes = [7, 7, 6] + [1] * 20
    group_size = model.args.head_dim

    logits = run_schedule(
        model, tokens, sizes, model.make_cache(kv_bits=bits, kv_group_size=group_size)
    )

    expected = run_schedule(model, tokens, sizes, model.make_cache())
    largest, mean = gap(logits, expected)
    assert largest < BOUNDS[bits][0]
    assert mean < BOUNDS[bits][1]
    # Really quantized: 8 bits already moves the logits, 4 bits more so.
    assert largest > {8: 1e-3, 4: 0.3}[bits]


def test_chunked_prefill_and_decode_equal_one_pass_on_a_quantized_cache(model):
    tokens = make_tokens(40)
    for bits in (8, 4):
        cache = model.make_cache(kv_bits=bits)

        logits = run_schedule(model, tokens, [7, 7, 6] + [1] * 20, cache)

        one_pass = model(tokens, model.make_cache(kv_bits=bits))
        np.testing.assert_allclose(np.array(logits), np.array(one_pass), atol=1e-5)
        assert [c.offset for c in cache] == [40, 40]
        codes, scales, biases = cache[0].state[0]
        head_dim, group_size = model.args.head_dim, cache[0].group_size
        assert codes.dtype == mx.uint32
        assert codes.shape == (
            2,
            model.args.num_key_value_heads,
            40,
            head_dim * bits // 32,
        )
        assert (
            scales.shape == biases.shape == (*codes.shape[:3], head_dim // group_size)
        )


# ---------------------------------------------------------------------------
# Quantized RotatingKVCache


def test_quantized_rotating_cache_below_max_size_equals_quantized_cache(model):
    tokens = make_tokens(30)
    sizes = [7, 7, 6] + [1] * 10
    rotating = model.make_cache(max_kv_size=64, kv_bits=4)

    logits = run_schedule(model, tokens, sizes, rotating)

    expected = run_schedule(model, tokens, sizes, model.make_cache(kv_bits=4))
    np.testing.assert_array_equal(np.array(logits), np.array(expected))
    assert all(type(c) is RotatingKVCache and c.bits == 4 for c in rotating)
    assert [c.offset for c in rotating] == [30, 30]


MAX_SIZE, KEEP = 16, 4
SCHEDULES = {
    "prefill-exceeds": [7, 7, 6] + [1] * 12,
    "one-chunk-over-max": [24] + [1] * 6,
    "chunk-after-wrap": [5, 5] + [1] * 10 + [6] + [1] * 3,
}


@pytest.mark.parametrize("sizes", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_quantized_rotating_cache_keeps_first_tokens_and_a_window(model, sizes):
    tokens = make_tokens(sum(sizes))
    cache = model.make_cache(max_kv_size=MAX_SIZE, kv_bits=8)
    # Layer 0's keys depend only on token and position, so a full quantized
    # cache fed the same pieces holds bit-identical codes for every token.
    full = model.make_cache(kv_bits=8)

    offset = 0
    for size in sizes:
        piece = tokens[:, offset : offset + size]
        model(piece, cache)
        model(piece, full)
        offset += size
        kept = list(range(offset))
        if offset > MAX_SIZE:
            kept = kept[:KEEP] + kept[offset - (MAX_SIZE - KEEP) :]
        for layer_cache in cache:
            assert layer_cache.offset == offset
            assert all(a.shape[2] <= MAX_SIZE for a in layer_cache.keys)
        for stored, everything in zip(cache[0].state, full[0].state, strict=True):
            for part, whole in zip(stored, everything, strict=True):
                assert part.shape[2] == min(offset, MAX_SIZE)
                np.testing.assert_array_equal(
                    np.array(part), np.array(whole)[:, :, kept]
                )


@pytest.mark.parametrize("sizes", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_quantized_rotating_cache_stays_close_to_the_float_one(model, sizes):
    # Past the window the masks are boolean arrays; the quantized path must
    # apply them as the fused kernel does.
    tokens = make_tokens(sum(sizes))
    quantized = model.make_cache(max_kv_size=MAX_SIZE, kv_bits=8)

    logits = run_schedule(model, tokens, sizes, quantized)

    expected = run_schedule(model, tokens, sizes, model.make_cache(MAX_SIZE))
    largest, mean = gap(logits, expected)
    assert largest < BOUNDS[8][0] and mean < BOUNDS[8][1]


def test_sliding_window_model_on_a_quantized_rotating_cache():
    # Mistral-style window of 5 plus the cache's ring: single-token steps get
    # a (1, S) boolean mask over ring-ordered slots.
    model = tiny_model(32, model_type="mistral", sliding_window=5)
    tokens = make_tokens(20)
    sizes = [3, 3] + [1] * 14

    logits = run_schedule(
        model, tokens, sizes, model.make_cache(max_kv_size=12, kv_bits=8)
    )

    expected = run_schedule(model, tokens, sizes, model.make_cache(12))
    largest, mean = gap(logits, expected)
    assert largest < BOUNDS[8][0] and mean < BOUNDS[8][1]


# ---------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("bits, ratio", [(8, 68 / 128), (4, 36 / 128)])
def test_nbytes_shrinks_by_the_expected_ratio(bits, ratio):
    # float16, head_dim 64, group 64: per head and token, 64 * bits / 8 bytes
    # of codes plus a 2-byte scale and a 2-byte bias, against 128 bytes.
    keys = mx.random.normal((1, 3, 512, 64)).astype(mx.float16)
    plain, quantized = KVCache(), KVCache(bits=bits, group_size=64)

    plain.update_and_fetch(keys, keys)
    quantized.update_and_fetch(keys, keys)

    assert plain.nbytes == 2 * 3 * 512 * 64 * 2
    assert quantized.nbytes == 2 * 3 * 512 * (64 * bits // 8 + 4)
    assert quantized.nbytes / plain.nbytes == pytest.approx(ratio)
    assert quantized.unquantized_nbytes == plain.nbytes


@pytest.mark.parametrize("bits", [8, 4])
def test_model_cache_nbytes_is_the_theoretical_size(model, bits):
    args = model.args
    tokens = make_tokens(300)[:1]  # kv_cache_bytes counts one sequence
    cache = model.make_cache(kv_bits=bits)
    rotating = model.make_cache(max_kv_size=64, kv_bits=bits)

    model(tokens, cache)
    model(tokens, rotating)

    # KVCache allocates 256 slots at a time; the rotating one keeps 64.
    float32 = dict(dtype_bytes=4, kv_group_size=cache[0].group_size)
    assert sum(c.nbytes for c in cache) == kv_cache_bytes(
        args, 512, kv_bits=bits, **float32
    )
    assert sum(c.nbytes for c in rotating) == kv_cache_bytes(
        args, 64, kv_bits=bits, **float32
    )
    assert sum(c.unquantized_nbytes for c in cache) == kv_cache_bytes(
        args, 512, dtype_bytes=4
    )


def test_kv_cache_bytes_for_smollm2_at_2048_tokens():
    # 30 layers x 3 kv heads x 2 (keys, values) x 2048 tokens x bytes per head.
    args = ModelArgs.from_dict(SMOLLM2)
    assert args.head_dim == 64

    assert kv_cache_bytes(args, 2048) == 47_185_920
    assert kv_cache_bytes(args, 2048, kv_bits=8) == 25_067_520
    assert kv_cache_bytes(args, 2048, kv_bits=4) == 13_271_040
    assert kv_cache_bytes(args, 2048, kv_bits=4, kv_group_size=32) == 14_745_600


# ---------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "head_dim, requested, used",
    [(64, 64, 64), (64, 128, 64), (128, 128, 128), (96, 64, 32), (32, 64, 32)],
)
def test_group_size_falls_back_to_one_dividing_head_dim(head_dim, requested, used):
    assert kv_group_size_for(head_dim, requested) == used


def test_make_cache_warns_when_it_falls_back(caplog):
    model = tiny_model(32)

    cache = model.make_cache(kv_bits=8, kv_group_size=64)

    assert [c.group_size for c in cache] == [32, 32]
    assert "head_dim 32 is not a multiple of kv_group_size 64" in caplog.text
    assert "groups of 32" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_bits=3), "kv_bits must be 4 or 8; got 3"),
        (dict(kv_bits=8, kv_group_size=48), "must be one of 32, 64, 128; got 48"),
    ],
)
def test_make_cache_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_model(32).make_cache(**kwargs)


def test_head_dim_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError) as error:
        tiny_model(8, n_heads=16, n_kv_heads=4).make_cache(kv_bits=8)
    assert str(error.value) == (
        "--kv-bits needs head_dim divisible by 32; this model's head_dim is 8"
    )


@pytest.fixture
def made_caches(monkeypatch) -> list[list]:
    """Every cache list ``Model.make_cache`` returns during the test."""
    made = []
    make_cache = Model.make_cache

    def spy(self, *args, **kwargs):
        made.append(make_cache(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Model, "make_cache", spy)
    return made


def test_generate_step_makes_the_cache_it_is_asked_for(made_caches):
    model = tiny_model(32)
    prompt = make_tokens(10)[0]

    steps = generate_step(
        prompt, model, max_tokens=4, max_kv_size=8, kv_bits=4, kv_group_size=32
    )
    tokens = [token for token, _ in steps]

    assert len(tokens) == 4
    [cache] = made_caches
    assert all(type(c) is RotatingKVCache for c in cache)
    assert [(c.bits, c.group_size, c.max_size) for c in cache] == [(4, 32, 8)] * 2
    # 10 prompt tokens plus the first 3 generated ones were fed.
    assert [c.offset for c in cache] == [13, 13]


def test_stream_generate_passes_the_cache_settings_on(made_caches, stories_dir):
    # stories260K's tokenizer (512 ids) serves the tiny 256-id model.
    _, tokenizer = load(stories_dir)
    prompt = make_tokens(10)[0].tolist()

    responses = list(
        stream_generate(tiny_model(64), tokenizer, prompt, max_tokens=3, kv_bits=8)
    )

    assert responses[-1].finish_reason is not None
    [cache] = made_caches
    assert all(type(c) is KVCache for c in cache)
    assert [(c.bits, c.group_size) for c in cache] == [(8, 64)] * 2
    assert cache[0].offset >= 10


# ---------------------------------------------------------------------------
# SmolLM2 and the CLI


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "mlx"
    convert(find_smollm2_gguf(), out)
    return out, load(out)


@pytest.mark.slow
def test_smollm2_8bit_cache_gives_the_same_greedy_tokens(smollm2):
    # 20 tokens, on through the end of the answer (generate_step does not
    # stop at <|im_end|>), where the model is far less sure of each token.
    _, (model, tokenizer) = smollm2
    assert model.args.head_dim == 64
    prompt = mx.array(tokenizer.encode_prompt("What is the capital of France?"))

    tokens = [t for t, _ in generate_step(prompt, model, max_tokens=20, kv_bits=8)]

    expected = [t for t, _ in generate_step(prompt, model, max_tokens=20)]
    assert tokens == expected
    assert tokenizer.decode(tokens[:8]) == "The capital of France is Paris.<|im_end|>"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_cli_4bit_cache_still_answers_and_reports_its_size(smollm2):
    folder, (model, _) = smollm2

    result = invoke(
        "generate", "--model", folder, "--prompt", "What is the capital of France?",
        "--max-tokens", 8, "--kv-bits", 4, "--kv-group-size", 32,
        "--max-kv-size", 64,
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout
    # The rotating cache holds 64 slots; activations are float32 on the CPU.
    used = kv_cache_bytes(model.args, 64, kv_bits=4, kv_group_size=32, dtype_bytes=4)
    full = kv_cache_bytes(model.args, 64, dtype_bytes=4)
    assert used / full == 48 / 256
    assert result.stderr.splitlines()[-1] == (
        f"KV cache: {used / 1e6:.1f} MB (4-bit, group 32; "
        f"{full / 1e6:.1f} MB unquantized)"
    )


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "mlx"
    convert(require(STORIES_DIR / "hf"), out)
    return out


def test_cli_refuses_kv_bits_outside_the_choices(stories_dir):
    result = invoke("generate", "--model", stories_dir, "--kv-bits", 3)

    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: Invalid value for '--kv-bits': '3' is not one of")


def test_cli_refuses_kv_bits_for_stories260k_head_dim(stories_dir):
    result = invoke("generate", "--model", stories_dir, "--kv-bits", 8)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: --kv-bits needs head_dim divisible by 32; this model's head_dim is 8\n"
    )
