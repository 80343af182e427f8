"""Tests for mlxbastion.sample: filters, samplers and logits processors."""

import math

import mlx.core as mx
import pytest

from mlxbastion.sample import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

# Probabilities chosen so that no filter threshold lands on a rounding edge.
# Ranked: token 1 (0.4), 3 (0.3), 4 (0.15), 2 (0.1), 0 (0.05).
PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]


def logprobs_of(*rows: list[float]) -> mx.array:
    return mx.log(mx.array(list(rows), dtype=mx.float32))


def survivors(logprobs: mx.array) -> list[set[int]]:
    """The ids that are still finite, one set per row."""
    return [
        {i for i, v in enumerate(row) if v != -math.inf} for row in logprobs.tolist()
    ]


def assert_filtered_exactly(out: mx.array, original: mx.array, keep: set[int]):
    """Kept entries are unchanged bit for bit; every other entry is -inf."""
    for i, (got, want) in enumerate(
        zip(out[0].tolist(), original[0].tolist(), strict=True)
    ):
        assert got == (want if i in keep else -math.inf), i


@pytest.mark.parametrize(
    "top_k, keep",
    [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (0, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})],
)
def test_top_k_keeps_the_k_most_likely(top_k, keep):
    lp = logprobs_of(PROBS)
    assert_filtered_exactly(apply_top_k(lp, top_k), lp, keep)


def test_top_k_is_per_row():
    lp = logprobs_of(PROBS, [0.6, 0.1, 0.1, 0.05, 0.15])
    assert survivors(apply_top_k(lp, 2)) == [{1, 3}, {0, 4}]


@pytest.mark.parametrize(
    "top_p, min_keep, keep",
    [
        (0.3, 1, {1}),
        # 0.4 < 0.5, so token 3 is needed to reach the mass.
        (0.5, 1, {1, 3}),
        (0.75, 1, {1, 3, 4}),
        (0.9, 1, {1, 2, 3, 4}),
        (1.0, 1, {0, 1, 2, 3, 4}),
        (0.3, 3, {1, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, min_keep, keep):
    lp = logprobs_of(PROBS)
    assert_filtered_exactly(apply_top_p(lp, top_p, min_keep), lp, keep)


def test_top_p_renormalizes_over_finite_tokens():
    # After dropping tokens 0 and 2 the survivors have mass 0.85; renormalized,
    # token 1 holds 0.47, so p=0.45 keeps it alone and p=0.5 needs token 3.
    lp = logprobs_of(PROBS)
    lp = mx.where(mx.array([[False, True, False, True, True]]), lp, -mx.inf)
    assert survivors(apply_top_p(lp, 0.45)) == [{1}]
    assert survivors(apply_top_p(lp, 0.5)) == [{1, 3}]


@pytest.mark.parametrize(
    "min_p, min_keep, keep",
    [
        (0.0, 1, {0, 1, 2, 3, 4}),
        # Thresholds are min_p * 0.4.
        (0.3, 1, {1, 3, 4}),
        (0.5, 1, {1, 3}),
        (0.9, 1, {1}),
        (0.9, 2, {1, 3}),
    ],
)
def test_min_p_drops_tokens_below_the_relative_floor(min_p, min_keep, keep):
    lp = logprobs_of(PROBS)
    assert_filtered_exactly(apply_min_p(lp, min_p, min_keep), lp, keep)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_filters_keep_shape_and_dtype(dtype):
    lp = logprobs_of(PROBS, PROBS).astype(dtype)
    for out in (apply_top_k(lp, 2), apply_top_p(lp, 0.5), apply_min_p(lp, 0.5)):
        assert out.shape == (2, 5)
        assert out.dtype == dtype
        assert survivors(out) == [{1, 3}, {1, 3}]


def test_greedy_is_argmax_per_row():
    lp = logprobs_of(PROBS, [0.6, 0.1, 0.1, 0.05, 0.15])
    tokens = make_sampler()(lp)
    assert tokens.shape == (2,)
    assert tokens.tolist() == [1, 0]


def test_seed_reproduces_samples():
    sampler = make_sampler(temp=1.0)
    lp = logprobs_of(PROBS)

    def draw(seed: int) -> list[int]:
        mx.random.seed(seed)
        return [sampler(lp).item() for _ in range(50)]

    first = draw(3)
    assert draw(3) == first
    assert len(set(first)) > 1
    assert draw(4) != first


@pytest.mark.parametrize("temp", [0.1, 1.0, 10.0, 1000.0])
def test_top_k_one_equals_greedy_at_any_temperature(temp):
    mx.random.seed(0)
    lp = logprobs_of(PROBS, [0.6, 0.1, 0.1, 0.05, 0.15], [0.1, 0.1, 0.1, 0.1, 0.6])
    greedy = make_sampler()(lp).tolist()
    sampler = make_sampler(temp=temp, top_k=1)
    for _ in range(20):
        assert sampler(lp).tolist() == greedy


@pytest.mark.parametrize("temp", [1.0, 0.5])
def test_sample_frequencies_follow_tempered_distribution(temp):
    mx.random.seed(1)
    n = 20_000
    lp = mx.broadcast_to(logprobs_of(PROBS), (n, len(PROBS)))
    counts = [0] * len(PROBS)
    for token in make_sampler(temp=temp)(lp).tolist():
        counts[token] += 1

    tempered = [p ** (1 / temp) for p in PROBS]
    expected = [t / sum(tempered) for t in tempered]
    for count, want in zip(counts, expected, strict=True):
        assert abs(count / n - want) < 0.015


def test_filter_order_top_k_before_top_p():
    # Top-k(2) leaves {0: 4/7, 1: 3/7}, so top-p(0.5) then keeps token 0 only;
    # top-p first would keep {0, 1}.
    lp = logprobs_of([0.4, 0.3, 0.2, 0.1])
    assert survivors(apply_top_p(apply_top_k(lp, 2), 0.5)) == [{0}]
    assert survivors(apply_top_k(apply_top_p(lp, 0.5), 2)) == [{0, 1}]

    mx.random.seed(0)
    sampler = make_sampler(temp=1.0, top_k=2, top_p=0.5)
    assert {sampler(lp).item() for _ in range(100)} == {0}


def test_temperature_applies_after_min_p():
    # min_p 0.2 drops token 3 (0.05 < 0.1). Had temperature 5 come first,
    # the flattened distribution would keep it.
    lp = logprobs_of([0.5, 0.3, 0.15, 0.05])
    assert survivors(apply_min_p(lp / 5.0, 0.2)) == [{0, 1, 2, 3}]

    mx.random.seed(0)
    sampler = make_sampler(temp=5.0, min_p=0.2)
    batch = mx.broadcast_to(lp, (2000, 4))
    assert set(sampler(batch).tolist()) == {0, 1, 2}


def test_filters_compose_in_sampler():
    mx.random.seed(0)
    batch = mx.broadcast_to(logprobs_of(PROBS), (2000, 5))
    # Each filter removes something: top-k 4 drops token 0; top-p 0.8 over the
    # rest, (0.4, 0.3, 0.15, 0.1) / 0.95, drops token 2 (mass before it 0.89);
    # min-p 0.4 drops token 4 (0.15 < 0.4 * 0.4).
    sampler = make_sampler(temp=1.0, top_k=4, top_p=0.8, min_p=0.4)
    assert set(sampler(batch).tolist()) == {1, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temp": -0.1}, "temp must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": -0.1}, "min_p must be in"),
        ({"min_p": 1.0}, "min_p must be in"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep must be >= 1"),
    ],
)
def test_make_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**kwargs)


def test_repetition_penalty_values():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 4.0]])
    tokens = mx.array([0, 1, 1, 3])
    (processor,) = make_logits_processors(repetition_penalty=2.0)
    out = processor(tokens, logits)
    # Positive logits halve, negative ones double; token 1 repeats but counts
    # once; tokens 2 and 4 never appeared.
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 4.0]]


def test_repetition_penalty_uses_only_recent_context():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 4.0]])
    processor = make_repetition_penalty(2.0, context_size=2)
    out = processor(mx.array([0, 4, 1, 3]), logits)
    assert out.tolist() == [[2.0, -2.0, 0.5, -6.0, 4.0]]


def test_repetition_penalty_batched_tokens():
    logits = mx.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    processor = make_repetition_penalty(4.0)
    out = processor(mx.array([[0, 0], [2, 1]]), logits)
    assert out.tolist() == [[0.25, 1.0, 1.0], [-1.0, -4.0, -4.0]]


def test_repetition_penalty_without_history_is_identity():
    logits = mx.array([[1.0, -2.0]])
    processor = make_repetition_penalty(1.5)
    out = processor(mx.array([], dtype=mx.int32), logits)
    assert out.tolist() == [[1.0, -2.0]]


def test_no_processors_by_default():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        (
            {"repetition_penalty": 1.1, "repetition_context_size": 0},
            "repetition_context_size must be >= 1",
        ),
    ],
)
def test_make_logits_processors_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_logits_processors(**kwargs)
