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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from jinja2.exceptions import TemplateSyntaxError

from .checkpoint import (
    FLOAT_DTYPES,
    TOKENIZER_FILES,
    Progress,
    atomic_output_dir,
    build_model,
    cast_weights,
    check_output_dir,
    check_replaceable,
    check_supported,
    load_config,
    load_weights,
    resolve_model_path,
    save_config,
    save_weights,
)
from .tokenizer import (
    ChatTemplateError,
    check_tokenizer_json,
    declared_eos_ids,
    load_tokenizer,
    one_line_reason,
)

if TYPE_CHECKING:
    from .quantization import QuantizeOptions

logger = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]

# Files a tokenizer can be built from; a source needs one of them.
_TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    quantize: QuantizeOptions | None = None,
    stage_progress: StageProgress | None = None,
) -> Path:
    """Convert ``hf_path`` (folder, hub repo id or .gguf file) to ``mlx_path``.

    Quantized layers (from a GGUF file) keep their packed weights, and their
    scales and biases are never cast to bfloat16, which is too coarse for
    them: with ``dtype="bfloat16"`` they stay float16 (see
    ``checkpoint.cast_weights``).

    ``mlx_path`` may not be the current directory, nor contain or lie inside
    the source. The tokenizer is loaded once from the written folder, so a
    broken one is refused here, naming the file; a chat template with a
    syntax error is left out, with a warning, so the model still works.

    Args:
        hf_path: the source checkpoint.
        mlx_path: the folder to write; must be absent or empty unless ``force``.
        dtype: float16, bfloat16 or float32 for float tensors; None keeps the
            checkpoint's own. Quantized GGUF tensors stay quantized either way.
        force: replace a non-empty ``mlx_path``, but only a model folder (one
            holding config.json), so that ``--force`` never deletes other data.
        progress: called as ``progress(done, total)`` as tensors are converted.
        quantize: quantize in the same step, as ``quantization.quantize`` does
            (its report lands in the output folder too).
        stage_progress: called as ``progress(stage, done, total)`` while
            quantizing.

    Returns:
        The written folder.

    Raises:
        FileNotFoundError, FileExistsError, NotADirectoryError, ValueError: bad
            input, with the reason. A full disk is a ValueError ("could not
            write DST: disk full? ..."); nothing is left behind.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}"
        )
    if not str(mlx_path).strip():
        raise ValueError("--mlx-path is empty; give the name of the folder to write")
    # The destination is checked on entry, before the slow part.
    dst = Path(mlx_path)
    check_output_dir(dst, force=force)
    src = resolve_model_path(hf_path)
    _check_apart(src, dst)
    if force:
        check_replaceable(dst)
    if quantize is not None:
        from .quantization import check_options

        check_options(quantize)
    with atomic_output_dir(dst, force=force) as tmp:
        if quantize is None:
            _convert_into(src, tmp, dtype, progress)
        else:
            from .quantization import quantize_into

            # Quantizing reads a float folder; it lives inside the output's
            # temporary folder, so a failure leaves nothing behind.
            float_dir = tmp / ".float"
            float_dir.mkdir()
            _convert_into(src, float_dir, dtype, progress)
            quantize_into(float_dir, tmp, quantize, stage_progress)
            shutil.rmtree(float_dir)
    logger.info("wrote %s", dst)
    return dst


def _check_apart(src: Path, dst: Path) -> None:
    """Refuse a destination that is, holds, or lies inside the source."""
    src_path, dst_path = src.resolve(), dst.resolve()
    if src_path == dst_path:
        raise ValueError("--mlx-path must differ from the source checkpoint")
    if dst_path in src_path.parents:
        raise ValueError(
            f"--mlx-path {dst} contains the source checkpoint {src}; writing "
            "there would replace the source. Pick a folder outside it"
        )
    if src_path in dst_path.parents:
        raise ValueError(
            f"--mlx-path {dst} is inside the source checkpoint {src}; pick a "
            "folder outside it"
        )


def _convert_into(
    src: Path, tmp: Path, dtype: str | None, progress: Progress | None
) -> None:
    if src.is_file():
        config, weights, write_tokenizer = _read_gguf_source(src)
    else:
        config, weights, write_tokenizer = _read_hf_source(src)

    model, weights = build_model(config, weights)
    if dtype is not None:
        weights = cast_weights(weights, FLOAT_DTYPES[dtype])
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
    _check_tokenizer(tmp, src)


def _read_hf_source(src: Path) -> tuple[dict[str, Any], dict[str, mx.array], Any]:
    config = load_config(src)
    check_supported(config, src)
    _check_tokenizer_files(src)
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


def _check_tokenizer_files(src: Path) -> None:
    """Refuse a missing or unreadable tokenizer before the weights are read."""
    if not any((src / name).is_file() for name in _TOKENIZER_SOURCES):
        raise ValueError(
            f"{src} has no tokenizer files (tokenizer.json or tokenizer.model); "
            "add them from the original model"
        )
    check_tokenizer_json(src)
    declared_eos_ids(src)


def _check_tokenizer(tmp: Path, src: Path) -> None:
    """Load the written tokenizer once, so a broken one fails here, not later.

    A chat template with a syntax error is left out, with a warning: the model
    still answers plain prompts, and ``generate`` then says it has no template.
    """
    try:
        tokenizer = load_tokenizer(tmp)
    except ValueError as e:
        reason = one_line_reason(e.__cause__) if e.__cause__ else str(e)
        raise ValueError(
            f"{_tokenizer_file(src)} does not load as a tokenizer ({reason}); "
            "fix or re-download it"
        ) from e
    if not tokenizer.has_chat_template:
        return
    try:
        tokenizer.format_prompt("Hello")
    except ChatTemplateError as e:
        cause = e.__cause__
        if not isinstance(cause, TemplateSyntaxError):
            logger.warning(
                "the chat template of %s fails on a plain prompt (%s); "
                "generate will need --ignore-chat-template",
                src,
                one_line_reason(cause),
            )
            return
        _drop_chat_template(tmp)
        logger.warning(
            "the chat template of %s has a syntax error (%s) and was left out; "
            "prompts are sent without it. Fix it in the source and convert "
            "again to use it",
            src,
            one_line_reason(cause),
        )


def _tokenizer_file(src: Path) -> str:
    """What the tokenizer was built from, as an error names it."""
    if src.is_file():
        return f"the tokenizer metadata of {src}"
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            return f"{name} in {src}"
    return f"the tokenizer in {src}"


def _drop_chat_template(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("chat_template", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)


def _build_tokenizer_json(src: Path, tmp: Path) -> None:
    """Write tokenizer.json (which MLX Swift needs) from a SentencePiece model."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    except Exception as e:
        raise ValueError(
            f"{src} has no tokenizer.json and its tokenizer could not be "
            f"converted ({one_line_reason(e)}); add tokenizer.json to the folder"
        ) from e


def copy_tokenizer(source: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of a model folder, normalised."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dst / name)
    normalise_tokenizer_config(dst)


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


def _float_dtype_name(weights: dict[str, mx.array]) -> str:
    """The dtype most float tensors have, by element count."""
    counts: dict[str, int] = {}
    for w in weights.values():
        if mx.issubdtype(w.dtype, mx.floating):
            name = str(w.dtype).split(".")[-1]
            counts[name] = counts.get(name, 0) + w.size
    return max(counts, key=counts.get) if counts else "float32"
