"""The x86-64 CPU kernel for quantized products of a few rows
(mlxbastion/kernels): same results as MLX's kernel, gradients for LoRA on a
quantized base, the same decoding, and a clean fallback when it cannot be
built."""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import pytest
from test_quant import tiny_model

from mlxbastion import kernels
from mlxbastion.model import dequantize_for_many_rows

pytestmark = pytest.mark.skipif(
    kernels.unsupported_reason() is not None,
    reason=f"CPU kernel not for this machine: {kernels.unsupported_reason()}",
)


def packed(n: int, k: int, bits: int, group_size: int, seed: int = 0):
    weight = mx.random.normal((n, k), key=mx.random.key(seed))
    return mx.quantize(weight, group_size=group_size, bits=bits)


def test_it_builds_and_loads_here():
    # On an x86-64 machine with AVX2 a failed build is a bug, not a fallback.
    module = kernels.load()
    assert module is not None
    assert kernels.build().name.startswith(kernels.MODULE)
    assert kernels.build().parent == kernels.cache_dir()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_matches_mlx_quantized_matmul(bits, group_size, rows):
    # 200 outputs: not a multiple of the 16-feature work item.
    w, scales, biases = packed(200, 384, bits, group_size)
    x = mx.random.normal((rows, 384), key=mx.random.key(rows))
    expected = mx.quantized_matmul(
        x, w, scales, biases, group_size=group_size, bits=bits
    )
    got = kernels.load().quantized_matvec(
        x, w, scales, biases, group_size=group_size, bits=bits
    )
    assert got.shape == (rows, 200) and got.dtype == mx.float32
    scale = mx.abs(expected).max().item()
    assert mx.abs(got - expected).max().item() < 1e-5 * scale


def test_batched_leading_axes_and_half_precision_scales():
    w, scales, biases = packed(64, 128, 4, 32)
    scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    x = mx.random.normal((2, 3, 128))
    weight = mx.dequantize(
        w, scales.astype(mx.float32), biases.astype(mx.float32), 32, 4
    )
    expected = x @ weight.T
    got = kernels.load().quantized_matvec(x, w, scales, biases, 32, 4)
    assert got.shape == (2, 3, 64) and got.dtype == mx.float32
    assert mx.allclose(got, expected, rtol=1e-5, atol=1e-4).item()


def test_bad_arguments_are_refused_with_the_reason():
    w, scales, biases = packed(64, 128, 4, 32)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4, 5, 6 or 8"):
        kernels.load().quantized_matvec(mx.ones((1, 128)), w, scales, biases, 32, 7)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.load().quantized_matvec(mx.ones((1, 96)), w, scales, biases, 32, 4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_a_quantized_linear_uses_it_for_a_few_rows(monkeypatch, bias, dtype):
    linear = nn.Linear(128, 96, bias=bias)
    if bias:
        linear.bias = mx.random.normal((96,))
    layer = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
    layer.set_dtype(dtype)  # as a loaded model's scales, biases and bias
    x = mx.random.normal((1, 5, 128), key=mx.random.key(3)).astype(dtype)
    # The exact product in float32 (MLX's kernel in bfloat16 rounds along
    # the way, so it is no reference there).
    weight = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        layer.biases.astype(mx.float32),
        group_size=64,
        bits=4,
    )
    expected = x.astype(mx.float32) @ weight.T
    if bias:
        expected = expected + layer.bias.astype(mx.float32)
    dequantize_for_many_rows(layer, min_rows=4)
    calls = []
    real = kernels.quantized_matvec
    monkeypatch.setattr(
        kernels, "quantized_matvec", lambda *a: calls.append(1) or real(*a)
    )
    got = layer(x)
    assert calls == [1]  # five rows: the kernel, not a float product
    assert got.dtype == dtype and got.shape == (1, 5, 96)
    # bfloat16 keeps 8 significant bits: one rounding of the output.
    tol = 1e-4 if dtype == mx.float32 else 1e-2
    assert mx.allclose(got.astype(mx.float32), expected, rtol=tol, atol=tol).item()
    layer(mx.random.normal((1, kernels.max_rows(4), 128)))
    assert calls == [1]  # from max_rows(4) rows on, the float path


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("head", [False, True])
def test_the_row_threshold_depends_on_the_width(monkeypatch, bits, head):
    # MLX dequantizes 3-, 5- and 6-bit weights slowly, so the kernel keeps
    # more rows for them; the tied head (an embedding) follows the same rule.
    if head:
        embedding = nn.Embedding(96, 128)
        layer = nn.QuantizedEmbedding.from_embedding(embedding, 64, bits)
    else:
        layer = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), 64, bits)
    dequantize_for_many_rows(layer, min_rows=4)
    product = layer.as_linear if head else layer
    paths = []
    real_kernel, real_dequantize = kernels.quantized_matvec, mx.dequantize
    monkeypatch.setattr(
        kernels,
        "quantized_matvec",
        lambda *a: paths.append("kernel") or real_kernel(*a),
    )
    monkeypatch.setattr(
        mx,
        "dequantize",
        lambda *a, **k: paths.append("float") or real_dequantize(*a, **k),
    )
    limit = kernels.max_rows(bits)
    assert limit == {4: 32, 6: 128}[bits]
    assert product(mx.random.normal((limit - 1, 128))).shape == (limit - 1, 96)
    assert product(mx.random.normal((limit, 128))).shape == (limit, 96)
    assert paths == ["kernel", "float"]


def test_gradient_with_respect_to_the_input_matches_mlx():
    w, scales, biases = packed(96, 128, 4, 32)
    x = mx.random.normal((3, 128))
    cotangent = mx.random.normal((3, 96))

    def loss(fn):
        return lambda x: (fn(x) * cotangent).sum()

    ours = mx.grad(
        loss(lambda x: kernels.load().quantized_matvec(x, w, scales, biases, 32, 4))
    )(x)
    theirs = mx.grad(
        loss(lambda x: mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=4))
    )(x)
    assert mx.allclose(ours, theirs, atol=1e-4).item()


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_decoding_a_quantized_model_matches_mlx_kernel(monkeypatch, bits):
    model = tiny_model(hidden_size=128, intermediate_size=256)
    nn.quantize(model, group_size=32, bits=bits)
    dequantize_for_many_rows(model, min_rows=4)
    prompt = mx.array([[5, 17, 42]])

    def decode(steps=8):
        cache, ids, out = model.make_cache(), prompt, []
        for _ in range(steps):
            logits = model(ids, cache=cache)[:, -1]
            ids = mx.argmax(logits, axis=-1, keepdims=True)
            out.append((logits, ids.item()))
        return out

    ours = decode()
    monkeypatch.setattr(kernels, "applies", lambda layer: False)
    theirs = decode()
    assert [t for _, t in ours] == [t for _, t in theirs]
    for (a, _), (b, _) in zip(ours, theirs, strict=True):
        assert mx.abs(a - b).max().item() < 1e-3


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def broken():
        raise RuntimeError("cmake failed: no compiler")

    monkeypatch.setattr(kernels, "build", broken)
    kernels.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mlxbastion.kernels"):
            assert kernels.load() is None
            assert kernels.load() is None  # cached: warned once
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1
        assert "cmake failed: no compiler" in warnings[0]
        assert "using MLX's" in warnings[0]
        layer = nn.QuantizedLinear(64, 32, group_size=32, bits=4)
        assert not kernels.applies(layer)
    finally:
        kernels.load.cache_clear()


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MLXBASTION_KERNELS", "off")
    assert kernels.unsupported_reason() == "turned off by MLXBASTION_KERNELS"
    kernels.load.cache_clear()
    try:
        assert kernels.load() is None
    finally:
        kernels.load.cache_clear()
