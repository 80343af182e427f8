"""The fine-tune and fuse jobs: load, prepare, train or merge, save.

``finetune`` loads a model (float, or quantized for QLoRA), validates and
tokenizes the data folder, applies adapters (or unfreezes layers for full
fine-tuning) and runs ``train.train``; the adapter folder it writes loads in
``generate --adapter-path`` and in mlx-lm.

``fuse`` folds an adapter into the model's weights. On a quantized base the
fused layers are re-quantized at 8 bits by default: re-quantizing at the
base's 4 bits rounds away most of a fine-tune's small update. Every fuse is
checked by running the fused model and the model-plus-adapter on a few
prompts and reporting the largest logit difference.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import (
    FLOAT_DTYPES,
    atomic_output_dir,
    load,
    save_config,
    save_weights,
)
from .convert import copy_tokenizer
from .data import DataReport, load_dataset, summarize
from .lora import (
    LoRAConfig,
    apply_adapters,
    fuse_model,
    load_adapters,
    save_adapters,
    trainable_parameters,
    verify_fuse,
)
from .train import (
    CHECKPOINTS,
    Callbacks,
    TrainingArgs,
    TrainResult,
    latest_checkpoint,
    train,
)

logger = logging.getLogger(__name__)


@dataclass
class DataOptions:
    max_seq_length: int = 2048
    mask_prompt: bool = False


@dataclass
class Prepared:
    """What the CLI shows before training starts."""

    data: DataReport
    trainable: int
    total: int


def finetune(
    model_path: str | Path,
    data: str | Path,
    adapter_path: str | Path,
    *,
    lora: LoRAConfig,
    args: TrainingArgs,
    data_options: DataOptions,
    resume: bool = False,
    force: bool = False,
    callbacks: Callbacks | None = None,
    on_prepared: Callable[[Prepared], None] = lambda prepared: None,
) -> TrainResult:
    """Fine-tune ``model_path`` on the data folder ``data``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, with the
            reason (file and line for bad data).
        train.TrainingDiverged: the loss became NaN or infinite.
    """
    output = Path(adapter_path)
    _check_output(output, resume=resume, force=force)
    model, tokenizer = load(model_path, dtype="auto")
    datasets = load_dataset(
        Path(data),
        tokenizer,
        max_seq_length=data_options.max_seq_length,
        mask_prompt=data_options.mask_prompt,
        batch_size=args.batch_size,
    )
    model.freeze()
    # Every rank, and a resumed run, must start from the same adapter init.
    mx.random.seed(args.seed)
    apply_adapters(model, lora)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    on_prepared(
        Prepared(summarize(datasets, tokenizer), trainable_parameters(model), total)
    )

    if force and output.exists():
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    extra = {
        "model": str(model_path),
        "data": str(data),
        **asdict(args),
        **asdict(data_options),
    }

    def save(folder: Path) -> None:
        # Write beside and rename, so a kill never leaves a torn adapter.
        tmp = folder / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapters(model, lora, tmp, extra_config=extra)
        for name in ("adapters.safetensors", "adapter_config.json"):
            (tmp / name).replace(folder / name)
        tmp.rmdir()

    return train(
        model,
        datasets["train"],
        datasets.get("valid"),
        args,
        output=output,
        save=save,
        resume=resume,
        callbacks=callbacks,
    )


def _check_output(output: Path, *, resume: bool, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--adapter-path {output} is a file; give a folder")
    has_run = (output / CHECKPOINTS).is_dir() or (
        output / "adapters.safetensors"
    ).exists()
    if resume and latest_checkpoint(output) is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {output / CHECKPOINTS}; start without --resume"
        )
    if has_run and not (resume or force):
        raise FileExistsError(
            f"{output} already holds a fine-tune; pass --resume to continue it, "
            "--force to start over, or pick another --adapter-path"
        )
    output.mkdir(parents=True, exist_ok=True)


@dataclass
class FuseResult:
    path: Path
    fused_layers: int
    max_logit_diff: float
    bits: str


# A few fixed prompts to compare fused and unfused logits on.
VERIFY_PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def add(a, b):\n    return",
]


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    mlx_path: str | Path,
    *,
    dequantize: bool = False,
    requantize_bits: int | None = 8,
    force: bool = False,
) -> FuseResult:
    """Fold the adapter at ``adapter_path`` into ``model_path``; write ``mlx_path``.

    Args:
        dequantize: write the whole model in float (every quantized layer
            dequantized, adapters folded in).
        requantize_bits: bits for fused layers of a quantized base; None keeps
            the base's bits (which loses most of a small update).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input.
    """
    dst = Path(mlx_path)
    with atomic_output_dir(dst, force=force) as tmp:
        adapted, tokenizer = load(model_path, dtype=None)
        reference, _ = load(model_path, dtype=None)
        load_adapters(adapted, adapter_path)
        load_adapters(reference, adapter_path)
        fused = fuse_model(
            adapted,
            dequantize=dequantize,
            requantize_bits=None if dequantize else requantize_bits,
        )
        if dequantize:
            _dequantize_all(adapted)
        prompts = [tokenizer.encode(p) for p in VERIFY_PROMPTS]
        diff = verify_fuse(reference, adapted, prompts)

        out_config = _config_for(adapted, model_path)
        save_weights(tmp, dict(tree_flatten(adapted.parameters())))
        save_config(tmp, out_config)
        copy_tokenizer(_folder(model_path), tmp)
    bits = (
        "float"
        if dequantize
        else (f"{requantize_bits}-bit" if requantize_bits else "base bits")
    )
    return FuseResult(dst, len(fused), diff, bits)


def _folder(model_path: str | Path) -> Path:
    from .checkpoint import resolve_model_path

    return resolve_model_path(model_path)


def _dequantize_all(model: nn.Module) -> None:
    from .quant import dequantize_layers

    dequantize_layers(model)


def _config_for(model: nn.Module, model_path: str | Path) -> dict[str, Any]:
    """config.json matching the weights as they are now: a quantization entry
    only if quantized layers remain, with each layer's own bits."""
    from .quant import plan_from_config, quantization_config

    source = json.loads((_folder(model_path) / "config.json").read_text())
    config = model.args.to_dict()
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    plan = plan_from_config(model, {})
    if any(spec is not None for spec in plan.values()):
        config["quantization"] = quantization_config(plan)
        config["quantization_config"] = config["quantization"]
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    stored = source.get("torch_dtype")
    if stored not in FLOAT_DTYPES:
        stored = "float16" if mx.float16 in dtypes else "float32"
    config["torch_dtype"] = stored
    return config
