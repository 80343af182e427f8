"""KV caches and attention masks, checked against full forwards.

The references here are independent of ``mlxbastion.model``'s forward code:
``reference_logits`` is a plain-MLX transformer (matmuls, softmax, hand-written
RoPE) that takes an explicit boolean mask, so a rotating cache can be checked
against the attention pattern it promises, ``(k < keep) | (q - k < window)``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxbastion.cache import KVCache, RotatingKVCache
from mlxbastion.config import ModelArgs
from mlxbastion.model import Model, attention_mask, causal_mask

ATOL = 1e-5
N_KV_HEADS, HEAD_DIM = 2, 16


def tiny_model(**overrides) -> Model:
    """A random 2-layer GQA Llama; norms and embeddings far from their defaults."""
    config = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=N_KV_HEADS,
        intermediate_size=96,
        vocab_size=128,
        rms_norm_eps=1e-5,
    )
    model = Model(ModelArgs.from_dict({**config, **overrides}))
    mx.random.seed(7)
    weights = []
    for name, param in tree_flatten(model.parameters()):
        noise = mx.random.normal(param.shape)
        weights.append((name, 1.0 + 0.5 * noise if "norm" in name else 0.2 * noise))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model()


@pytest.fixture(scope="module")
def windowed_model() -> Model:
    return tiny_model(model_type="mistral", sliding_window=5)


def make_tokens(length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, (2, length)))


def run_schedule(model: Model, tokens: mx.array, sizes: list[int], cache: list):
    """Logits from feeding ``tokens`` in consecutive pieces of ``sizes``."""
    assert sum(sizes) == tokens.shape[1]
    starts = np.cumsum([0] + sizes)
    pieces = [
        model(tokens[:, a:b], cache)
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    return mx.concatenate(pieces, axis=1)


def windowed_mask(L: int, keep: int, window: int) -> mx.array:
    q = mx.arange(L)[:, None]
    k = mx.arange(L)[None]
    return (k <= q) & ((k < keep) | (q - k < window))


def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: mx.array, base: float) -> mx.array:
    # Hugging Face's rotate-half layout: pairs are (i, i + head_dim / 2).
    L, half = x.shape[2], x.shape[3] // 2
    inv_freq = base ** (-mx.arange(0, 2 * half, 2, dtype=mx.float32) / (2 * half))
    angles = mx.arange(L, dtype=mx.float32)[:, None] * inv_freq[None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_logits(model: Model, tokens: mx.array, mask: mx.array) -> mx.array:
    """A full forward in plain MLX ops where query i sees key j iff mask[i, j]."""
    args, p = model.args, dict(tree_flatten(model.parameters()))
    B, L = tokens.shape
    n_heads, n_kv_heads, hd = (
        args.num_attention_heads,
        args.num_key_value_heads,
        args.head_dim,
    )

    def heads(x: mx.array, weight: mx.array, n: int) -> mx.array:
        return (x @ weight.T).reshape(B, L, n, hd).transpose(0, 2, 1, 3)

    theta, eps = args.rope_theta, args.rms_norm_eps
    h = p["model.embed_tokens.weight"][tokens]
    for i in range(args.num_hidden_layers):
        w = {k.split(f"layers.{i}.")[1]: v for k, v in p.items() if f"s.{i}." in k}
        x = _rms_norm(h, w["input_layernorm.weight"], eps)
        queries = _rope(heads(x, w["self_attn.q_proj.weight"], n_heads), theta)
        keys = _rope(heads(x, w["self_attn.k_proj.weight"], n_kv_heads), theta)
        values = heads(x, w["self_attn.v_proj.weight"], n_kv_heads)
        keys = mx.repeat(keys, n_heads // n_kv_heads, axis=1)
        values = mx.repeat(values, n_heads // n_kv_heads, axis=1)
        scores = (queries @ keys.swapaxes(-1, -2)) * hd**-0.5
        scores = mx.where(mask, scores, -mx.inf)
        out = (mx.softmax(scores, axis=-1) @ values).transpose(0, 2, 1, 3)
        h = h + out.reshape(B, L, -1) @ w["self_attn.o_proj.weight"].T

        x = _rms_norm(h, w["post_attention_layernorm.weight"], eps)
        gate = x @ w["mlp.gate_proj.weight"].T
        up = x @ w["mlp.up_proj.weight"].T
        h = h + (gate * mx.sigmoid(gate) * up) @ w["mlp.down_proj.weight"].T
    h = _rms_norm(h, p["model.norm.weight"], eps)
    return h @ p["lm_head.weight"].T


def random_kv(L: int, seed: int) -> tuple[mx.array, mx.array]:
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    shape = (2, N_KV_HEADS, L, HEAD_DIM)
    return mx.random.normal(shape, key=k1), mx.random.normal(shape, key=k2)


# ---------------------------------------------------------------------------
# KVCache


def test_kv_cache_grows_in_steps_of_256_not_per_token(monkeypatch):
    grows = []
    original = KVCache._grow
    monkeypatch.setattr(
        KVCache, "_grow", lambda self, *a: grows.append(a[-1]) or original(self, *a)
    )
    cache = KVCache()
    keys, values = random_kv(257, seed=0)

    capacity = []
    for i in range(257):
        cache.update_and_fetch(keys[..., i : i + 1, :], values[..., i : i + 1, :])
        capacity.append(cache.keys.shape[2])

    assert capacity[0] == 256
    assert set(capacity[:256]) == {256}
    assert capacity[256] == 512
    assert grows == [1, 257]
    assert cache.values.shape == (2, N_KV_HEADS, 512, HEAD_DIM)


@pytest.mark.parametrize(
    "sizes, capacity",
    [([1], 256), ([256], 256), ([257], 512), ([100, 200], 512), ([600], 768)],
)
def test_kv_cache_capacity_is_rounded_up_to_the_step(sizes, capacity):
    cache = KVCache()
    keys, values = random_kv(sum(sizes), seed=1)

    start = 0
    for size in sizes:
        cache.update_and_fetch(
            keys[..., start : start + size, :], values[..., start : start + size, :]
        )
        start += size

    assert cache.keys.shape[2] == capacity
    assert cache.offset == sum(sizes)


def test_kv_cache_returns_everything_fed_so_far():
    cache = KVCache()
    sizes = [5, 1, 1, 250, 3]
    keys, values = random_kv(sum(sizes), seed=2)

    start = 0
    for size in sizes:
        end = start + size
        k, v = cache.update_and_fetch(
            keys[..., start:end, :], values[..., start:end, :]
        )
        assert cache.offset == end
        np.testing.assert_array_equal(np.array(k), np.array(keys[..., :end, :]))
        np.testing.assert_array_equal(np.array(v), np.array(values[..., :end, :]))
        start = end

    state_keys, state_values = cache.state
    np.testing.assert_array_equal(np.array(state_keys), np.array(keys))
    np.testing.assert_array_equal(np.array(state_values), np.array(values))
    assert cache.nbytes == 2 * 2 * N_KV_HEADS * 512 * HEAD_DIM * 4


def test_kv_cache_trim_forgets_the_last_tokens():
    cache = KVCache()
    keys, values = random_kv(12, seed=3)
    cache.update_and_fetch(keys[..., :10, :], values[..., :10, :])

    assert cache.trim(3) == 3
    assert cache.offset == 7
    k, v = cache.update_and_fetch(keys[..., 10:, :], values[..., 10:, :])

    expected_keys = mx.concatenate([keys[..., :7, :], keys[..., 10:, :]], axis=2)
    expected_values = mx.concatenate([values[..., :7, :], values[..., 10:, :]], axis=2)
    np.testing.assert_array_equal(np.array(k), np.array(expected_keys))
    np.testing.assert_array_equal(np.array(v), np.array(expected_values))
    assert cache.trim(100) == 9
    assert cache.offset == 0
    assert cache.state[0].shape[2] == 0


def test_kv_cache_trim_then_model_continues_like_a_fresh_run(model):
    tokens = make_tokens(12)
    other = make_tokens(4, seed=9)
    cache = model.make_cache()
    model(tokens, cache)
    for layer_cache in cache:
        layer_cache.trim(4)

    logits = model(other, cache)

    expected = model(mx.concatenate([tokens[:, :8], other], axis=1))[:, 8:]
    np.testing.assert_allclose(np.array(logits), np.array(expected), atol=ATOL)


# ---------------------------------------------------------------------------
# Model with a KVCache


def test_reference_forward_matches_the_model(model):
    tokens = make_tokens(20)
    causal = mx.tril(mx.ones((20, 20), dtype=mx.bool_))

    np.testing.assert_allclose(
        np.array(reference_logits(model, tokens, causal)),
        np.array(model(tokens)),
        atol=ATOL,
    )


def test_multi_turn_on_one_cache_matches_one_forward(model):
    turn1, turn2 = make_tokens(9, seed=1), make_tokens(7, seed=2)
    turn3 = make_tokens(1, seed=3)
    cache = model.make_cache()

    logits1 = model(turn1, cache)
    logits2 = model(turn2, cache)
    logits3 = model(turn3, cache)

    assert [c.offset for c in cache] == [17, 17]
    full = model(mx.concatenate([turn1, turn2, turn3], axis=1))
    np.testing.assert_allclose(np.array(logits1), np.array(full[:, :9]), atol=ATOL)
    np.testing.assert_allclose(np.array(logits2), np.array(full[:, 9:16]), atol=ATOL)
    np.testing.assert_allclose(np.array(logits3), np.array(full[:, 16:]), atol=ATOL)


def test_chunked_prefill_matches_single_pass(model):
    tokens = make_tokens(40)
    cache = model.make_cache()

    logits = run_schedule(model, tokens, [7] * 5 + [5], cache)

    assert [c.offset for c in cache] == [40, 40]
    np.testing.assert_allclose(np.array(logits), np.array(model(tokens)), atol=ATOL)


def test_sliding_window_model_uses_the_window(windowed_model):
    # Mistral-style: query q sees keys k with q - k < 5, no tokens kept.
    tokens = make_tokens(14)
    cache = windowed_model.make_cache()

    incremental = run_schedule(windowed_model, tokens, [3, 4] + [1] * 7, cache)

    expected = reference_logits(windowed_model, tokens, windowed_mask(14, 0, 5))
    full = windowed_model(tokens)
    np.testing.assert_allclose(np.array(full), np.array(expected), atol=ATOL)
    np.testing.assert_allclose(np.array(incremental), np.array(expected), atol=ATOL)


# ---------------------------------------------------------------------------
# RotatingKVCache


def test_rotating_cache_below_max_size_equals_full_cache(model):
    tokens = make_tokens(30)
    sizes = [7, 7, 6] + [1] * 10
    rotating = [RotatingKVCache(64, keep=4) for _ in model.layers]

    logits = run_schedule(model, tokens, sizes, rotating)
    expected = run_schedule(model, tokens, sizes, model.make_cache())

    np.testing.assert_array_equal(np.array(logits), np.array(expected))
    assert [c.offset for c in rotating] == [30, 30]


MAX_SIZE, KEEP = 16, 4
SCHEDULES = {
    "prefill-exceeds": [7, 7, 6] + [1] * 12,
    "decode-exceeds": [5, 5] + [1] * 14,
    "one-chunk-over-max": [24] + [1] * 6,
    "chunk-after-wrap": [5, 5] + [1] * 10 + [6] + [1] * 3,
    "single-tokens": [1] * 22,
}


@pytest.mark.parametrize("sizes", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_rotating_cache_keeps_first_tokens_and_a_window(model, sizes):
    total = sum(sizes)
    tokens = make_tokens(total)
    cache = [RotatingKVCache(MAX_SIZE, keep=KEEP) for _ in model.layers]
    full = model.make_cache()
    model(tokens, full)
    full_keys = np.array(full[0].state[0])

    offset, pieces = 0, []
    for size in sizes:
        pieces.append(model(tokens[:, offset : offset + size], cache))
        offset += size
        stored = min(offset, MAX_SIZE)
        for layer_cache, full_cache in zip(cache, full, strict=True):
            assert layer_cache.offset == offset
            assert layer_cache.keys.shape[2] <= MAX_SIZE
            assert layer_cache.state[0].shape[2] == stored
            # The first tokens' keys never depend on later ones: exact match.
            first = min(KEEP, offset)
            np.testing.assert_array_equal(
                np.array(layer_cache.state[0][..., :first, :]),
                np.array(full_cache.state[0][..., :first, :]),
            )
        # Layer 0 keys depend only on token and position, so the stored
        # window (oldest first) is a slice of the full cache's keys.
        kept = list(range(offset))
        if offset > MAX_SIZE:
            kept = kept[:KEEP] + kept[offset - (MAX_SIZE - KEEP) :]
        np.testing.assert_allclose(
            np.array(cache[0].state[0]), full_keys[..., kept, :], atol=ATOL
        )

    mask = windowed_mask(total, KEEP, MAX_SIZE - KEEP)
    np.testing.assert_allclose(
        np.array(mx.concatenate(pieces, axis=1)),
        np.array(reference_logits(model, tokens, mask)),
        atol=ATOL,
    )


def test_rotating_cache_single_step_after_window_matches_hand_attention(model):
    # One decode step, once 30 tokens were seen with max_size 16 and keep 4:
    # the new query attends to tokens 0-3 and 19-30 and nothing else.
    tokens = make_tokens(31)
    cache = [RotatingKVCache(MAX_SIZE, keep=KEEP) for _ in model.layers]
    run_schedule(model, tokens[:, :30], [10, 10, 10], cache)

    logits = model(tokens[:, 30:], cache)

    mask = windowed_mask(31, KEEP, MAX_SIZE - KEEP)
    assert np.array(mask[30]).nonzero()[0].tolist() == [0, 1, 2, 3, *range(19, 31)]
    expected = reference_logits(model, tokens, mask)[:, 30:]
    np.testing.assert_allclose(np.array(logits), np.array(expected), atol=ATOL)
    plain = model(tokens)[:, 30:]
    assert np.abs(np.array(plain) - np.array(logits)).max() > 1e-2


@pytest.mark.parametrize(
    "max_size, sizes",
    [
        (8, [3, 3] + [1] * 14),
        (12, [3, 3] + [1] * 14),
        (12, [1] * 20),
        (8, [10] + [1] * 10),
        # The cache's own window (4) is narrower than the model's (5).
        (6, [3, 3] + [1] * 14),
    ],
    ids=["chunks-8", "chunks-12", "single-tokens-12", "big-chunk-8", "chunks-6"],
)
def test_rotating_cache_applies_the_model_window(windowed_model, max_size, sizes):
    # The model hides keys 5 or more positions back; the cache must keep
    # doing so on single-token steps, where its buffer is in ring order.
    total = sum(sizes)
    tokens = make_tokens(total)
    cache = [RotatingKVCache(max_size, keep=2) for _ in windowed_model.layers]

    logits = run_schedule(windowed_model, tokens, sizes, cache)

    mask = windowed_mask(total, 2, max_size - 2) & windowed_mask(total, 0, 5)
    expected = reference_logits(windowed_model, tokens, mask)
    np.testing.assert_allclose(np.array(logits), np.array(expected), atol=ATOL)
    if max_size - 2 >= 5:
        np.testing.assert_allclose(
            np.array(logits), np.array(windowed_model(tokens)), atol=ATOL
        )


def test_rotating_cache_refuses_trim_and_tiny_sizes():
    cache = RotatingKVCache(8, keep=4)
    keys, values = random_kv(5, seed=4)
    cache.update_and_fetch(keys, values)

    assert cache.trim(2) == 0
    assert cache.offset == 5
    with pytest.raises(ValueError, match="larger than 4"):
        RotatingKVCache(4, keep=4)


def test_make_cache_picks_the_cache_kind(model):
    assert all(type(c) is KVCache for c in model.make_cache())
    bounded = model.make_cache(max_kv_size=32)
    assert all(type(c) is RotatingKVCache for c in bounded)
    assert [c.max_size for c in bounded] == [32, 32]
    assert len(bounded) == 2


# ---------------------------------------------------------------------------
# Mask helpers


@pytest.mark.parametrize(
    "L, offset, window",
    [(4, 0, None), (3, 5, None), (4, 3, 2), (1, 9, 5), (6, 0, 3)],
)
def test_causal_mask_values(L, offset, window):
    q = np.arange(offset, offset + L)[:, None]
    k = np.arange(offset + L)[None]
    expected = (k <= q) & ((q - k < window) if window else True)

    mask = causal_mask(L, offset, window)

    assert mask.dtype == mx.bool_
    np.testing.assert_array_equal(np.array(mask), expected)


def _cache_at(offset: int) -> KVCache:
    cache = KVCache()
    if offset:
        cache.update_and_fetch(*random_kv(offset, seed=5))
    return cache


@pytest.mark.parametrize(
    "L, offset, window, expected",
    [
        (1, 0, None, None),
        (5, 0, None, "causal"),
        (4, 3, None, "causal"),
        (1, 12, None, None),
        (4, 3, 10, "causal"),
        (3, 2, 5, "causal"),
        (4, 3, 5, "array"),
        (1, 9, 5, "array"),
    ],
)
def test_attention_mask_kind(L, offset, window, expected):
    cache = _cache_at(offset) if offset else None

    mask = attention_mask(L, cache, window)

    if expected == "array":
        np.testing.assert_array_equal(
            np.array(mask), np.array(causal_mask(L, offset, window))
        )
    else:
        assert mask == expected


@pytest.mark.parametrize("L, offset", [(3, 4), (5, 0), (2, 9)])
def test_causal_string_is_aligned_to_the_last_key(L, offset):
    # attention_mask relies on the fused kernel's "causal" matching causal_mask
    # when queries come after cached keys.
    mx.random.seed(11)
    queries = mx.random.normal((1, 4, L, HEAD_DIM))
    keys = mx.random.normal((1, N_KV_HEADS, offset + L, HEAD_DIM))
    values = mx.random.normal((1, N_KV_HEADS, offset + L, HEAD_DIM))

    def attend(mask):
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=HEAD_DIM**-0.5, mask=mask
        )

    np.testing.assert_allclose(
        np.array(attend("causal")),
        np.array(attend(causal_mask(L, offset))),
        atol=1e-6,
    )


def test_rotating_make_mask_after_the_window_is_exceeded():
    cache = RotatingKVCache(6, keep=2)
    cache.update_and_fetch(*random_kv(8, seed=6))

    mask = cache.make_mask(3)

    # Stored: positions 0, 1 and 4-7; then come the new 8, 9, 10.
    k = np.array([0, 1, 4, 5, 6, 7, 8, 9, 10])[None]
    q = np.arange(8, 11)[:, None]
    expected = (k <= q) & ((k < 2) | (q - k < 4))
    np.testing.assert_array_equal(np.array(mask), expected)
    assert RotatingKVCache(6, keep=2).make_mask(4) == "causal"
