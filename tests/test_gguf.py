"""Tests for mlxbastion.gguf: GGUF files to Hugging Face-style pieces.

Real inputs: stories260K (F32 llama, SentencePiece) against the same model as
written by transformers, and SmolLM2-135M-Instruct Q4_1 (byte-level BPE, chat
template) when it can be found. Small GGUFs written here with the ``gguf``
package cover the other tensor types, qwen2/qwen3 and the error paths.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from functools import cache
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import SHARED_DIR, STORIES_DIR, find_smollm2_gguf, require

from mlxbastion import gguf as gguf_module
from mlxbastion.gguf import (
    GGUFModel,
    gguf_generation_config,
    read_gguf,
    save_gguf_tokenizer,
)
from mlxbastion.model import llama3_rope_freqs

STORIES = STORIES_DIR
SMOLLM2_TOKENIZER = SHARED_DIR / "tokenizers" / "smollm2"
SUPPORTED_TYPES_TEXT = "F32, F16, BF16, Q8_0, Q4_0, Q4_1"

TEXTS = [
    "Once upon a time",
    " leading space",
    "multiple   spaces  and  more",
    "new\nlines\n\nand\ttabs\n",
    "Unicode: café naïve 日本語 😀🚀",
    "Ünïcödé ✓ — “quotes” and numbers 12345 + 678",
    "",
]


# --- synthetic GGUF files -------------------------------------------------

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128}


@cache
def _stories_tokenizer_metadata() -> dict:
    path = require(STORIES / "stories260K.gguf")  # the test vocabulary's source
    _, metadata = mx.load(str(path), return_metadata=True)
    return {
        "tokens": metadata["tokenizer.ggml.tokens"],
        "scores": metadata["tokenizer.ggml.scores"].tolist(),
        "token_type": metadata["tokenizer.ggml.token_type"].tolist(),
    }


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered the way llama.cpp's converter writes them."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    permuted = w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2)
    return permuted.reshape(w.shape)


def _tiny_tensors(arch: str, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under GGUF names, in Hugging Face row order."""
    rng = np.random.default_rng(seed)
    d, f, v = TINY["hidden"], TINY["ffn"], 512
    q_rows, kv_rows = TINY["heads"] * head_dim, TINY["kv_heads"] * head_dim
    shapes = {"token_embd.weight": (v, d), "output.weight": (v, d)}
    shapes["output_norm.weight"] = (d,)
    for i in range(TINY["layers"]):
        block = {
            "attn_norm.weight": (d,),
            "ffn_norm.weight": (d,),
            "attn_q.weight": (q_rows, d),
            "attn_k.weight": (kv_rows, d),
            "attn_v.weight": (kv_rows, d),
            "attn_output.weight": (d, q_rows),
            "ffn_gate.weight": (f, d),
            "ffn_up.weight": (f, d),
            "ffn_down.weight": (d, f),
        }
        if arch == "qwen2":
            block |= {"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,)}
            block |= {"attn_v.bias": (kv_rows,)}
        if arch == "qwen3":
            block |= {
                "attn_q_norm.weight": (head_dim,),
                "attn_k_norm.weight": (head_dim,),
            }
        shapes |= {f"blk.{i}.{k}": s for k, s in block.items()}

    tensors = {}
    for name, shape in shapes.items():
        scale = 1.0 if len(shape) == 1 else 0.05
        tensors[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1 and "norm" in name:
            tensors[name] += 1.0
    return tensors


def _add_tensor(writer: gguf.GGUFWriter, name: str, x: np.ndarray, qtype: Q) -> None:
    if x.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, x)
    elif qtype == Q.F16:
        writer.add_tensor(name, x.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    qtype: Q = Q.F32,
    types: dict[str, Q] | None = None,
    head_dim: int = 16,
    tied: bool = False,
    tokenizer: bool = True,
    fields: dict | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF model; return its float tensors in HF row order.

    Matrices get ``qtype`` unless ``types`` names their GGUF module; norms stay
    F32. For llama, q/k rows are permuted as llama.cpp does before writing.
    """
    tensors = _tiny_tensors(arch, head_dim)
    if tied:
        del tensors["output.weight"]
    tensors |= extra or {}

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", TINY["layers"])
    writer.add_uint32(f"{arch}.embedding_length", TINY["hidden"])
    writer.add_uint32(f"{arch}.feed_forward_length", TINY["ffn"])
    writer.add_uint32(f"{arch}.attention.head_count", TINY["heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", TINY["kv_heads"])
    writer.add_uint32(f"{arch}.context_length", 256)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    if head_dim != TINY["hidden"] // TINY["heads"]:
        writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    if tokenizer:
        meta = _stories_tokenizer_metadata()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(meta["tokens"])
        writer.add_token_scores(meta["scores"])
        writer.add_token_types(meta["token_type"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_uint32("tokenizer.ggml.padding_token_id", 0xFFFFFFFF)
    for key, value in (fields or {}).items():
        _add_field(writer, key, value)

    for name, x in tensors.items():
        module = name.rsplit(".", 1)[0]
        if arch == "llama" and module.endswith((".attn_q", ".attn_k")):
            heads = TINY["heads"] if module.endswith("q") else TINY["kv_heads"]
            x = _llama_cpp_permute(x, heads)
        kind = module.split(".")[-1]
        _add_tensor(writer, name, x, (types or {}).get(kind, qtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def _add_field(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """The test's own spelling of the GGUF -> HF name map."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


def dequantized(model: GGUFModel, module: str) -> np.ndarray:
    params = model.config["quantization"].get(module, model.config["quantization"])
    w = model.weights
    x = mx.dequantize(
        w[f"{module}.weight"],
        w[f"{module}.scales"],
        w[f"{module}.biases"],
        group_size=params["group_size"],
        bits=params["bits"],
    )
    return np.array(x.astype(mx.float32))


def export_model(model: GGUFModel, dst: Path) -> Path:
    """The folder layout mlx-lm loads, written the way the caller would."""
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), model.weights)
    (dst / "config.json").write_text(json.dumps(model.config))
    generation = gguf_generation_config(model)
    (dst / "generation_config.json").write_text(json.dumps(generation))
    save_gguf_tokenizer(model, dst)
    return dst


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)
    out = []
    for _ in range(n):
        token = logits[0, -1].argmax().item()
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


# --- stories260K: F32 llama with SentencePiece ----------------------------


@pytest.fixture(scope="module")
def stories() -> GGUFModel:
    return read_gguf(require(STORIES / "stories260K.gguf"))


@pytest.fixture(scope="module")
def stories_tokenizer_dir(stories, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("stories_tok")
    save_gguf_tokenizer(stories, dst)
    return dst


def test_stories_weights_equal_hf_exactly(stories):
    hf = mx.load(str(STORIES / "hf" / "model.safetensors"))
    assert set(stories.weights) == set(hf)
    for name, expected in hf.items():
        assert stories.weights[name].dtype == expected.dtype, name
        assert mx.array_equal(stories.weights[name], expected).item(), name

    # The un-permute is what makes q/k match: the file's own rows differ.
    raw = mx.load(str(STORIES / "stories260K.gguf"))
    q_hf = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not mx.array_equal(raw["blk.0.attn_q.weight"], q_hf).item()


def test_stories_config_agrees_with_hf(stories):
    hf = json.loads((STORIES / "hf" / "config.json").read_text())
    config = stories.config
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "head_dim",
        "bos_token_id",
        "eos_token_id",
        "architectures",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
    ):
        assert config[key] == hf[key], key
    assert config["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 10000
    assert config["torch_dtype"] == "float32"
    assert "quantization" not in config and "rope_scaling" not in config


def test_stories_generation_config(stories):
    hf = json.loads((STORIES / "hf" / "generation_config.json").read_text())
    expected = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    assert gguf_generation_config(stories) == expected


def test_stories_tokenizer_files(stories_tokenizer_dir):
    config = json.loads((stories_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    assert config["unk_token"] == "<unk>"
    # uint32 -1 in the file means "no padding token".
    assert config["pad_token"] is None
    assert "chat_template" not in config
    special = json.loads(
        (stories_tokenizer_dir / "special_tokens_map.json").read_text()
    )
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.fixture(scope="module")
def stories_tokenizers(stories_tokenizer_dir) -> tuple:
    """The saved folder loaded by transformers and by mlx-lm."""
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(stories_tokenizer_dir)
    return ours, load_mlx_tokenizer(stories_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_stories_tokenizer_matches_hf(stories_tokenizers, text):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(STORIES / "hf" / "tokenizer.json"))
    ours, mlx_tokenizer = stories_tokenizers

    expected = reference.encode(text).ids
    assert expected[0] == 1  # BOS, as llama.cpp adds for SentencePiece files
    assert ours(text).input_ids == expected
    assert mlx_tokenizer.encode(text) == expected
    assert ours.decode(expected, skip_special_tokens=True) == reference.decode(
        expected, skip_special_tokens=True
    )


def test_stories_known_encoding(stories_tokenizers):
    ours, mlx_tokenizer = stories_tokenizers
    assert ours("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    assert mlx_tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]


def test_stories_greedy_matches_reference(stories, tmp_path):
    from mlx_lm.utils import load

    reference = json.loads((STORIES / "reference.json").read_text())["greedy_30"]
    model, tokenizer = load(export_model(stories, tmp_path / "stories"))
    prompt = tokenizer.encode("Once upon a time")
    assert prompt == reference["prompt_ids"]
    assert greedy(model, prompt, 30) == reference["new_ids"]


# --- SmolLM2-135M-Instruct: Q4_1 llama with byte-level BPE ----------------


@pytest.fixture(scope="module")
def smollm2() -> GGUFModel:
    return read_gguf(find_smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("smollm2_tok")
    save_gguf_tokenizer(smollm2, dst)
    return dst


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_tokenizer_dir) -> tuple:
    """The saved folder loaded by transformers and by mlx-lm."""
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    return ours, load_mlx_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    require(SMOLLM2_TOKENIZER)
    text = gzip.decompress((SMOLLM2_TOKENIZER / "tokenizer.json.gz").read_bytes())
    config = json.loads((SMOLLM2_TOKENIZER / "tokenizer_config.json").read_text())
    special = {k: v for k, v in config.items() if k.endswith("_token")}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text.decode()),
        chat_template=(SMOLLM2_TOKENIZER / "chat_template.jinja").read_text(),
        **special,
    )


def test_smollm2_config(smollm2):
    config = smollm2.config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["intermediate_size"] == 1536
    assert config["vocab_size"] == 49152
    assert config["rope_theta"] == 100000
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in smollm2.weights


def test_smollm2_quantization_inferred_from_shapes(smollm2):
    # token_embd is Q8_0 in this file and every other matrix Q4_1.
    expected = {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert smollm2.config["quantization"] == expected
    assert smollm2.config["quantization_config"] == expected

    w = smollm2.weights
    assert w["model.embed_tokens.weight"].shape == (49152, 576 * 8 // 32)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576 * 4 // 32)
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert w["model.layers.0.self_attn.q_proj.scales"].shape == (576, 576 // 32)
    assert w["model.layers.0.self_attn.q_proj.biases"].dtype == mx.float16
    assert w["model.norm.weight"].dtype == mx.float32


@pytest.mark.parametrize("text", TEXTS + ["<|im_start|>user\nhi<|im_end|>"])
def test_smollm2_tokenizer_matches_reference(
    smollm2_tokenizers, smollm2_reference_tokenizer, text
):
    ours, mlx_tokenizer = smollm2_tokenizers
    expected = smollm2_reference_tokenizer(text).input_ids
    assert ours(text).input_ids == expected
    assert mlx_tokenizer.encode(text) == expected
    assert ours.decode(expected) == smollm2_reference_tokenizer.decode(expected)


def test_smollm2_tokenizer_special_tokens_and_no_bos(
    smollm2_tokenizer_dir, smollm2_tokenizers
):
    ours, mlx_tokenizer = smollm2_tokenizers
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.unk_token == "<|endoftext|>" and ours.pad_token == "<|im_end|>"
    assert ours.eos_token_id == 2
    # The file says add_bos_token=False: plain text gets no <|im_start|>.
    assert ours("Hello").input_ids[0] != ours.bos_token_id
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert mlx_tokenizer.eos_token_ids == {2}


def test_smollm2_chat_template_renders_like_reference(
    smollm2_tokenizers, smollm2_reference_tokenizer
):
    ours, mlx_tokenizer = smollm2_tokenizers
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Thanks! 😀"},
    ]
    for msgs in (messages, [{"role": "system", "content": "Be brief."}] + messages):
        kwargs = {"add_generation_prompt": True, "tokenize": False}
        expected = smollm2_reference_tokenizer.apply_chat_template(msgs, **kwargs)
        assert ours.apply_chat_template(msgs, **kwargs) == expected
        assert mlx_tokenizer.apply_chat_template(msgs, **kwargs) == expected
        assert (
            ours(expected).input_ids == smollm2_reference_tokenizer(expected).input_ids
        )


def test_smollm2_generation_config(smollm2):
    assert gguf_generation_config(smollm2) == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.slow
def test_smollm2_answers_through_mlx_lm(smollm2, tmp_path):
    # End to end: without the q/k un-permute this model stops at once.
    from mlx_lm.utils import load

    model, tokenizer = load(export_model(smollm2, tmp_path / "smollm2"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = greedy(model, prompt, 8)
    assert "Paris" in tokenizer.decode(tokens)


# --- synthetic files: tensor types, architectures, quantization -----------


@pytest.mark.parametrize(
    ("qtype", "bits", "tolerance"),
    # Q4_0 spans -8..7 steps of absmax/8, so the value opposite the absmax
    # clips to 7/8 of it; Q4_1 steps are (max - min) / 15.
    [(Q.Q8_0, 8, 0.01), (Q.Q4_0, 4, 0.13), (Q.Q4_1, 4, 0.07)],
)
def test_quantized_types_stay_quantized(tmp_path, qtype, bits, tolerance):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype)
    model = read_gguf(tmp_path / "tiny.gguf")

    assert model.config["quantization"] == {"group_size": 32, "bits": bits}
    assert model.config["quantization_config"] == model.config["quantization"]
    for name, x in original.items():
        module = hf_name(name).removesuffix(".weight")
        if x.ndim == 1:
            assert mx.array_equal(model.weights[hf_name(name)], mx.array(x)).item()
            continue
        assert model.weights[f"{module}.weight"].dtype == mx.uint32
        assert model.weights[f"{module}.weight"].shape == (
            x.shape[0],
            x.shape[1] * bits // 32,
        )
        # Same quantization, done by llama.cpp's reference code: equal up to
        # the float16 rounding of MLX's dequantize.
        reference = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        got = dequantized(model, module)
        np.testing.assert_allclose(got, reference, atol=2e-3 * np.abs(x).max(), rtol=0)
        # And within quantization error of the float weights (q/k included,
        # which only holds once their rows are back in HF order).
        row_max = np.abs(x).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - x) <= tolerance * row_max), module


@pytest.mark.parametrize(
    ("qtype", "dtype", "name"),
    [(Q.F32, mx.float32, "float32"), (Q.F16, mx.float16, "float16")],
)
def test_float_types_exact(tmp_path, qtype, dtype, name):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype)
    model = read_gguf(tmp_path / "tiny.gguf")

    assert "quantization" not in model.config
    assert model.config["torch_dtype"] == name
    assert set(model.weights) == {hf_name(n) for n in original}
    for gguf_name, x in original.items():
        got = model.weights[hf_name(gguf_name)]
        expected = mx.array(x) if x.ndim == 1 else mx.array(x).astype(dtype)
        assert mx.array_equal(got, expected).item(), gguf_name


def test_bf16_exact_beyond_float16_range(tmp_path):
    # mx.load alone narrows BF16 to float16, which turns 1e5 into inf.
    big = np.full((32, 64), 1e5, dtype=np.float32)
    extra = {"blk.0.ffn_up.weight": np.zeros((TINY["ffn"], 64), np.float32)}
    extra["blk.0.ffn_up.weight"][:32] = big
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.BF16, extra=extra)
    model = read_gguf(tmp_path / "tiny.gguf")

    assert model.config["torch_dtype"] == "bfloat16"
    for gguf_name, x in original.items():
        got = model.weights[hf_name(gguf_name)]
        expected = mx.array(x) if x.ndim == 1 else mx.array(x).astype(mx.bfloat16)
        assert mx.array_equal(got, expected).item(), gguf_name
    up = model.weights["model.layers.0.mlp.up_proj.weight"]
    assert mx.isfinite(up.astype(mx.float32)).all().item()


def test_llama_q_k_rows_restored_to_hf_order(tmp_path):
    original = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = read_gguf(tmp_path / "tiny.gguf")
    raw = mx.load(str(tmp_path / "tiny.gguf"))
    for kind in ("attn_q", "attn_k"):
        name = f"blk.1.{kind}.weight"
        assert mx.array_equal(
            model.weights[hf_name(name)], mx.array(original[name])
        ).item()
        assert not mx.array_equal(raw[name], mx.array(original[name])).item()


def test_mixed_types_config_and_mlx_lm_logits(tmp_path):
    types = {"token_embd": Q.Q8_0, "output": Q.F16}
    write_tiny_gguf(tmp_path / "mixed.gguf", qtype=Q.Q4_0, types=types)
    mixed = read_gguf(tmp_path / "mixed.gguf")

    assert mixed.config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "lm_head": False,
    }
    assert mixed.config["torch_dtype"] == "float16"  # the F16 output matrix
    assert mixed.weights["lm_head.weight"].dtype == mx.float16

    # mlx-lm must apply each layer's own bits: the quantized model gives the
    # logits of a float model holding the dequantized weights.
    from mlx_lm.utils import load

    dequantized_weights = {
        k: w for k, w in mixed.weights.items() if not k.endswith((".scales", ".biases"))
    }
    for key in list(dequantized_weights):
        module = key.removesuffix(".weight")
        if f"{module}.scales" in mixed.weights:
            dequantized_weights[key] = mx.array(dequantized(mixed, module))
    float_config = {
        k: v for k, v in mixed.config.items() if not k.startswith("quantization")
    }
    as_float = GGUFModel(float_config, dequantized_weights, mixed.metadata)

    quantized_model, _ = load(export_model(mixed, tmp_path / "mixed"))
    float_model, _ = load(export_model(as_float, tmp_path / "float"))
    tokens = mx.array([[1, 403, 407, 261, 378, 432]])
    q_logits = quantized_model(tokens).astype(mx.float32)
    f_logits = float_model(tokens).astype(mx.float32)
    assert mx.allclose(q_logits, f_logits, atol=1e-2, rtol=1e-2).item()


def test_tied_embeddings(tmp_path):
    write_tiny_gguf(tmp_path / "tied.gguf", tied=True, qtype=Q.Q8_0)
    model = read_gguf(tmp_path / "tied.gguf")
    assert model.config["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head") for k in model.weights)
    assert "lm_head" not in model.config["quantization"]


def test_qwen2_biases_and_no_permute(tmp_path):
    original = write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
    model = read_gguf(tmp_path / "qwen2.gguf")

    assert model.config["model_type"] == "qwen2"
    assert model.config["architectures"] == ["Qwen2ForCausalLM"]
    assert model.config["attention_bias"] is True
    assert model.config["rope_theta"] == 500000
    assert model.config["rms_norm_eps"] == 1e-6
    assert set(model.weights) == {hf_name(n) for n in original}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.1.attn_k.bias"):
        assert mx.array_equal(
            model.weights[hf_name(name)], mx.array(original[name])
        ).item()


def test_qwen3_norms_and_head_dim(tmp_path):
    original = write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3", head_dim=32)
    model = read_gguf(tmp_path / "qwen3.gguf")

    assert model.config["model_type"] == "qwen3"
    assert model.config["head_dim"] == 32  # key_length, not hidden / heads
    assert model.config["attention_bias"] is False
    q_norm = model.weights["model.layers.1.self_attn.q_norm.weight"]
    assert mx.array_equal(q_norm, mx.array(original["blk.1.attn_q_norm.weight"])).item()
    q = model.weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (TINY["heads"] * 32, TINY["hidden"])
    assert mx.array_equal(q, mx.array(original["blk.0.attn_q.weight"])).item()


def test_qwen3_loads_in_mlx_lm(tmp_path):
    from mlx_lm.utils import load

    write_tiny_gguf(tmp_path / "qwen3.gguf", arch="qwen3", head_dim=32, qtype=Q.Q8_0)
    model, _ = load(export_model(read_gguf(tmp_path / "qwen3.gguf"), tmp_path / "q3"))
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512)


def test_rope_scaling_linear(tmp_path):
    fields = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny_gguf(tmp_path / "tiny.gguf", fields=fields)
    config = read_gguf(tmp_path / "tiny.gguf").config
    assert config["rope_scaling"] == {"type": "linear", "factor": 4.0}


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_add_bos_token_follows_file(tmp_path, add_bos):
    from transformers import AutoTokenizer

    fields = {} if add_bos is None else {"tokenizer.ggml.add_bos_token": add_bos}
    write_tiny_gguf(tmp_path / "tiny.gguf", fields=fields)
    save_gguf_tokenizer(read_gguf(tmp_path / "tiny.gguf"), tmp_path / "tok")
    ids = AutoTokenizer.from_pretrained(tmp_path / "tok")("Once upon a time").input_ids
    # Unset means llama.cpp's default for a SentencePiece vocabulary: add it.
    assert ids == ([1] if add_bos in (None, True) else []) + [403, 407, 261, 378]


def test_generation_config_adds_end_of_turn(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", fields={"tokenizer.ggml.eot_token_id": 3})
    generation = gguf_generation_config(read_gguf(tmp_path / "tiny.gguf"))
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 3]}


# --- errors ---------------------------------------------------------------


def _one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unsupported_architecture_refused_before_tensors(tmp_path, monkeypatch):
    path = tmp_path / "gemma.gguf"
    write_tiny_gguf(path, arch="gemma2")

    def no_load(*args, **kwargs):
        raise AssertionError("tensors were loaded")

    monkeypatch.setattr(gguf_module.mx, "load", no_load)
    with pytest.raises(ValueError) as excinfo:
        read_gguf(path)
    _one_line_error(excinfo, str(path), "'gemma2'", "llama, qwen2, qwen3")


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K])
def test_unsupported_tensor_type(tmp_path, qtype):
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    # Q4_K/Q6_K cannot be quantized by the gguf package; bytes are enough here.
    raw = rng.integers(0, 255, size=(256, 256 // block * type_size), dtype=np.uint8)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(ValueError) as excinfo:
        read_gguf(path)
    _one_line_error(excinfo, "'blk.0.ffn_up.weight'", qtype.name, SUPPORTED_TYPES_TEXT)


@pytest.mark.parametrize(
    "content",
    [b"", b"GG", b"hello, this is not a model\n", b"PK\x03\x04" + bytes(100)],
)
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        read_gguf(path)
    _one_line_error(excinfo, str(path), "not a GGUF file")


@pytest.mark.parametrize("keep", [20, 3000, -100])
def test_truncated_file(tmp_path, keep):
    write_tiny_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError) as excinfo:
        read_gguf(path)
    _one_line_error(excinfo, str(path), "again")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")


def _llama_cpp_rope_factors(head_dim, theta, factor, low, high, context):
    """The rope_freqs tensor as llama.cpp's converter computes it."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("factor, context", [(8.0, 8192), (32.0, 8192), (8.0, 2048)])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor, context):
    rope = _llama_cpp_rope_factors(16, 500000.0, factor, 1.0, 4.0, context)
    assert any(1.0 < r < factor for r in rope)  # some fall inside the band
    write_tiny_gguf(tmp_path / "tiny.gguf", extra={"rope_freqs.weight": rope})
    model = read_gguf(tmp_path / "tiny.gguf")
    scaling = model.config["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    assert scaling["factor"] == factor
    # Different band settings can give identical frequencies; what matters
    # is that the recovered ones give the frequencies of the original.
    original = {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": context,
    }
    recovered = llama3_rope_freqs(16, 500000.0, scaling)
    assert mx.allclose(
        recovered, llama3_rope_freqs(16, 500000.0, original), rtol=1e-6
    ).item()
    assert not any("rope_freqs" in name for name in model.weights)


def test_unmatched_rope_freqs_refused(tmp_path):
    rope = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    write_tiny_gguf(tmp_path / "tiny.gguf", extra={"rope_freqs.weight": rope})
    with pytest.raises(ValueError) as excinfo:
        read_gguf(tmp_path / "tiny.gguf")
    _one_line_error(excinfo, "rope_freqs")


def test_unknown_tensor_refused(tmp_path):
    extra = {"blk.0.attn_sinks.weight": np.ones(8, dtype=np.float32)}
    write_tiny_gguf(tmp_path / "tiny.gguf", extra=extra)
    with pytest.raises(ValueError) as excinfo:
        read_gguf(tmp_path / "tiny.gguf")
    _one_line_error(excinfo, "attn_sinks")


def test_unsupported_rope_scaling_refused(tmp_path):
    fields = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    write_tiny_gguf(tmp_path / "tiny.gguf", fields=fields)
    with pytest.raises(ValueError) as excinfo:
        read_gguf(tmp_path / "tiny.gguf")
    _one_line_error(excinfo, "'yarn'", "linear")


def test_tokenizer_missing_from_file(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer=False)
    model = read_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        save_gguf_tokenizer(model, tmp_path / "tok")


def test_missing_transformers_converter_names_version(tmp_path, monkeypatch, stories):
    monkeypatch.setitem(
        sys.modules, "transformers.integrations.gguf.gguf_tokenizer_mapping", None
    )
    with pytest.raises(ImportError, match=r"transformers>=5\.25"):
        save_gguf_tokenizer(stories, tmp_path / "tok")


# --- convert: chat template and dtype -------------------------------------


def test_broken_chat_template_is_dropped_with_a_warning(tmp_path, caplog):
    from mlxbastion.convert import convert
    from mlxbastion.tokenizer import load_tokenizer

    path = tmp_path / "tiny.gguf"
    broken = "{% for m in messages %}{{ m['content'] }"
    write_tiny_gguf(path, fields={"tokenizer.chat_template": broken})

    with caplog.at_level("WARNING", logger="mlxbastion"):
        out = convert(path, tmp_path / "out")

    assert (
        f"the chat template of {path} has a syntax error (unexpected '}}' "
        "(line 1)) and was left out; prompts are sent without it"
    ) in caplog.text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    # Plain generation still works: the prompt is encoded without a template.
    assert load_tokenizer(out).encode_prompt("Once upon a time") == [
        1,
        403,
        407,
        261,
        378,
    ]


def test_bfloat16_keeps_quantization_scales_in_float16(tmp_path, caplog):
    from mlxbastion.convert import convert

    write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.Q4_1)
    with caplog.at_level("INFO", logger="mlxbastion"):
        out = convert(tmp_path / "tiny.gguf", tmp_path / "out", dtype="bfloat16")

    weights = mx.load(str(out / "model.safetensors"))
    dtypes = {
        name.rsplit(".", 1)[-1]: w.dtype
        for name, w in weights.items()
        if not name.endswith("weight") or w.ndim == 1
    }
    assert dtypes == {
        "scales": mx.float16,
        "biases": mx.float16,
        "weight": mx.bfloat16,  # the norms
    }
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "quantization scales and biases in float16 rather than bfloat16" in (
        caplog.text
    )


@pytest.mark.slow
def test_smollm2_bfloat16_still_answers(tmp_path):
    from mlxbastion.checkpoint import load
    from mlxbastion.convert import convert
    from mlxbastion.generate import generate

    out = convert(find_smollm2_gguf(), tmp_path / "bf16", dtype="bfloat16")
    model, tokenizer = load(out)
    prompt = tokenizer.encode_prompt("What is the capital of France?")
    text = generate(model, tokenizer, prompt, max_tokens=12)
    assert text.strip() == "The capital of France is Paris."
