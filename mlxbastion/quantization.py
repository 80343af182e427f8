"""The quantize job: load a float model, plan bits per layer, calibrate,
quantize, measure what was lost, and write the model with its report.

The report (``quantization_report.json`` in the output folder, and returned)
answers the two questions users quantize for: will it fit (size on disk,
bits per weight, bits per layer, weights plus KV cache against a budget) and
what did it cost (perplexity of the float and the quantized model on
held-out text, and the mean KL divergence between their next-token
distributions; with GPTQ, plain rounding's figures beside them).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml
from mlx.utils import tree_flatten

from .checkpoint import (
    FLOAT_DTYPES,
    atomic_output_dir,
    build_model,
    load_config,
    load_weights,
    resolve_model_path,
    save_config,
    save_weights,
)
from .config import ModelArgs
from .convert import copy_tokenizer
from .model import Model
from .perplexity import compare, make_windows, read_texts
from .quant import (
    Calibration,
    Plan,
    Progress,
    bits_per_weight,
    check_bits,
    data_dir,
    dequantize_layers,
    kv_cache_bytes,
    load_recipe,
    plan_for_budget,
    plan_from_recipe,
    planned_bytes,
    quantization_config,
    quantize_layers,
)
from .tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

REPORT_FILE = "quantization_report.json"


@dataclass
class QuantizeOptions:
    """What to quantize to; see ``quantize`` for each field."""

    bits: int | None = None
    group_size: int | None = None
    recipe: str | None = None
    budget: str | None = None
    device: str | None = None
    context_length: int = 2048
    method: str = "gptq"
    calibration_data: str | None = None
    calibration_tokens: int = 2048
    eval_data: str | None = None
    eval_tokens: int | None = None
    sequence_length: int = 256
    dtype: str | None = None
    from_float: bool = False
    evaluate: bool = True


def parse_size(text: str) -> int:
    """Bytes from "1.5GB", "800MB", "2GiB" or a plain number of bytes.

    Raises:
        ValueError: not a size.
    """
    units = {
        "": 1,
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(
            f"cannot read the size {text!r}; write it like 1.5GB, 800MB or 2GiB"
        )
    return int(float(match.group(1)) * units[match.group(2).lower()])


def device_budget(name: str) -> int:
    """Usable bytes of a device profile from ``quantize/devices.yaml``.

    Raises:
        ValueError: unknown device, naming the known ones.
    """
    devices = yaml.safe_load((data_dir() / "devices.yaml").read_text())
    if name not in devices:
        raise ValueError(
            f"unknown device {name!r}; use one of {', '.join(sorted(devices))}"
        )
    return int(devices[name]["usable_gb"] * 1e9)


def check_options(options: QuantizeOptions) -> None:
    if options.budget and options.device:
        raise ValueError("give either --budget or --device, not both")
    fitting = options.budget or options.device
    if fitting and (options.recipe or options.bits):
        raise ValueError(
            "--budget/--device choose the bits per layer; drop --bits and --recipe"
        )
    check_bits(options.bits or 4, options.group_size or 64)
    if options.method not in ("gptq", "rtn"):
        raise ValueError(f"unknown method {options.method!r}; use gptq or rtn")
    for label, path in (
        ("--eval-data", options.eval_data),
        ("--calibration-data", options.calibration_data),
    ):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{label} file {path} does not exist")
    if options.dtype is not None and options.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}")
    if options.recipe:
        load_recipe(options.recipe)
    if options.budget:
        parse_size(options.budget)
    if options.device:
        device_budget(options.device)


def quantize(
    model_path: str | Path,
    mlx_path: str | Path,
    options: QuantizeOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantize a float model folder into ``mlx_path`` and return the report.

    Args:
        model_path: an MLX or Hugging Face float model folder (or hub id).
        mlx_path: the folder to write; must be absent or empty unless ``force``.
        options: bits, recipe or budget, method and data; defaults to the
            uniform 4-bit recipe with GPTQ and the bundled sample texts.
        force: replace a non-empty ``mlx_path``.
        progress: called as ``progress(stage, done, total)``.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad input.
    """
    options = options or QuantizeOptions()
    check_options(options)
    source = resolve_model_path(model_path)
    with atomic_output_dir(Path(mlx_path), force=force) as tmp:
        return quantize_into(source, tmp, options, progress)


def quantize_into(
    source: Path,
    dst: Path,
    options: QuantizeOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantize the float model folder ``source`` into the empty folder ``dst``
    (no atomic rename: the caller owns ``dst``); returns the report."""
    check_options(options)
    config = load_config(source)
    args = ModelArgs.from_dict(config)
    if args.quantization is not None and not options.from_float:
        raise ValueError(
            f"{source} is already quantized ({args.quantization.get('bits')}-bit); "
            "quantizing it again compounds the error: quantize the original float "
            "model, or pass --from-float to dequantize it first"
        )
    return _quantize_into(source, config, dst, options, progress)


def _quantize_into(
    source: Path,
    config: dict[str, Any],
    tmp: Path,
    options: QuantizeOptions,
    progress: Progress | None,
) -> dict[str, Any]:
    model, _ = build_model(config, load_weights(source))
    store_dtype = options.dtype or _stored_dtype(model, config)
    model.set_dtype(mx.float32)
    if options.from_float:
        count = dequantize_layers(model)
        logger.info("dequantized %d layers of %s", count, source)
    tokenizer = load_tokenizer(source)

    eval_windows = None
    if options.evaluate:
        eval_windows = _windows(tokenizer, options.eval_data, "eval.txt", options)
    stats = None
    if options.method == "gptq" or options.budget or options.device:
        calibration = _windows(
            tokenizer,
            options.calibration_data,
            "calibration.txt",
            options,
            limit=options.calibration_tokens,
        )
        stats = Calibration.collect(model, calibration, progress=progress)

    float_bytes = FLOAT_DTYPES[store_dtype].size
    plan, budget = _plan(model, options, stats, float_bytes)
    store = FLOAT_DTYPES[store_dtype]
    quantized = _quantized_copy(model, plan, options.method, stats, store, progress)
    evaluation = None
    if eval_windows is not None:
        evaluation = _evaluate(
            model, quantized, plan, options, store, eval_windows, progress
        )

    quantized.set_dtype(FLOAT_DTYPES[store_dtype])
    weights = dict(tree_flatten(quantized.parameters()))
    save_weights(tmp, weights)
    out_config = model.args.to_dict()
    out_config["quantization"] = quantization_config(plan)
    out_config["quantization_config"] = out_config["quantization"]
    out_config["torch_dtype"] = store_dtype
    save_config(tmp, out_config)
    copy_tokenizer(source, tmp)

    float_size = planned_bytes(model, dict.fromkeys(plan), float_bytes)
    report = _report(quantized, plan, tmp, options, evaluation, budget, float_size)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _stored_dtype(model: Model, config: dict[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype")
    if name in FLOAT_DTYPES:
        return name
    dtypes = [v.dtype for _, v in tree_flatten(model.parameters())]
    return "float16" if mx.float16 in dtypes else "float32"


def _windows(
    tokenizer: Tokenizer,
    path: str | None,
    default: str,
    options: QuantizeOptions,
    limit: int | None = None,
) -> mx.array:
    texts = read_texts(path or data_dir() / "data" / default, tokenizer)
    limit = limit if limit is not None else options.eval_tokens
    n = None if limit is None else max(1, limit // options.sequence_length)
    return make_windows(
        tokenizer, texts, sequence_length=options.sequence_length, num_windows=n
    )


def _plan(
    model: Model,
    options: QuantizeOptions,
    stats: Calibration | None,
    float_bytes: int,
) -> tuple[Plan, dict[str, Any] | None]:
    if not (options.budget or options.device):
        recipe = load_recipe(options.recipe or "uniform-4")
        plan = plan_from_recipe(
            model, recipe, bits=options.bits, group_size=options.group_size
        )
        return plan, None

    budget = (
        parse_size(options.budget) if options.budget else device_budget(options.device)
    )
    kv_bytes = kv_cache_bytes(model.args, options.context_length, float_bytes=2)
    plan = plan_for_budget(
        model,
        budget,
        stats,
        group_size=options.group_size or 64,
        float_bytes=float_bytes,
        reserved_bytes=kv_bytes,
    )
    weights = planned_bytes(model, plan, float_bytes)
    return plan, {
        "budget_bytes": budget,
        "device": options.device,
        "context_length": options.context_length,
        "kv_cache_bytes": kv_bytes,
        "weights_bytes": weights,
        "total_bytes": weights + kv_bytes,
    }


def _quantized_copy(
    model: Model,
    plan: Plan,
    method: str,
    stats: Calibration | None,
    dtype: mx.Dtype,
    progress: Progress | None,
) -> Model:
    """A second model sharing the float weights, with planned layers quantized
    (scales in ``dtype``) and everything computing in float32."""
    copy = Model(model.args)
    copy.update(model.parameters())
    quantize_layers(
        copy, plan, method=method, stats=stats, dtype=dtype, progress=progress
    )
    copy.set_dtype(mx.float32)
    return copy


def _evaluate(
    model: Model,
    quantized: Model,
    plan: Plan,
    options: QuantizeOptions,
    dtype: mx.Dtype,
    windows: mx.array,
    progress: Progress | None,
) -> dict[str, Any]:
    models = [quantized]
    if options.method == "gptq":
        # Plain rounding on the same plan, to show what calibration bought.
        models.append(_quantized_copy(model, plan, "rtn", None, dtype, None))

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress("evaluating", done, total)

    result, *baseline = compare(model, models, windows, progress=step)
    evaluation = {
        "data": options.eval_data or "bundled sample text",
        "tokens": result.model.tokens,
        "float_perplexity": result.reference.perplexity,
        "float_perplexity_se": result.reference.standard_error,
        "perplexity": result.model.perplexity,
        "perplexity_se": result.model.standard_error,
        "mean_kl": result.mean_kl,
    }
    if baseline:
        evaluation["rtn_perplexity"] = baseline[0].model.perplexity
        evaluation["rtn_mean_kl"] = baseline[0].mean_kl
        if baseline[0].mean_kl < result.mean_kl:
            # Limitation: GPTQ fits the calibration text; with little of it,
            # or text unlike the evaluation text, it can do worse than plain
            # rounding. The report shows both, and this says which won.
            logger.warning(
                "plain rounding came closer to the float model than GPTQ "
                "(KL %.5f against %.5f); rerun with --method rtn, or give "
                "more --calibration-data like your use",
                baseline[0].mean_kl,
                result.mean_kl,
            )
    return evaluation


def _report(
    model: Model,
    plan: Plan,
    folder: Path,
    options: QuantizeOptions,
    evaluation: dict[str, Any] | None,
    budget: dict[str, Any] | None,
    float_size: int,
) -> dict[str, Any]:
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "method": options.method,
        "recipe": None if budget else (options.recipe or "uniform-4"),
        # --bits and --group-size replace the recipe's defaults (its rules
        # keep their own bits); record them so the name is not misread.
        "recipe_overrides": {
            key: value
            for key, value in (
                ("bits", options.bits),
                ("group_size", options.group_size),
            )
            if value is not None and not budget
        },
        "size_bytes": size,
        "float_size_bytes": float_size,
        "bits_per_weight": bits_per_weight(model),
        "layers": {
            path: spec.as_config() if spec else "float"
            for path, spec in sorted(plan.items())
        },
        "kept_float": sorted(p for p, spec in plan.items() if spec is None),
        "budget": budget,
        "evaluation": evaluation,
    }
