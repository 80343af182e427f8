"""Logits parity between mlxbastion and transformers, one case per family.

Each case builds a tiny random checkpoint with transformers, converts it with
``mlxbastion.convert.convert``, loads it with ``load_model`` in float32 and
compares logits with the torch model on the same token ids. Fixtures use a
large init range and random norm weights and biases, so a missing bias, a
norm read as all-ones or a wrong RoPE shows up as a logit difference well
above the tolerance (see ``test_fixture_detects_missing_feature``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlxbastion.checkpoint import load_model  # noqa: E402
from mlxbastion.config import SUPPORTED_MODEL_TYPES, ModelArgs  # noqa: E402
from mlxbastion.convert import convert  # noqa: E402

ATOL = 1e-4
BATCH, LENGTH = 2, 12

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that every frequency at head_dim 16 is rescaled.
    "original_max_position_embeddings": 16,
}

# transformers config kwargs per family; hidden 64 and 2 layers everywhere.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama2": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        intermediate_size=96,
    ),
    "llama3": dict(
        model_type="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=256,
        intermediate_size=176,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama3.1": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        intermediate_size=128,
        rope_parameters=LLAMA3_ROPE,
    ),
    "llama3.2": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        intermediate_size=128,
        rope_parameters={**LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
    ),
    "llama-linear": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        intermediate_size=96,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "mistral": dict(
        model_type="mistral",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        intermediate_size=112,
        sliding_window=6,
    ),
    "qwen2": dict(
        model_type="qwen2",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=160,
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=160,
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "mqa": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=128,
        intermediate_size=96,
    ),
    "smollm": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=192,
        intermediate_size=160,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    ),
    "tinyllama": dict(
        model_type="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
        intermediate_size=176,
    ),
}

LEGACY_FAMILIES = ["llama3", "llama3.1", "llama3.2", "llama-linear", "mistral"]


@dataclass
class Checkpoint:
    hf_dir: Path
    mlx_dir: Path
    tokens: np.ndarray
    torch_logits: np.ndarray


def make_tokens(vocab_size: int, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (BATCH, length))


def build_torch_model(family: str) -> Any:
    kwargs = dict(FAMILIES[family])
    model_type = kwargs.pop("model_type")
    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=64,
        num_hidden_layers=2,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        attn_implementation="eager",
        **kwargs,
    )
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                torch.nn.init.normal_(param, std=0.2)
            elif "norm" in name:
                torch.nn.init.normal_(param, mean=1.0, std=0.5)
    return model.eval()


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json, so convert has a tokenizer to copy."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"t{i}": i for i in range(vocab_size)}
    Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))


def torch_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def mlx_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(tokens)))


def to_legacy_layout(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4.x spelling: top-level rope keys and ``torch_dtype``."""
    config = dict(config)
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    if kind == "linear":
        config["rope_scaling"] = {"type": kind, **params}
    elif kind != "default":
        config["rope_scaling"] = {"rope_type": kind, **params}
    config["torch_dtype"] = config.pop("dtype")
    return config


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``get(family)``: the family's HF folder, its conversion and torch logits."""
    built: dict[str, Checkpoint] = {}

    def get(family: str) -> Checkpoint:
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            model = build_torch_model(family)
            model.save_pretrained(root / "hf", safe_serialization=True)
            write_tokenizer(root / "hf", model.config.vocab_size)
            convert(root / "hf", root / "mlx")
            tokens = make_tokens(model.config.vocab_size)
            built[family] = Checkpoint(
                root / "hf", root / "mlx", tokens, torch_logits(model, tokens)
            )
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    ckpt = checkpoints(family)
    model, _, _ = load_model(ckpt.mlx_dir, dtype="float32")

    logits = mlx_logits(model, ckpt.tokens)

    assert logits.dtype == np.float32
    assert logits.shape == ckpt.torch_logits.shape
    np.testing.assert_allclose(logits, ckpt.torch_logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_folder_loads_like_the_source(checkpoints, family):
    # load_model also reads plain HF folders; both must give the same model.
    ckpt = checkpoints(family)
    converted, _, _ = load_model(ckpt.mlx_dir, dtype="float32")
    source, _, _ = load_model(ckpt.hf_dir, dtype="float32")

    np.testing.assert_array_equal(
        mlx_logits(converted, ckpt.tokens), mlx_logits(source, ckpt.tokens)
    )


def _ignore_llama3_scaling(model):
    for layer in model.layers:
        layer.self_attn.rope._freqs = None


def _ignore_linear_scaling(model):
    for layer in model.layers:
        layer.self_attn.rope.scale = 1.0


def _ignore_window(model):
    model.model.window = None


def _zero_qkv_biases(model):
    for layer in model.layers:
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(layer.self_attn, proj)
            linear.bias = mx.zeros_like(linear.bias)


def _unit_qk_norms(model):
    for layer in model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight = mx.ones_like(norm.weight)


def _unit_norms(model):
    model.model.norm.weight = mx.ones_like(model.model.norm.weight)
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = mx.ones_like(norm.weight)


@pytest.mark.parametrize(
    "family, ablate",
    [
        ("llama3.1", _ignore_llama3_scaling),
        ("llama3.2", _ignore_llama3_scaling),
        ("llama-linear", _ignore_linear_scaling),
        ("mistral", _ignore_window),
        ("qwen2", _zero_qkv_biases),
        ("qwen3", _unit_qk_norms),
        ("llama2", _unit_norms),
    ],
    ids=lambda x: x if isinstance(x, str) else x.__name__.strip("_"),
)
def test_fixture_detects_missing_feature(checkpoints, family, ablate):
    # Guards the parity test itself: dropping the family's feature from the
    # MLX model must move the logits far past the tolerance.
    ckpt = checkpoints(family)
    model, _, _ = load_model(ckpt.mlx_dir, dtype="float32")

    ablate(model)
    diff = np.abs(mlx_logits(model, ckpt.tokens) - ckpt.torch_logits).max()

    assert diff > 100 * ATOL


@pytest.mark.parametrize("family", LEGACY_FAMILIES)
def test_transformers4_config_layout_gives_identical_logits(
    checkpoints, tmp_path, family
):
    ckpt = checkpoints(family)
    legacy = tmp_path / "hf4"
    shutil.copytree(ckpt.hf_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps(to_legacy_layout(config)))

    convert(legacy, tmp_path / "mlx")
    model, _, _ = load_model(tmp_path / "mlx", dtype="float32")
    reference, _, _ = load_model(ckpt.mlx_dir, dtype="float32")

    np.testing.assert_array_equal(
        mlx_logits(model, ckpt.tokens), mlx_logits(reference, ckpt.tokens)
    )
    # The rewritten file describes the same model to transformers too.
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(
        legacy, attn_implementation="eager"
    )
    np.testing.assert_array_equal(
        torch_logits(hf4.eval(), ckpt.tokens), ckpt.torch_logits
    )


@pytest.mark.parametrize("family", LEGACY_FAMILIES)
def test_converted_config_uses_transformers4_rope_keys(checkpoints, family):
    ckpt = checkpoints(family)
    source = json.loads((ckpt.hf_dir / "config.json").read_text())
    written = json.loads((ckpt.mlx_dir / "config.json").read_text())

    params = dict(source["rope_parameters"])
    assert "rope_parameters" not in written
    assert written["rope_theta"] == params.pop("rope_theta")
    if params["rope_type"] == "default":
        assert "rope_scaling" not in written
    else:
        assert written["rope_scaling"] == params
    assert written["torch_dtype"] == "float32"


def prefill_then_decode(model, tokens: np.ndarray, prompt: int, chunk: int):
    """Logits from feeding ``prompt`` tokens ``chunk`` at a time, then one by one."""
    cache = model.make_cache()
    bounds = list(range(0, prompt, chunk)) + list(range(prompt, tokens.shape[1]))
    ends = bounds[1:] + [tokens.shape[1]]
    steps = [
        model(mx.array(tokens[:, a:b]), cache)
        for a, b in zip(bounds, ends, strict=True)
    ]
    return np.array(mx.concatenate(steps, axis=1)), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decode_matches_full_forward(checkpoints, family):
    # 8 prompt tokens in chunks of 3, 3, 2, then 4 single steps: for mistral
    # (window 6) both the last chunk and every step see past the window.
    ckpt = checkpoints(family)
    model, _, _ = load_model(ckpt.mlx_dir, dtype="float32")

    logits, cache = prefill_then_decode(model, ckpt.tokens, prompt=8, chunk=3)

    assert [c.offset for c in cache] == [LENGTH] * len(model.layers)
    np.testing.assert_allclose(
        logits, mlx_logits(model, ckpt.tokens), rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(logits, ckpt.torch_logits, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------
# Refusals


def _tiny_config(**overrides) -> dict[str, Any]:
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "vocab_size": 128,
    }
    return {**config, **overrides}


UNSUPPORTED_ROPE = [
    pytest.param(
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
        "yarn",
        id="yarn-rope_parameters",
    ),
    pytest.param(
        {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn", id="yarn-4x"
    ),
    pytest.param(
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        "dynamic",
        id="dynamic-4x",
    ),
    pytest.param(
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2}},
        "dynamic",
        id="dynamic-rope_parameters",
    ),
]


@pytest.mark.parametrize("overrides, kind", UNSUPPORTED_ROPE)
def test_unsupported_rope_scaling_is_refused_by_name(overrides, kind):
    with pytest.raises(ValueError, match=f"rope scaling type '{kind}'"):
        ModelArgs.from_dict(_tiny_config(**overrides))


@pytest.mark.parametrize("overrides, kind", UNSUPPORTED_ROPE)
def test_convert_refuses_unsupported_rope_before_writing(
    checkpoints, tmp_path, overrides, kind
):
    src = tmp_path / "hf"
    shutil.copytree(checkpoints("llama2").hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters")
    (src / "config.json").write_text(json.dumps({**config, **overrides}))

    with pytest.raises(ValueError, match=kind):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


GPT2_CONFIG = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": 128,
}


def test_unsupported_model_type_lists_supported_ones():
    with pytest.raises(ValueError) as info:
        ModelArgs.from_dict(GPT2_CONFIG)

    message = str(info.value)
    assert "'gpt2'" in message
    assert all(name in message for name in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("entry", ["load_model", "convert"])
def test_unsupported_model_type_is_refused_before_reading_weights(tmp_path, entry):
    # No weight files at all: the refusal must come from config.json alone.
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(GPT2_CONFIG))

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        if entry == "load_model":
            load_model(src)
        else:
            convert(src, tmp_path / "out")
