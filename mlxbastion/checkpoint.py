"""Reading and writing model folders, and converting checkpoints to MLX.

An MLX model folder is what mlx-lm and MLX Swift load: ``config.json`` (with a
``quantization`` entry when weights are quantized), ``model.safetensors`` or
shards with ``model.safetensors.index.json``, and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` carrying the chat template).

Sources ``convert`` accepts: a local Hugging Face folder (safetensors, sharded
or not, or ``pytorch_model.bin``), a hub repo id, or a ``.gguf`` file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .model import Model
from .tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Files that describe the tokenizer and generation defaults; copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# mlx-lm writes shards of at most 5 GB; so do we, so folders look the same.
MAX_SHARD_BYTES = 5 << 30

FLOAT_DTYPES = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
}

FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------
# Locating a model


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local folder or file as is; otherwise download a hub repo id.

    Raises:
        FileNotFoundError: neither a local path nor a downloadable repo id.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"model path {text!r} does not exist; give a model folder, a .gguf "
            "file or a Hugging Face repo id like 'org/name'"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub "
            f"({type(e).__name__}); check the repo id and your connection, or "
            "pass a local folder"
        ) from e


def load_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder.

    Raises:
        FileNotFoundError: the folder has no config.json.
        ValueError: config.json is not valid JSON.
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; point at a Hugging Face or MLX model folder"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{config_path} is not valid JSON ({e}); fix or re-download it"
        ) from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    return config


def check_supported(config: dict[str, Any], path: Path) -> ModelArgs:
    """Refuse what we cannot run before reading gigabytes of weights.

    Raises:
        ValueError: an unsupported architecture or RoPE scaling, or a checkpoint
            pre-quantized by another tool (GPTQ, AWQ, bitsandbytes, fp8).
    """
    if "quantization" not in config and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"{path} is pre-quantized ({method}), which mlxbastion cannot read; "
            "convert the original float checkpoint instead"
        )
    return ModelArgs.from_dict(config)


# ---------------------------------------------------------------------------
# Reading weights


def load_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a model folder: safetensors (sharded or not) or .bin.

    Raises:
        FileNotFoundError: no weight files, or a shard the index names is missing.
        ValueError: a weight file is truncated or corrupt.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = _shards_from_index(index)
    else:
        files = sorted(path.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("adapters")]
    if not files:
        bin_index = path / "pytorch_model.bin.index.json"
        if bin_index.is_file():
            files = _shards_from_index(bin_index)
        elif (path / "pytorch_model.bin").is_file():
            files = [path / "pytorch_model.bin"]
    if not files:
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors, shards with "
            "model.safetensors.index.json, or pytorch_model.bin"
        )
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(_load_weight_file(file))
    return weights


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid shard index ({e})") from e
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard {missing[0]} listed in {index.name} is missing from "
            f"{index.parent}; download it again"
        )
    return files


def _load_weight_file(file: Path) -> dict[str, mx.array]:
    if file.suffix == ".bin":
        from .torch_bin import load_torch_bin

        return load_torch_bin(file)
    try:
        return mx.load(str(file))
    except Exception as e:
        raise ValueError(
            f"cannot read {file}: it is truncated or not a safetensors file "
            f"({e}); download or convert it again"
        ) from e


# ---------------------------------------------------------------------------
# Building a model from weights


def quantize_for_weights(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]
) -> None:
    """Swap in quantized layers wherever the weights hold ``.scales``.

    Per-layer entries in ``quantization`` (keyed by module path) override the
    default bits and group size; ``false`` keeps a layer in float.
    """

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if f"{path}.scales" not in weights:
            return False
        entry = quantization.get(path)
        if isinstance(entry, dict):
            return {"group_size": entry["group_size"], "bits": entry["bits"]}
        return entry is not False

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Every parameter present with the right shape, and nothing extra.

    Raises:
        ValueError: naming the first missing, unexpected or misshapen tensor.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"tensor {missing[0]} is missing from the weights{more}; the "
            "checkpoint does not match its config.json"
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(
            f"unexpected tensor {unexpected[0]} in the weights; the checkpoint "
            "does not match its config.json"
        )
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(weights[name].shape)} but the "
                f"config implies {tuple(param.shape)}"
            )


def build_model(
    config: dict[str, Any], weights: dict[str, mx.array]
) -> tuple[Model, dict[str, mx.array]]:
    """The model described by ``config`` with ``weights`` loaded (sanitized)."""
    args = ModelArgs.from_dict(config)
    model = Model(args)
    weights = model.sanitize(weights)
    if args.quantization is not None:
        quantize_for_weights(model, args.quantization, weights)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    return model, weights


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (scales and biases too) to ``dtype``."""
    params = tree_flatten(model.parameters())
    model.load_weights(
        [
            (k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
            for k, v in params
        ]
    )


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend, where float16 and bfloat16 math (and above all
    the quantized matmul with half-precision activations) is several times
    slower; None (keep the checkpoint's dtype) on a GPU."""
    if mx.default_device() == mx.cpu or not (
        mx.metal.is_available() or mx.cuda.is_available()
    ):
        return mx.float32
    return None


def load_model(
    path: str | Path, *, dtype: str | None = "auto"
) -> tuple[Model, dict[str, Any], Path]:
    """Load an MLX (or plain Hugging Face) model folder.

    Args:
        path: a model folder or a hub repo id.
        dtype: compute dtype for float parameters: "auto" picks per backend
            (see ``default_compute_dtype``), None keeps the stored dtype, or
            one of float16, bfloat16, float32.

    Returns:
        The model, its config.json dict, and the resolved folder.
    """
    folder = resolve_model_path(path)
    if folder.is_file():
        raise ValueError(
            f"{folder} is a file; convert it first with "
            f"'mlxbastion convert --hf-path {folder} --mlx-path DST'"
        )
    config = load_config(folder)
    check_supported(config, folder)
    model, _ = build_model(config, load_weights(folder))
    target = default_compute_dtype() if dtype == "auto" else dtype
    if isinstance(target, str):
        target = FLOAT_DTYPES[target]
    if target is not None:
        cast_floats(model, target)
    mx.eval(model.parameters())
    model.eval()
    return model, config, folder


# ---------------------------------------------------------------------------
# Writing a model folder


def save_weights(
    dst: Path, weights: dict[str, mx.array], progress: Progress | None = None
) -> None:
    """Write ``weights`` as model.safetensors, or shards plus an index."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes

    total, done = len(weights), 0
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for i in range(len(shards))
        ]
    )
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        mx.save_safetensors(str(dst / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
        done += len(shard)
        if progress is not None:
            progress(done, total)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_config(dst: Path, config: dict[str, Any]) -> None:
    (dst / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )


@contextmanager
def atomic_output_dir(dst: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; rename it to ``dst`` on success.

    A crash or Ctrl-C leaves ``dst`` as it was. With ``force`` an existing
    ``dst`` is replaced only once the new one is complete.

    Raises:
        FileExistsError: ``dst`` exists, is not empty, and ``force`` is False.
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(
            f"{dst} exists and is not a folder; pick another --mlx-path"
        )
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise FileExistsError(
            f"{dst} already exists and is not empty; pass --force to replace it "
            "or pick another --mlx-path"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename, and the model
    # folder should get the umask's mode like any other folder.
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
            dst.rename(old)
            try:
                tmp.rename(dst)
            except BaseException:
                old.rename(dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: str | Path, *, dtype: str | None = "auto") -> tuple[Model, Tokenizer]:
    """Load a model folder (or hub repo id) and its tokenizer.

    Args:
        path: an MLX or Hugging Face model folder, or a hub repo id.
        dtype: compute dtype, as for ``load_model``.

    Returns:
        ``(model, tokenizer)``, ready for ``generate`` and ``stream_generate``.
    """
    model, config, folder = load_model(path, dtype=dtype)
    eos = config.get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    return model, load_tokenizer(folder, eos_ids)
