"""Reading and writing model folders; ``convert.py`` builds on these.

This module owns locating a model (local path or hub repo id), reading its
config and weights, building the model, and writing a folder atomically. An
MLX model folder is what mlx-lm and MLX Swift load: ``config.json`` (with a
``quantization`` entry when weights are quantized), ``model.safetensors`` or
shards with ``model.safetensors.index.json``, and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` carrying the chat template).

The weights it reads: safetensors (sharded or not) or ``pytorch_model.bin``
(through ``torch_bin.py``); GGUF files are read by ``gguf.py``.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .blas import cpu_backend, fast_matmul
from .config import ModelArgs
from .model import Model, dequantize_for_many_rows
from .tokenizer import Tokenizer, load_tokenizer, parse_eos_token_ids

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

    A missing ``org/name`` is tried as a hub repo id, unless ``org`` is a local
    folder: then it is a mistyped path, and nothing is downloaded.

    Raises:
        FileNotFoundError: neither a local path nor a downloadable repo id.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo)
    first = text.split("/", 1)[0]
    looks_local = text.startswith((".", "/", "~")) or Path(first).is_dir()
    if text.count("/") != 1 or looks_local:
        raise FileNotFoundError(
            f"model path {text!r} does not exist; give a model folder, a .gguf "
            "file or a Hugging Face repo id like 'org/name'"
        )
    return _download(text)


# What mlx-lm fetches: the weights as model*.safetensors (not a duplicate
# consolidated.safetensors), the configs and the tokenizer.
HUB_PATTERNS = ["*.json", "model*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("model*.safetensors")):
            # Older repos publish only pytorch_model.bin (and its index).
            logger.info("%s has no safetensors; fetching pytorch_model*.bin", repo_id)
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_BIN_PATTERNS))
    except Exception as e:
        raise FileNotFoundError(
            f"model path {repo_id!r} does not exist locally, and as a Hugging Face "
            f"repo id it could not be downloaded ({type(e).__name__}); check the "
            "path, or the repo id and your connection"
        ) from e
    return folder


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    quantization_config = config.get("quantization_config")
    if quantization_config is not None and not isinstance(quantization_config, dict):
        raise ValueError(
            f"{path / 'config.json'}: quantization_config must be an object, got "
            f"{quantization_config!r}; fix config.json"
        )
    if "quantization" not in config and quantization_config:
        method = quantization_config.get("quant_method", "unknown")
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
        if any(f.name.startswith("model") for f in files):
            # Mistral repos ship consolidated.safetensors beside model*.safetensors:
            # the same weights under other names.
            files = [f for f in files if not f.name.startswith("consolidated")]
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
        content = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{index} is not a valid shard index ({e}); re-download it"
        ) from e
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index} is not a valid shard index: it needs a 'weight_map' object "
            "mapping tensor names to shard files; re-download it"
        )
    for name in weight_map.values():
        if not isinstance(name, str) or Path(name).name != name or name == "..":
            raise ValueError(
                f"{index} is not a valid shard index: 'weight_map' names "
                f"{name!r}, not a shard file in the same folder; re-download it"
            )
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


def cast_weights(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast float tensors to ``dtype``, except where that would lose them.

    - A tensor that would overflow float16 stays in float32, with a warning
      naming it.
    - Quantization scales and biases (``*.scales``, ``*.biases``) are not cast
      to bfloat16: its 8-bit mantissa is too coarse for them (SmolLM2 Q4_1
      answers in broken French with bfloat16 scales). They keep their dtype,
      float16 for GGUF files; to float16 or float32 they are cast as asked.

    Args:
        weights: tensors by name.
        dtype: the target float dtype.

    Returns:
        The cast tensors (lazy), by name.
    """
    out, kept = {}, []
    for name, w in weights.items():
        if not mx.issubdtype(w.dtype, mx.floating) or w.dtype == dtype:
            out[name] = w
        elif dtype == mx.bfloat16 and name.endswith((".scales", ".biases")):
            out[name] = w
            kept.append(name)
        elif dtype == mx.float16 and _overflows_float16(name, w):
            out[name] = w.astype(mx.float32)
        else:
            out[name] = w.astype(dtype)
    if kept:
        logger.info(
            "kept %d quantization scales and biases in %s rather than bfloat16, "
            "which is too coarse for them",
            len(kept),
            str(weights[kept[0]].dtype).split(".")[-1],
        )
    return out


def _overflows_float16(name: str, w: mx.array) -> bool:
    peak = mx.abs(w).max().item()
    if peak > FLOAT16_MAX:
        logger.warning(
            "%s holds values up to %.3g, beyond float16's range; kept in float32",
            name,
            peak,
        )
        return True
    return False


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast the model's float parameters to ``dtype``, as ``cast_weights`` does."""
    model.load_weights(
        list(cast_weights(dict(tree_flatten(model.parameters())), dtype).items())
    )


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend, where float16 and bfloat16 math (and above all
    the quantized matmul with half-precision activations) is several times
    slower; None (keep the checkpoint's dtype) on a GPU."""
    return mx.float32 if cpu_backend() else None


def load_model(
    path: str | Path, *, dtype: str | None = "auto", dequantize: bool = False
) -> tuple[Model, dict[str, Any], Path]:
    """Load an MLX (or plain Hugging Face) model folder.

    Args:
        path: a model folder or a hub repo id.
        dtype: compute dtype for float parameters: "auto" picks per backend
            (see ``default_compute_dtype``), None keeps the stored dtype, or
            one of float16, bfloat16, float32, cast as ``cast_weights`` does
            (a tensor beyond float16's range stays float32, with a warning).
            Asking for float16 or bfloat16 on the CPU backend logs a warning:
            it is much slower there than float32.
        dequantize: turn quantized layers into float ones once, at load.
            On the CPU backend the float matmul is faster than the quantized
            one, at the cost of 4-8x the memory for those weights. Without
            it, quantized layers on the CPU backend still multiply prompt
            chunks in float, one layer at a time (``DequantizingLinear``).

    Returns:
        The model, its config.json dict, and the resolved folder.

    Raises:
        FileNotFoundError, ValueError: a missing or malformed model folder.
    """
    folder = resolve_model_path(path)
    if folder.is_file():
        raise ValueError(
            f"{folder} is a file; convert it first with "
            f"'mlxbastion convert --hf-path {folder} --mlx-path DST'"
        )
    if dtype not in (None, "auto", *FLOAT_DTYPES):
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, or one of {', '.join(FLOAT_DTYPES)}"
        )
    config = load_config(folder)
    check_supported(config, folder)
    # Checked here too, so a bad entry is refused before the weights load.
    parse_eos_token_ids(config.get("eos_token_id"), folder / "config.json")
    model, _ = build_model(config, load_weights(folder))
    on_cpu = default_compute_dtype() is not None
    if dequantize:
        from .quant import dequantize_layers

        dequantize_layers(model)
    elif on_cpu:
        dequantize_for_many_rows(model, min_rows=4 if fast_matmul() else 16)
    target = default_compute_dtype() if dtype == "auto" else dtype
    if isinstance(target, str):
        target = FLOAT_DTYPES[target]
    if target is not None:
        cast_floats(model, target)
    mx.eval(model.parameters())
    model.eval()
    if on_cpu and dtype in ("float16", "bfloat16"):
        logger.warning(
            "computing in %s on the CPU backend, which is much slower than "
            "float32 (30-60x for quantized layers); use --dtype auto",
            dtype,
        )
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


# Errors that mean the disk (or quota) is full, or the file system refuses writes.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output_dir(dst: Path, *, force: bool = False) -> None:
    """Refuse an output folder that cannot or must not be written.

    Raises:
        ValueError: ``dst`` is the current directory or contains it.
        NotADirectoryError: a parent of ``dst`` is a file.
        FileExistsError: ``dst`` is a file, or a non-empty folder without
            ``force``.
    """
    dst = Path(dst)
    resolved, cwd = dst.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"--mlx-path {str(dst)!r} is the current directory or contains it; "
            "give the name of a new folder, such as 'my-model-mlx'"
        )
    for parent in reversed(dst.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(
                f"{parent} is a file, so {dst} cannot be created inside it; "
                "pick another --mlx-path"
            )
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(
            f"{dst} exists and is not a folder; pick another --mlx-path"
        )
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise FileExistsError(
            f"{dst} already exists and is not empty; pass --force to replace it "
            "or pick another --mlx-path"
        )


def check_replaceable(dst: Path) -> None:
    """With ``--force``, refuse to replace a non-empty folder that is not a model.

    ``--force`` exists to redo a conversion; a folder without config.json is
    someone's data (or a parent of the source), never a previous output.

    Raises:
        FileExistsError: ``dst`` is a non-empty folder without config.json.
    """
    dst = Path(dst)
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise FileExistsError(
            f"{dst} is not empty and holds no config.json, so it is not a model "
            "folder written earlier; --force only replaces those. Empty or remove "
            "it yourself, or pick another --mlx-path"
        )


@contextmanager
def atomic_output_dir(dst: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; rename it to ``dst`` on success.

    A crash, Ctrl-C or SIGTERM leaves ``dst`` as it was. With ``force`` an
    existing ``dst`` is replaced only once the new one is complete. Temporary
    folders for ``dst`` left by a killed earlier run (whose process is gone)
    are removed first.

    Raises:
        FileExistsError, NotADirectoryError, ValueError: see
            ``check_output_dir``.
        ValueError: writing failed because the disk is full or read-only.
    """
    dst = Path(dst)
    check_output_dir(dst, force=force)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dst)
        # Not mkdtemp: its 0700 mode would survive the rename, and the model
        # folder should get the umask's mode like any other folder.
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
    except OSError as e:
        _raise_write_error(e, dst)
        raise
    try:
        with _sigterm_exits():
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(e, dst)
        raise


def _raise_write_error(error: BaseException, dst: Path) -> None:
    """Re-raise a failed write (disk full, read-only) as a one-line ValueError."""
    hint = "disk full?"
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        reason = error.strerror or str(error)
        if error.errno == errno.EROFS:
            hint = "the file system is read-only"
    elif isinstance(error, RuntimeError) and str(error).startswith(
        ("[write]", "[save_safetensors]")
    ):
        # MLX's writers raise RuntimeError("[write] Unable to write N bytes ...").
        reason = str(error).splitlines()[0]
    else:
        return
    raise ValueError(
        f"could not write {dst}: {hint} ({reason}); free some space or pick "
        "another --mlx-path, then run again"
    ) from error


def _remove_stale_partials(dst: Path) -> None:
    """Remove ``.NAME.partial-PID-*`` folders whose process no longer runs."""
    prefix = f".{dst.name}.partial-"
    for path in dst.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or _process_alive(int(pid)) or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning(
            "removed %s, left behind by an earlier run (process %s) that was killed",
            path,
            pid,
        )


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Make SIGTERM raise SystemExit for the duration, so cleanup code runs.

    Only in the main thread (the only one that can set handlers), and only
    while SIGTERM has its default action: a handler the caller installed wins.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def load(
    path: str | Path, *, dtype: str | None = "auto", dequantize: bool = False
) -> tuple[Model, Tokenizer]:
    """Load a model folder (or hub repo id) and its tokenizer.

    Args:
        path: an MLX or Hugging Face model folder, or a hub repo id.
        dtype: compute dtype, as for ``load_model``.
        dequantize: dequantize quantized layers at load, as for ``load_model``.

    Returns:
        ``(model, tokenizer)``, ready for ``generate`` and ``stream_generate``.
    """
    model, config, folder = load_model(path, dtype=dtype, dequantize=dequantize)
    eos_ids = parse_eos_token_ids(config.get("eos_token_id"), folder / "config.json")
    return model, load_tokenizer(folder, eos_ids)
