"""Convert a Hugging Face checkpoint or a GGUF file into an MLX model folder.

Conversion is load, check, cast, save: module names already match the
checkpoint's, so the only renaming happens for GGUF files (``gguf.py``).
The output folder is written under a temporary name and renamed at the end,
so an interrupted conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from .checkpoint import (
    FLOAT16_MAX,
    FLOAT_DTYPES,
    TOKENIZER_FILES,
    Progress,
    atomic_output_dir,
    build_model,
    check_supported,
    load_config,
    load_weights,
    resolve_model_path,
    save_config,
    save_weights,
)

logger = logging.getLogger(__name__)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Convert ``hf_path`` (folder, hub repo id or .gguf file) to ``mlx_path``.

    Args:
        hf_path: the source checkpoint.
        mlx_path: the folder to write; must be absent or empty unless ``force``.
        dtype: float16, bfloat16 or float32 for float tensors; None keeps the
            checkpoint's own. Quantized GGUF tensors stay quantized either way.
        force: replace a non-empty ``mlx_path``.
        progress: called as ``progress(done, total)`` as tensors are converted.

    Returns:
        The written folder.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, with the reason.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}"
        )
    src = resolve_model_path(hf_path)
    dst = Path(mlx_path)
    if src.resolve() == dst.resolve():
        raise ValueError("--mlx-path must differ from the source checkpoint")
    # The destination is checked on entry, before the slow part.
    with atomic_output_dir(dst, force=force) as tmp:
        _convert_into(src, tmp, dtype, progress)
    logger.info("wrote %s", dst)
    return dst


def _convert_into(
    src: Path, tmp: Path, dtype: str | None, progress: Progress | None
) -> None:
    if src.is_file():
        config, weights, write_tokenizer = _read_gguf_source(src)
    else:
        config, weights, write_tokenizer = _read_hf_source(src)

    model, weights = build_model(config, weights)
    if dtype is not None:
        weights = _cast(weights, FLOAT_DTYPES[dtype])
    out_config = model.args.to_dict()
    out_config["torch_dtype"] = dtype or _float_dtype_name(weights)
    if "dtype" in out_config:
        # transformers 5's name for torch_dtype, and the one it reads first.
        out_config["dtype"] = out_config["torch_dtype"]

    # Weights load lazily: reading and casting happen here, tensor by tensor.
    for done, w in enumerate(weights.values(), start=1):
        mx.eval(w)
        if progress is not None:
            progress(done, len(weights))
    save_weights(tmp, weights)
    save_config(tmp, out_config)
    write_tokenizer(tmp)
    normalise_tokenizer_config(tmp)


def _read_hf_source(src: Path) -> tuple[dict[str, Any], dict[str, mx.array], Any]:
    config = load_config(src)
    check_supported(config, src)
    weights = load_weights(src)

    def write_tokenizer(tmp: Path) -> None:
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            # copyfile, not copy2: a read-only source must not give read-only
            # copies, which normalise_tokenizer_config then fails to rewrite.
            shutil.copyfile(src / name, tmp / name)
        if "tokenizer.json" not in copied:
            _build_tokenizer_json(src, tmp)

    return config, weights, write_tokenizer


def _read_gguf_source(src: Path) -> tuple[dict[str, Any], dict[str, mx.array], Any]:
    if src.suffix.lower() != ".gguf":
        raise ValueError(
            f"{src} is a file but not a .gguf; give a model folder, a .gguf file "
            "or a hub repo id"
        )
    from .gguf import gguf_generation_config, read_gguf, save_gguf_tokenizer

    gguf = read_gguf(src)

    def write_tokenizer(tmp: Path) -> None:
        save_gguf_tokenizer(gguf, tmp)
        generation = gguf_generation_config(gguf)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))

    return gguf.config, gguf.weights, write_tokenizer


def _build_tokenizer_json(src: Path, tmp: Path) -> None:
    """Write tokenizer.json (which MLX Swift needs) from a SentencePiece model."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    except Exception as e:
        raise ValueError(
            f"{src} has no tokenizer.json and its tokenizer could not be "
            f"converted ({e}); add tokenizer.json to the folder"
        ) from e


def normalise_tokenizer_config(folder: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4 and 5, mlx-lm and
    MLX Swift: the chat template inline, and a tokenizer class all of them know.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = folder / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text()
    # transformers 5 writes "TokenizersBackend", which older loaders reject;
    # every loader maps PreTrainedTokenizerFast onto tokenizer.json.
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast float tensors, keeping any that would overflow float16 in float32."""
    out = {}
    for name, w in weights.items():
        if not mx.issubdtype(w.dtype, mx.floating) or w.dtype == dtype:
            out[name] = w
            continue
        if dtype == mx.float16 and w.dtype != mx.float16:
            peak = mx.abs(w).max().item()
            if peak > FLOAT16_MAX:
                logger.warning(
                    "%s holds values up to %.3g, beyond float16's range; "
                    "kept in float32",
                    name,
                    peak,
                )
                out[name] = w.astype(mx.float32)
                continue
        out[name] = w.astype(dtype)
    return out


def _float_dtype_name(weights: dict[str, mx.array]) -> str:
    """The dtype most float tensors have, by element count."""
    counts: dict[str, int] = {}
    for w in weights.values():
        if mx.issubdtype(w.dtype, mx.floating):
            name = str(w.dtype).split(".")[-1]
            counts[name] = counts.get(name, 0) + w.size
    return max(counts, key=counts.get) if counts else "float32"
