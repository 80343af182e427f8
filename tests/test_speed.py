"""The CPU speed levers: float matmuls for many-row quantized products,
dequantizing at load, logits for the last prompt position only, and
restarting with OpenBLAS preloaded."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_quant import quantize_cli, save_model, tiny_model

from mlxbastion import blas, kernels, load
from mlxbastion.generate import generate_step, prefill
from mlxbastion.model import (
    DequantizingEmbedding,
    DequantizingLinear,
    dequantize_for_many_rows,
)


def quantized_layer(bits: int, bias: bool) -> nn.QuantizedLinear:
    mx.random.seed(1)
    linear = nn.Linear(128, 96, bias=bias)
    if bias:
        linear.bias = mx.random.normal((96,))
    return nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_go_through_float_and_match_the_quantized_kernel(bits, bias):
    layer = quantized_layer(bits, bias)
    x = mx.random.normal((2, 20, 128))
    expected = layer(x)
    assert dequantize_for_many_rows(layer, min_rows=8) == 1
    assert isinstance(layer, DequantizingLinear)
    assert isinstance(layer, nn.QuantizedLinear)
    assert layer.min_rows == 8
    out = layer(x)
    assert out.shape == (2, 20, 96)
    assert mx.allclose(out, expected, atol=1e-4).item()


def test_a_tied_head_of_many_rows_goes_through_float_and_matches():
    embedding = nn.Embedding(300, 128)
    embedding.weight = mx.random.normal((300, 128))
    quantized = nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=4)
    x = mx.random.normal((2, 20, 128))
    ids = mx.array([[0, 5, 299]])
    expected_head, expected_rows = quantized.as_linear(x), quantized(ids)
    assert dequantize_for_many_rows(quantized, min_rows=8) == 1
    assert isinstance(quantized, DequantizingEmbedding)
    head = quantized.as_linear(x)
    assert head.shape == (2, 20, 300)
    assert mx.allclose(head, expected_head, atol=1e-4).item()
    assert mx.array_equal(quantized(ids), expected_rows).item()
    # Swapping again changes the threshold only.
    assert dequantize_for_many_rows(quantized, min_rows=16) == 1
    assert quantized.min_rows == 16


def test_few_rows_keep_the_quantized_kernel(monkeypatch):
    # MLX's kernel, as where ours does not apply (tests/test_kernels.py).
    monkeypatch.setattr(kernels, "applies", lambda layer: False)
    layer = quantized_layer(4, bias=False)
    dequantize_for_many_rows(layer, min_rows=8)
    calls = []
    real = mx.dequantize
    monkeypatch.setattr(
        mx, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    layer(mx.random.normal((1, 7, 128)))
    assert calls == []
    layer(mx.random.normal((1, 8, 128)))
    assert calls == [1]


@pytest.fixture(scope="module")
def q4_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    float_dir = save_model(tiny_model(hidden_size=128), root / "float")
    quantize_cli(float_dir, root / "q4", "--bits", "4", "--method", "rtn", "--no-eval")
    return float_dir, root / "q4"


def test_load_makes_quantized_linears_dequantize_for_prompts(q4_folder):
    _, q4 = q4_folder
    model, _ = load(q4)
    kinds = {type(m) for _, m in model.named_modules()}
    assert DequantizingLinear in kinds
    assert DequantizingEmbedding in kinds
    assert nn.Linear not in kinds
    expected = 4 if blas.fast_matmul() else 16
    assert {m.min_rows for _, m in model.named_modules() if hasattr(m, "min_rows")} == {
        expected
    }


def test_dequantize_at_load_gives_float_layers_and_the_same_logits(q4_folder):
    _, q4 = q4_folder
    quantized, _ = load(q4)
    dequantized, _ = load(q4, dequantize=True)
    assert not any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for _, m in dequantized.named_modules()
    )
    dtypes = {v.dtype for _, v in tree_flatten(dequantized.parameters())}
    assert dtypes == {mx.float32}
    ids = mx.array([[1, 17, 99, 250, 3, 42]])
    # One row at a time runs the quantized kernel in the quantized model.
    for n in range(1, ids.shape[1] + 1):
        a = quantized(ids[:, :n])[:, -1]
        b = dequantized(ids[:, :n])[:, -1]
        assert mx.allclose(a, b, atol=1e-4).item()


def test_last_only_is_the_last_row_of_the_full_logits():
    model = tiny_model()
    ids = mx.array([[5, 9, 300, 12, 77]])
    full = model(ids)
    last = model(ids, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert mx.allclose(last[:, 0], full[:, -1], atol=1e-5).item()


def test_prefill_in_chunks_gives_the_full_pass_logits():
    model = tiny_model()
    ids = mx.array(np.random.default_rng(0).integers(0, 512, 37))
    logits = prefill(model, ids, model.make_cache(), prefill_step_size=8)
    assert mx.allclose(logits, model(ids[None])[:, -1], atol=1e-4).item()
    greedy = [t for t, _ in generate_step(ids, model, max_tokens=5)]
    assert greedy[0] == mx.argmax(logits).item()


# Restarting with OpenBLAS


class Exec(Exception):
    pass


@pytest.fixture
def exec_calls(monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(blas, "cpu_backend", lambda: True)
    monkeypatch.setattr(blas, "loaded_blas", lambda: None)
    monkeypatch.setattr(blas, "find_openblas", lambda: "libopenblas.so.0")
    monkeypatch.delenv("MLXBASTION_BLAS", raising=False)
    monkeypatch.delenv("MLXBASTION_BLAS_REEXEC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.setattr(sys, "platform", "linux")
    return calls


def test_reexec_preloads_openblas_and_marks_the_child(exec_calls):
    with pytest.raises(Exec):
        blas.reexec_with_openblas()
    ((path, argv, env),) = exec_calls
    assert path == sys.executable
    assert argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "libopenblas.so.0 libother.so"
    assert env["MLXBASTION_BLAS_REEXEC"] == "1"


@pytest.mark.parametrize(
    "change",
    [
        ("env", "MLXBASTION_BLAS", "reference"),
        ("env", "MLXBASTION_BLAS_REEXEC", "1"),
        ("attr", "loaded_blas", lambda: "libopenblasp-r0.3.21.so"),
        ("attr", "find_openblas", lambda: None),
        ("attr", "cpu_backend", lambda: False),
    ],
    ids=["opted-out", "restarted-once", "already-fast", "none-installed", "gpu"],
)
def test_reexec_does_nothing_when_it_would_not_help(exec_calls, monkeypatch, change):
    kind, name, value = change
    if kind == "env":
        monkeypatch.setenv(name, value)
    else:
        monkeypatch.setattr(blas, name, value)
    blas.reexec_with_openblas()
    assert exec_calls == []


@pytest.mark.skipif(blas.find_openblas() is None, reason="OpenBLAS is not installed")
def test_the_command_line_runs_on_openblas_when_installed():
    code = (
        "from mlxbastion import blas\n"
        "blas.reexec_with_openblas()\n"
        "print(blas.loaded_blas())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXBASTION_BLAS")}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "openblas" in out.stdout
    env["MLXBASTION_BLAS"] = "reference"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"


def test_reference_blas_hint_unless_opted_out(monkeypatch, caplog):
    monkeypatch.setattr(blas, "fast_matmul", lambda: False)
    logger = logging.getLogger("mlxbastion.blas")
    logger.addHandler(caplog.handler)
    try:
        monkeypatch.delenv("MLXBASTION_BLAS", raising=False)
        blas.warn_if_reference_blas()
        assert "reference BLAS" in caplog.text
        caplog.clear()
        monkeypatch.setenv("MLXBASTION_BLAS", "reference")
        blas.warn_if_reference_blas()
        assert caplog.text == ""
    finally:
        logger.removeHandler(caplog.handler)
