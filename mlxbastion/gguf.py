"""Import GGUF files (llama.cpp's format) as Hugging Face-style model pieces.

This module owns the GGUF side of conversion. It reads a ``.gguf`` header with
its own small parser (to learn tensor types and refuse what it cannot import
before any tensor is loaded), loads the tensors with ``mx.load``, renames them
to the Hugging Face Llama/Qwen keys, puts llama.cpp's RoPE row order back to
Hugging Face order, derives a ``config.json`` dict (with mlx-lm's
``quantization`` block for Q8_0/Q4_0/Q4_1 tensors) and rebuilds the tokenizer
from the file's metadata. Writing weights and config to disk is the caller's
job; :func:`save_gguf_tokenizer` writes the tokenizer files.

GGUF layout reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import copy
import json
import logging
import math
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .model import llama3_rope_freqs

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# ggml_type id -> (name, elements per block, bytes per block), for the types
# we import. mx.load turns Q8_0/Q4_0/Q4_1 into MLX affine triples exactly.
_IMPORTABLE_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}
# Names of the other ggml types, only to word the refusal. mx.load fails on
# most of them and dequantizes Q2_K/Q4_K/Q6_K to float16 (4x the size).
_OTHER_TYPE_NAMES = {
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

# GGUF metadata value types (gguf.md, "gguf_metadata_value_type").
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}

_U64 = struct.Struct("<Q")

# llama.cpp writes uint32 -1 for "no such token" (e.g. no padding token).
_NO_TOKEN = 0xFFFFFFFF

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's convert_hf_to_gguf interleaves the q/k rows of each head only for
# LlamaModel (rope type NORM); qwen2/qwen3 use NEOX RoPE and keep HF order.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_TOP_LEVEL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_MODULES = {
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
_REQUIRED_BLOCK_MODULES = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)")

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


@dataclass
class GGUFModel:
    """A GGUF file translated to Hugging Face-style pieces.

    Attributes:
        config: A Hugging Face ``config.json`` dict, with mlx-lm's
            ``quantization`` and ``quantization_config`` blocks when any tensor
            is quantized.
        weights: Tensors under Hugging Face names. A quantized linear or
            embedding keeps MLX's affine layout: ``<name>.weight`` (uint32),
            ``<name>.scales`` and ``<name>.biases``.
        metadata: The raw GGUF metadata as ``mx.load`` returns it.
    """

    config: dict
    weights: dict[str, mx.array]
    metadata: dict


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost dimension first
    type_id: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class _Header:
    fields: dict[str, Any]  # scalar and string metadata; arrays are skipped
    tensors: list[_TensorInfo]
    data_start: int


class _Truncated(Exception):
    """The header claims more bytes than the file holds."""


class _Cursor:
    """Reads little-endian GGUF header values from a buffer, with bound checks."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        start = self.pos
        self.skip(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.pos
        self.skip(n)
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # A tight loop: vocabularies hold ~100k strings and this is most of
        # the header's parse time.
        buf, pos, end = self.buf, self.pos, len(self.buf)
        read_length = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            pos += 8 + read_length(buf, pos)[0]
        if pos > end:
            raise _Truncated
        self.pos = pos

    def value(self, vtype: int) -> Any:
        """One metadata value, or None for an array (skipped unread)."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            self.skip_array()
            return None
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {vtype}")
        value = self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _FLOAT32:
            # The shortest decimal that round-trips in float32: 1e-05, not
            # 9.999999747378752e-06, so config.json reads like the original.
            value = float(str(np.float32(value)))
        return value

    def skip_array(self) -> None:
        vtype, count = self.unpack("<I"), self.unpack("<Q")
        if vtype == _STRING:
            self.skip_strings(count)
        elif vtype == _ARRAY:
            for _ in range(count):
                self.skip_array()
        elif vtype in _SCALAR_FORMATS:
            self.skip(count * struct.calcsize(_SCALAR_FORMATS[vtype]))
        else:
            raise ValueError(f"unknown metadata array type {vtype}")


def _parse_header(cursor: _Cursor) -> _Header:
    cursor.skip(4)  # magic, checked by the caller
    version = cursor.unpack("<I")
    if version not in (2, 3):
        # A big-endian file reads as version 0x02000000 or 0x03000000 here.
        raise ValueError(f"GGUF version {version} (mlxbastion reads versions 2-3)")
    n_tensors, n_fields = cursor.unpack("<Q"), cursor.unpack("<Q")

    fields = {}
    for _ in range(n_fields):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"))
        if value is not None:
            fields[key] = value

    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        tensors.append(_TensorInfo(name, tuple(reversed(dims)), type_id, offset))

    alignment = int(fields.get("general.alignment", 32)) or 32
    data_start = -(-cursor.pos // alignment) * alignment
    return _Header(fields, tensors, data_start)


def _read_header(path: Path) -> _Header:
    """Parse a GGUF header (metadata scalars and tensor infos) without tensors."""
    not_gguf = (
        f"{path} is not a GGUF file (it does not start with b'GGUF'); "
        "pass a .gguf file written by llama.cpp"
    )
    if path.stat().st_size < 4:
        raise ValueError(not_gguf)
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf,
    ):
        if buf[:4] != b"GGUF":
            raise ValueError(not_gguf)
        try:
            return _parse_header(_Cursor(buf))
        except _Truncated:
            raise ValueError(
                f"{path} ends inside its GGUF header (truncated or corrupt file); "
                "download or copy it again"
            ) from None
        except ValueError as err:
            raise ValueError(
                f"{path}: cannot read the GGUF header ({err}); the file is corrupt "
                "or from a GGUF revision mlxbastion does not know"
            ) from None


def _type_name(type_id: int) -> str:
    if type_id in _IMPORTABLE_TYPES:
        return _IMPORTABLE_TYPES[type_id][0]
    return _OTHER_TYPE_NAMES.get(type_id, f"ggml type {type_id}")


def _hf_module(gguf_module: str) -> str | None:
    """The Hugging Face module path for a GGUF tensor's module, if there is one."""
    if gguf_module in _TOP_LEVEL_MODULES:
        return _TOP_LEVEL_MODULES[gguf_module]
    match = _BLOCK_RE.fullmatch(gguf_module)
    if match and match.group(2) in _BLOCK_MODULES:
        return f"model.layers.{match.group(1)}.{_BLOCK_MODULES[match.group(2)]}"
    return None


def _check_architecture(path: Path, fields: dict[str, Any]) -> str:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; mlxbastion "
            f"imports {', '.join(SUPPORTED_ARCHITECTURES)} (Mistral files say "
            "llama); convert this model from its Hugging Face checkpoint instead"
        )
    if fields.get(f"{arch}.expert_count", 0) > 0:
        raise ValueError(
            f"{path}: mixture-of-experts GGUF files are not supported; convert "
            "this model from its Hugging Face checkpoint instead"
        )
    return arch


def _check_tensors(path: Path, header: _Header) -> None:
    """Refuse unknown tensor names and types, and tensor data past the file end."""
    data_end = header.data_start
    for info in header.tensors:
        module = info.name.rsplit(".", 1)[0]
        if module != "rope_freqs" and _hf_module(module) is None:
            raise ValueError(
                f"{path}: tensor {info.name!r} has no Hugging Face equivalent in "
                "mlxbastion's llama/qwen2/qwen3 mapping; this GGUF holds a model "
                "variant that cannot be imported"
            )
        if info.type_id not in _IMPORTABLE_TYPES:
            raise ValueError(
                f"{path}: tensor {info.name!r} has type {_type_name(info.type_id)}, "
                f"which cannot be imported; supported types: "
                f"{', '.join(SUPPORTED_TENSOR_TYPES)}; use a Q8_0, Q4_0, Q4_1 or "
                "float GGUF of this model, or convert its Hugging Face checkpoint"
            )
        _, block, block_bytes = _IMPORTABLE_TYPES[info.type_id]
        n_bytes = math.prod(info.shape) // block * block_bytes
        data_end = max(data_end, header.data_start + info.offset + n_bytes)

    size = path.stat().st_size
    if data_end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {data_end} bytes but the file "
            f"has {size}; download or copy it again"
        )


def _load_tensors(path: Path, header: _Header) -> tuple[dict[str, mx.array], dict]:
    try:
        tensors, metadata = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as err:
        message = str(err).replace("\n", " ")
        raise ValueError(
            f"{path}: mx.load cannot read this GGUF file ({message})"
        ) from err

    # mx.load narrows BF16 to float16, which overflows past 65504 and flushes
    # tiny values; read the raw bits instead so BF16 stays exact.
    for info in header.tensors:
        if _IMPORTABLE_TYPES[info.type_id][0] == "BF16":
            raw = np.fromfile(
                path,
                dtype="<u2",
                count=math.prod(info.shape),
                offset=header.data_start + info.offset,
            )
            tensors[info.name] = mx.array(raw.reshape(info.shape)).view(mx.bfloat16)
    return tensors, metadata


def _field(path: Path, fields: dict[str, Any], key: str, default: Any = None) -> Any:
    value = fields.get(key, default)
    if value is None:
        raise ValueError(
            f"{path}: GGUF metadata lacks {key!r}, which the config needs; "
            "the file is incomplete or was not written by llama.cpp"
        )
    return value


def _rope_scaling(path: Path, arch: str, fields: dict[str, Any]) -> dict | None:
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor")
    if kind is None and f"{arch}.rope.scale_linear" in fields:
        # Older llama.cpp files store linear scaling under this key alone.
        kind, factor = "linear", fields[f"{arch}.rope.scale_linear"]
    if kind in (None, "none"):
        return None
    if kind == "linear" and factor:
        return {"type": "linear", "factor": factor}
    raise ValueError(
        f"{path}: RoPE scaling {kind!r} is not supported (only 'linear'); "
        "convert this model from its Hugging Face checkpoint instead"
    )


# Llama 3.1/3.2 values first; the others cover variants seen in the wild.
_LLAMA3_CANDIDATES = [
    (context, low, high)
    for context in (8192, 4096, 2048, 16384, 32768)
    for low in (1.0, 2.0, 0.5)
    for high in (4.0, 8.0, 2.0)
]


def _llama3_scaling(path: Path, factors: mx.array, config: dict) -> dict:
    """Recover Llama 3.1's ``rope_scaling`` from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors instead of the parameters that
    made them, but mlx-lm and MLX Swift need the parameters. The largest
    divisor is ``factor``; the band edges come from trying the known
    settings, and the one whose divisors match the tensor is taken.
    """
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
    )
    theta = config["rope_theta"]
    factors = factors.astype(mx.float32)
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    for context, low, high in _LLAMA3_CANDIDATES:
        scaling = {
            "rope_type": "llama3",
            "factor": factors.max().item(),
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": context,
        }
        periods = llama3_rope_freqs(head_dim, theta, scaling)
        if (
            factors.shape == periods.shape
            and mx.allclose(periods * inv_freq, factors, rtol=1e-3).item()
        ):
            return scaling
    raise ValueError(
        f"{path}: its RoPE frequency factors (tensor 'rope_freqs.weight') match "
        "no Llama 3 scaling setting; convert this model from its Hugging Face "
        "checkpoint instead"
    )


def _token_id(fields: dict[str, Any], key: str, n_tokens: int) -> int | None:
    """A special token id, or None when absent, uint32 -1 or out of range."""
    token_id = fields.get(key)
    if token_id is None or token_id == _NO_TOKEN or not 0 <= token_id < n_tokens:
        return None
    return int(token_id)


def _attention_config(path: Path, arch: str, header: _Header) -> dict[str, int]:
    """Head counts and head_dim, checked against the q/k projection shapes."""
    fields = header.fields
    hidden_size = _field(path, fields, f"{arch}.embedding_length")
    n_heads = _field(path, fields, f"{arch}.attention.head_count")
    n_kv_heads = fields.get(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = fields.get(f"{arch}.attention.key_length", hidden_size // n_heads)
    rope_dims = fields.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: RoPE covers {rope_dims} of {head_dim} head dimensions "
            "(partial rotary), which llama/qwen configs cannot express"
        )

    shapes = {info.name: info.shape for info in header.tensors}
    for name, rows in (("attn_q", n_heads), ("attn_k", n_kv_heads)):
        shape = shapes.get(f"blk.0.{name}.weight")
        if shape is not None and shape[0] != rows * head_dim:
            raise ValueError(
                f"{path}: blk.0.{name}.weight has {shape[0]} rows but the metadata "
                f"gives {rows} heads x head_dim {head_dim}; the file is inconsistent"
            )
    return {
        "hidden_size": hidden_size,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
    }


def _build_config(path: Path, arch: str, header: _Header, metadata: dict) -> dict:
    fields = header.fields
    shapes = {info.name: info.shape for info in header.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path}: the GGUF has no token_embd.weight; it is incomplete")
    embed_rows = shapes["token_embd.weight"][0]
    vocab_size = len(metadata.get("tokenizer.ggml.tokens", ())) or embed_rows
    if vocab_size != embed_rows:
        # The weights decide what mlx-lm can load; a short token list only
        # means some embedding rows have no text.
        logger.warning(
            "%s: %d tokens but %d embedding rows", path, vocab_size, embed_rows
        )
        vocab_size = embed_rows

    config = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        **_attention_config(path, arch, header),
        "num_hidden_layers": _field(path, fields, f"{arch}.block_count"),
        "intermediate_size": _field(path, fields, f"{arch}.feed_forward_length"),
        "rms_norm_eps": _field(
            path, fields, f"{arch}.attention.layer_norm_rms_epsilon"
        ),
        # llama.cpp's own default base when a file omits it.
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": _field(path, fields, f"{arch}.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": _token_id(fields, "tokenizer.ggml.bos_token_id", vocab_size),
        "eos_token_id": _token_id(fields, "tokenizer.ggml.eos_token_id", vocab_size),
    }
    rope_scaling = _rope_scaling(path, arch, fields)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row interleave, head by head.

    Hugging Face keeps each head's rotated pairs as (first half, second half);
    llama.cpp stores pair member j of half s at row 2 * j + s. Rows move whole,
    so this also holds for quantized weights, scales, biases and 1-D biases.
    """
    head_dim = x.shape[0] // n_heads
    rest = x.shape[1:]
    h = x.reshape(n_heads, head_dim // 2, 2, *rest)
    return h.swapaxes(1, 2).reshape(x.shape)


def _hf_weights(tensors: dict[str, mx.array], arch: str, config: dict) -> dict:
    permute = arch in _PERMUTED_ARCHITECTURES
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    weights = {}
    for name, array in tensors.items():
        module, suffix = name.rsplit(".", 1)
        kind = module.rsplit(".", 1)[-1]
        if permute and kind in heads:
            array = _unpermute_rows(array, heads[kind])
        weights[f"{_hf_module(module)}.{suffix}"] = array
    return weights


def _check_layers(path: Path, weights: dict[str, mx.array], config: dict) -> None:
    expected = ["model.embed_tokens", "model.norm"]
    for i in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{i}.{m}" for m in _REQUIRED_BLOCK_MODULES]
    missing = [m for m in expected if f"{m}.weight" not in weights]
    if missing:
        raise ValueError(
            f"{path}: the GGUF lacks {len(missing)} tensors a "
            f"{config['model_type']} model needs (first: {missing[0]}.weight); "
            "the file is incomplete"
        )


def _quantization(weights: dict[str, mx.array], in_features: dict[str, int]) -> dict:
    """mlx-lm's quantization block: a default plus per-layer exceptions.

    Bits and group size come from the shapes: the packed uint32 weight is
    (out, in * bits / 32) and the scales are (out, in / group_size).
    """
    params = {}
    for key, array in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and array.ndim == 2:
            if f"{module}.scales" not in weights:
                params[module] = False
                continue
            n_in, n_groups = in_features[module], weights[f"{module}.scales"].shape[-1]
            params[module] = {
                "group_size": n_in // n_groups,
                "bits": array.shape[-1] * 32 // n_in,
            }
    quantized = [(p["group_size"], p["bits"]) for p in params.values() if p]
    if not quantized:
        return {}

    (group_size, bits), _ = Counter(quantized).most_common(1)[0]
    default = {"group_size": group_size, "bits": bits}
    return {**default, **{m: p for m, p in params.items() if p != default}}


def _float_dtype(weights: dict[str, mx.array]) -> str:
    """The float dtype of unquantized matrices, else of the norms."""
    floats = [
        w
        for k, w in weights.items()
        if not k.endswith((".scales", ".biases"))
        and mx.issubdtype(w.dtype, mx.floating)
    ]
    matrices = [w for w in floats if w.ndim >= 2]
    if not floats:
        return "float16"  # only quantized tensors, whose scales are float16
    dtype, _ = Counter(w.dtype for w in matrices or floats).most_common(1)[0]
    return _DTYPE_NAMES.get(dtype, "float32")


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a GGUF file into Hugging Face-style config, weights and metadata.

    Architecture and tensor types are checked from the header before any
    tensor is loaded. Q8_0/Q4_0/Q4_1 tensors stay quantized (MLX affine,
    group size 32); F32/F16/BF16 stay in their float type. For llama files the
    q/k projection rows are put back into Hugging Face order.

    Args:
        path: The ``.gguf`` file.

    Returns:
        The config dict, the renamed weights (evaluated) and the raw metadata.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file is not GGUF, is truncated, holds an unsupported
            architecture, tensor type or RoPE scaling, or lacks needed tensors
            or metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")

    header = _read_header(path)
    arch = _check_architecture(path, header.fields)
    _check_tensors(path, header)
    tensors, metadata = _load_tensors(path, header)

    config = _build_config(path, arch, header, metadata)
    rope_factors = tensors.pop("rope_freqs.weight", None)
    if rope_factors is not None:
        config["rope_scaling"] = _llama3_scaling(path, rope_factors, config)
    weights = _hf_weights(tensors, arch, config)
    _check_layers(path, weights, config)
    in_features = {
        _hf_module(i.name.rsplit(".", 1)[0]): i.shape[-1]
        for i in header.tensors
        if i.name != "rope_freqs.weight"
    }
    quantization = _quantization(weights, in_features)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = copy.deepcopy(quantization)
    config["torch_dtype"] = _float_dtype(weights)

    mx.eval(weights)
    return GGUFModel(config=config, weights=weights, metadata=metadata)


def _meta(metadata: dict, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (mx.load gives 0-d and 1-d arrays)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _import_tokenizer_converter() -> Any:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
        )
    except ImportError as err:
        import transformers

        raise ImportError(
            "mlxbastion.gguf needs convert_gguf_tokenizer from "
            "transformers.integrations.gguf.gguf_tokenizer_mapping (present in "
            f"transformers 5.25, tested); installed: {transformers.__version__}; "
            "run pip install 'transformers>=5.25'"
        ) from err
    return convert_gguf_tokenizer


def _tokenizer_dict(metadata: dict) -> dict:
    """The tokenizer fields under the key names transformers' converter expects."""
    tokens = metadata["tokenizer.ggml.tokens"]
    tokenizer = {
        "tokenizer_type": _meta(metadata, "tokenizer.ggml.model"),
        "tokens": tokens,
    }
    for gguf_key, key in (
        ("pre", "pre_tokenizer_type"),
        ("scores", "scores"),
        ("token_type", "token_type"),
        ("merges", "merges"),
        ("add_space_prefix", "add_prefix_space"),
    ):
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            tokenizer[key] = _meta(metadata, f"tokenizer.ggml.{gguf_key}")

    # uint32 -1 ("none") and out-of-range ids would crash the converter.
    fields = {k: _meta(metadata, k) for k in metadata if k.endswith("_token_id")}
    for gguf_key, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        token_id = _token_id(fields, f"tokenizer.ggml.{gguf_key}", len(tokens))
        if token_id is not None:
            tokenizer[key] = token_id
    return tokenizer


def _build_tokenizer(model: GGUFModel) -> Any:
    """A transformers fast tokenizer rebuilt from the GGUF tokenizer metadata."""
    metadata = model.metadata
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(
            "this GGUF file has no tokenizer metadata; copy the tokenizer files "
            "from the original Hugging Face model instead"
        )
    from transformers import PreTrainedTokenizerFast

    convert_gguf_tokenizer = _import_tokenizer_converter()
    tokenizer_dict = _tokenizer_dict(metadata)
    arch = _meta(metadata, "general.architecture")
    try:
        backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except ValueError as err:
        message = str(err).replace("\n", " ")
        raise ValueError(f"cannot rebuild this GGUF's tokenizer: {message}") from None
    # Limitation: a SentencePiece file with add_space_prefix=False still gets
    # transformers' prefix space; llama/qwen files do not set it that way.

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says
    # otherwise; byte-level BPE files (gpt2 type) state it when they want it.
    is_spm = tokenizer_dict["tokenizer_type"] == "llama"
    tokens = tokenizer_dict["tokens"]
    special = {}
    for name in _SPECIAL_TOKEN_NAMES:
        token_id = tokenizer_dict.get(f"{name}_id")
        special[name] = None if token_id is None else tokens[token_id]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=bool(_meta(metadata, "tokenizer.ggml.add_bos_token", is_spm)),
        add_eos_token=bool(_meta(metadata, "tokenizer.ggml.add_eos_token", False)),
        chat_template=_meta(metadata, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **special,
    )


def save_gguf_tokenizer(model: GGUFModel, dst: str | Path) -> None:
    """Write the GGUF's tokenizer as Hugging Face tokenizer files.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat
    template when the file has one, the bos/eos/unk/pad tokens and
    ``add_bos_token``) and ``special_tokens_map.json``. The folder loads with
    ``AutoTokenizer.from_pretrained`` and ``mlx_lm.tokenizer_utils.load``.

    Args:
        model: A model from :func:`read_gguf`.
        dst: The output folder; created if missing, files in it overwritten.

    Raises:
        ValueError: If the file has no tokenizer metadata or a tokenizer type
            transformers cannot rebuild.
        ImportError: If the installed transformers lacks the GGUF converter.
    """
    tokenizer = _build_tokenizer(model)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json,
    # where both transformers and mlx-lm find it.
    tokenizer.save_pretrained(dst, save_jinja_files=False)

    # transformers 5 leaves add_bos_token out of the file (tokenizer.json's
    # post-processor carries it); write it so readers of the config see it too.
    config_path = dst / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["add_bos_token"] = tokenizer.add_bos_token
    tokenizer_config["add_eos_token"] = tokenizer.add_eos_token
    if tokenizer_config.get("chat_template") is None:
        tokenizer_config.pop("chat_template", None)
    _write_json(config_path, tokenizer_config)

    special = {
        name: getattr(tokenizer, name)
        for name in _SPECIAL_TOKEN_NAMES
        if getattr(tokenizer, name) is not None
    }
    _write_json(dst / "special_tokens_map.json", special)


def _write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
        f.write("\n")


def gguf_generation_config(model: GGUFModel) -> dict:
    """The ``generation_config.json`` content for a GGUF model.

    The end-of-turn and end-of-message tokens llama.cpp also stops on
    (``tokenizer.ggml.eot_token_id``, ``eom_token_id``) join ``eos_token_id``,
    which then becomes a list.

    Args:
        model: A model from :func:`read_gguf`.

    Returns:
        A dict with ``bos_token_id`` and ``eos_token_id`` (each omitted when the
        file names no such token).
    """
    config = model.config
    fields = {k: _meta(model.metadata, k) for k in model.metadata if k.endswith("_id")}
    eos_ids = [config.get("eos_token_id")] + [
        _token_id(fields, f"tokenizer.ggml.{key}_token_id", config["vocab_size"])
        for key in ("eot", "eom")
    ]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))

    generation = {}
    if config.get("bos_token_id") is not None:
        generation["bos_token_id"] = config["bos_token_id"]
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return generation
