"""Fine-tuning throughput: our trainer beside mlx-lm's ``mlx_lm lora``.

:func:`benchmark_finetune` trains adapters for a few iterations with each
engine and returns one row per fine-tune type and engine: tokens and
iterations per second over the timed iterations, peak memory, trainable
parameters and every setting that shaped the run.

How it is measured, and why:

- Each run is a fresh Python process (``python -m mlxbastion.benchmark_train
  SPEC``), so neither engine inherits the other's allocator cache, compiled
  graphs or patched classes, and each engine's peak memory is its own.
- Ours runs ``finetune.finetune``, the function behind ``mlxbastion
  finetune``. mlx-lm runs ``mlx_lm.lora.main`` on a YAML config, exactly as
  ``mlx_lm.lora --config FILE`` would, with two names in ``mlx_lm.lora``
  wrapped so the worker can listen: its reporting callback (to receive the
  report of every iteration) and ``train`` (to see each batch's lengths and
  count the model's trainable parameters). Nothing in its step is changed.
- Both report every iteration (``steps_per_report: 1``); an iteration's time
  is the engine's own timer, which excludes validation and the report. The
  first ``warmup_iters`` iterations (compilation, first allocations) are
  left out of every figure, for both engines alike.
- Peak memory is ``mx.get_peak_memory()`` in the worker, reset when the
  warm-up ends and read after the last iteration: the steady-state peak of a
  training step, weights, optimizer state and activations included, with
  loading excluded.
- Fairness: the same model folder, data, batch size, maximum sequence length,
  adapted blocks (every linear layer of the last ``num_layers``), rank,
  scale, dropout 0, AdamW with weight decay 0 at a constant learning rate,
  iterations and seed; no gradient checkpointing; validation only where each
  engine insists on it (before the first and after the last iteration, one
  batch, untimed). ``qlora`` first quantizes the model to 4 bits (group 64,
  round to nearest) with our own quantize path, into ``work_dir``, and both
  engines train on that folder.

Token count (``train_tokens``): the tokens of the examples in each batch,
BOS through EOS after truncation to ``max_seq_length``, padding excluded.
This is what mlx-lm's "Tokens/sec" counts (its loss mask covers one position
per example beyond the last real target), so our mlx-lm figure equals its
console's whenever no example is truncated. Our own console counts loss
targets, one fewer per example; both engines' own figures are kept as
``engine_reported_tokens_per_s``.

What still differs between the engines, by design: their batching (mlx-lm
sorts the whole set by length and pads to a multiple of 32 plus one; we
group by length within pools and pad to a multiple of 8), mlx-lm's compiled
step against our uncompiled one, and on the CPU backend the compute dtype of
a half-precision model (we compute in float32, mlx-lm in the stored dtype; a
warning says so). Over a few iterations the two engines also draw different
batches, so give a data set of uniform lengths when the figures must be
compared closely.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

logger = logging.getLogger(__name__)

FINE_TUNE_TYPES = ("lora", "qlora")
ENGINES = ("mlxbastion", "mlx-lm")
QLORA_BITS = 4
QLORA_GROUP_SIZE = 64
QLORA_FOLDER = "qlora-base"

# Fields a row carries whatever the engine; ratio fields come on top.
RATIO_FIELDS = {
    "train_tokens_per_s_ratio": "train_tokens_per_s",
    "iters_per_s_ratio": "iters_per_s",
    "peak_memory_ratio": "peak_memory_gb",
}


def benchmark_finetune(
    model: str | Path,
    data: str | Path,
    *,
    fine_tune_types: str | Sequence[str] = FINE_TUNE_TYPES,
    iters: int = 20,
    warmup_iters: int = 2,
    batch_size: int = 4,
    max_seq_length: int = 2048,
    num_layers: int = 16,
    rank: int = 8,
    scale: float = 20.0,
    learning_rate: float = 1e-5,
    seed: int = 0,
    compare_mlx_lm: bool = False,
    work_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Measure fine-tuning throughput, ours and optionally mlx-lm's.

    See the module docstring for the method. Every row is a plain,
    JSON-serialisable dict:

    - ``engine`` (``"mlxbastion"`` or ``"mlx-lm"``), ``engine_version``,
      ``fine_tune_type``, ``model``, ``data``, ``base_bits`` and
      ``base_group_size`` (None for a float base), ``compute_dtype``,
      ``device``, ``mlx_version``;
    - the settings: ``iters``, ``warmup_iters``, ``timed_iters`` (``iters -
      warmup_iters``), ``batch_size``, ``max_seq_length``, ``num_layers``,
      ``rank``, ``scale``, ``dropout``, ``learning_rate``, ``optimizer``,
      ``weight_decay``, ``grad_checkpoint``, ``seed``;
    - ``trainable_parameters``;
    - over the timed iterations only: ``train_tokens`` (example tokens, BOS
      through EOS after truncation, padding excluded: what mlx-lm's
      "Tokens/sec" counts), ``train_seconds``, ``train_tokens_per_s``,
      ``iters_per_s``, ``peak_memory_gb`` (1e9 bytes, as both engines
      print it) and ``engine_reported_tokens_per_s`` (the engine's own
      count: loss targets for us, mlx-lm's loss mask for mlx-lm);
    - with ``compare_mlx_lm``, on our rows: ``train_tokens_per_s_ratio``,
      ``iters_per_s_ratio`` and ``peak_memory_ratio``, each ours divided by
      mlx-lm's (above 1 means we are faster, or use more memory).

    Args:
        model: a float MLX model folder (or hub id); for ``qlora`` alone it
            may already be quantized, and is then trained as it is.
        data: a folder holding ``train.jsonl`` and ``valid.jsonl`` (the
            validation set is touched only before and after the timed run).
        fine_tune_types: ``"lora"``, ``"qlora"``, both, or a comma-separated
            string of them (``"lora,qlora"``).
        iters: training iterations per run, warm-up included.
        warmup_iters: leading iterations left out of every figure.
        batch_size: examples per iteration.
        max_seq_length: examples are truncated to this many tokens.
        num_layers: adapt the last N blocks (-1: all of them).
        rank: LoRA rank.
        scale: LoRA scale (the update's multiplier).
        learning_rate: AdamW's constant learning rate.
        seed: the data order and adapter initialisation seed.
        compare_mlx_lm: also run mlx-lm's trainer and add ratios.
        work_dir: where the quantized copy, adapters, configs and each run's
            log go; kept afterwards. None: a temporary folder, removed.

    Returns:
        The rows, per fine-tune type ours first, then mlx-lm's.

    Raises:
        ValueError: bad input (missing data files, an unknown fine-tune type,
            out-of-range settings, mlx-lm missing for the comparison).
        FileNotFoundError: the model folder does not exist.
        RuntimeError: a training run failed; the message quotes its log.
    """
    types = _check_types(fine_tune_types)
    data = _check_data(Path(data))
    _check_numbers(iters, warmup_iters, batch_size, max_seq_length, rank, scale)
    _check_learning_rate(learning_rate)
    if compare_mlx_lm:
        _check_mlx_lm()
    from .checkpoint import load_config, resolve_model_path

    folder = resolve_model_path(model)
    config = load_config(folder)
    _check_model(folder, config, types, num_layers)
    # Both engines adapt the same blocks: mlx-lm's trainer refuses more
    # than the model has, so the count is made exact here.
    blocks = config.get("num_hidden_layers")
    if isinstance(blocks, int) and (num_layers > blocks or num_layers <= 0):
        num_layers = blocks
    from .blas import warn_if_reference_blas

    warn_if_reference_blas()

    settings = {
        "iters": iters,
        "warmup_iters": warmup_iters,
        "timed_iters": iters - warmup_iters,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "num_layers": num_layers,
        "rank": rank,
        "scale": float(scale),
        "dropout": 0.0,
        "learning_rate": float(learning_rate),
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "grad_checkpoint": False,
        "seed": seed,
    }
    engines = ENGINES if compare_mlx_lm else ENGINES[:1]
    rows: list[dict[str, Any]] = []
    with _work_folder(work_dir) as work:
        for fine_tune_type in types:
            base, quantization = _base_for(fine_tune_type, folder, config, work)
            stored = _stored_dtype(config)
            type_rows = []
            for engine in engines:
                run_dir = work / f"{fine_tune_type}-{engine}"
                spec = {
                    "engine": engine,
                    "model": str(base),
                    "data": str(data),
                    "adapter_path": str(run_dir / "adapters"),
                    **settings,
                }
                logger.info(
                    "%s with %s: %d iterations (%d warm-up), batch %d",
                    fine_tune_type,
                    engine,
                    iters,
                    warmup_iters,
                    batch_size,
                )
                result = _run_worker(run_dir, spec)
                row = {
                    "engine": engine,
                    "engine_version": result["engine_version"],
                    "fine_tune_type": fine_tune_type,
                    "model": str(model),
                    "data": str(data),
                    "base_bits": quantization and quantization.get("bits"),
                    "base_group_size": quantization and quantization.get("group_size"),
                    "compute_dtype": result["compute_dtype"],
                    **settings,
                    "trainable_parameters": result["trainable_parameters"],
                    **summarize_iterations(result["iterations"], warmup_iters),
                    "peak_memory_gb": result["peak_memory_bytes"] / 1e9,
                    "device": result["device"],
                    "mlx_version": result["mlx_version"],
                }
                logger.info(
                    "%s with %s: %.1f tokens/s, %.3f it/s, peak %.3f GB",
                    fine_tune_type,
                    engine,
                    row["train_tokens_per_s"],
                    row["iters_per_s"],
                    row["peak_memory_gb"],
                )
                type_rows.append(row)
            if compare_mlx_lm:
                _add_ratios(type_rows[0], type_rows[1])
                if type_rows[0]["compute_dtype"] != type_rows[1]["compute_dtype"]:
                    logger.warning(
                        "%s: mlxbastion computes in %s and mlx-lm in %s (the "
                        "model is stored in %s); the comparison mixes dtypes",
                        fine_tune_type,
                        type_rows[0]["compute_dtype"],
                        type_rows[1]["compute_dtype"],
                        stored,
                    )
            rows += type_rows
    return rows


def summarize_iterations(
    iterations: Sequence[dict[str, Any]], warmup_iters: int
) -> dict[str, Any]:
    """Figures over the iterations after the warm-up.

    Args:
        iterations: one dict per iteration, in order: ``iteration`` (from 1),
            ``seconds``, ``tokens`` (example tokens, see the module
            docstring) and ``engine_tokens`` (the engine's own count).
        warmup_iters: how many leading iterations to leave out.

    Returns:
        ``timed_iters``, ``train_tokens``, ``train_seconds``,
        ``train_tokens_per_s``, ``iters_per_s`` and
        ``engine_reported_tokens_per_s``.

    Raises:
        ValueError: no iteration is left after the warm-up, or iterations are
            missing.
    """
    numbers = [it["iteration"] for it in iterations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"expected iterations 1..{len(numbers)}, got {numbers}")
    timed = list(iterations[warmup_iters:])
    if not timed:
        raise ValueError(
            f"no iteration left after {warmup_iters} warm-up iterations; raise --iters"
        )
    seconds = sum(it["seconds"] for it in timed)
    tokens = sum(it["tokens"] for it in timed)
    engine_tokens = sum(it["engine_tokens"] for it in timed)
    return {
        "timed_iters": len(timed),
        "train_tokens": tokens,
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds,
        "iters_per_s": len(timed) / seconds,
        "engine_reported_tokens_per_s": engine_tokens / seconds,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the rows, ratios included when present."""
    from .benchmark import text_table

    if not rows:
        return "no results"
    header = ["type", "engine", "dtype", "bits", "tokens/s", "it/s", "peak GB",
              "trainable"]  # fmt: skip
    compare = any("train_tokens_per_s_ratio" in r for r in rows)
    if compare:
        header += ["tok/s ratio", "memory ratio"]
    cells = []
    for r in rows:
        row = [
            r["fine_tune_type"],
            r["engine"],
            r["compute_dtype"],
            str(r["base_bits"] or "-"),
            f"{r['train_tokens_per_s']:.1f}",
            f"{r['iters_per_s']:.3f}",
            f"{r['peak_memory_gb']:.3f}",
            f"{r['trainable_parameters']:,}",
        ]
        if compare:
            ratio = r.get("train_tokens_per_s_ratio")
            memory = r.get("peak_memory_ratio")
            row += [
                f"{ratio:.2f}x" if ratio else "",
                f"{memory:.2f}x" if memory else "",
            ]
        cells.append(row)
    lines = text_table(header, cells, left=3)
    r = rows[0]
    lines.append(
        f"{r['timed_iters']} timed iterations after {r['warmup_iters']} warm-up, "
        f"batch {r['batch_size']}, rank {r['rank']}, {r['num_layers']} layers, "
        f"max length {r['max_seq_length']}"
        + ("; ratios are ours / mlx-lm" if compare else "")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Checking the input


def _check_types(fine_tune_types: str | Sequence[str]) -> list[str]:
    if isinstance(fine_tune_types, str):
        fine_tune_types = fine_tune_types.split(",")
    types: list[str] = []
    for name in fine_tune_types:
        name = str(name).strip().lower()
        if name not in FINE_TUNE_TYPES:
            raise ValueError(
                f"unknown fine-tune type {name!r} for the benchmark; use lora, "
                "qlora or both (lora,qlora)"
            )
        if name not in types:
            types.append(name)
    if not types:
        raise ValueError("no fine-tune type given; use lora, qlora or lora,qlora")
    return types


def _check_data(data: Path) -> Path:
    if data.is_file():
        raise ValueError(
            f"{data} is a file; give the folder that holds train.jsonl and valid.jsonl"
        )
    if not data.is_dir():
        raise ValueError(
            f"data folder {data} does not exist; give a folder holding "
            "train.jsonl and valid.jsonl"
        )
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise ValueError(
                f"{data} has no {name}; the benchmark trains on train.jsonl and "
                "needs valid.jsonl beside it (one JSON record per line)"
            )
    return data.resolve()


def _check_numbers(
    iters: int,
    warmup_iters: int,
    batch_size: int,
    max_seq_length: int,
    rank: int,
    scale: float,
) -> None:
    if not isinstance(iters, int) or iters < 2:
        raise ValueError(f"--iters must be at least 2, got {iters!r}")
    if not isinstance(warmup_iters, int) or not 1 <= warmup_iters < iters:
        raise ValueError(
            f"--warmup-iters must be between 1 and --iters - 1 ({iters - 1}), got "
            f"{warmup_iters!r}: the first iteration compiles and allocates"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size!r}")
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"--max-seq-length must be at least 2, got {max_seq_length!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {scale!r}")


def _check_learning_rate(learning_rate: float) -> None:
    if not isinstance(learning_rate, (int, float)) or not (
        0 < learning_rate < math.inf
    ):
        raise ValueError(
            f"--learning-rate must be a positive number, got {learning_rate!r}"
        )


def _check_mlx_lm() -> None:
    import importlib.util

    if importlib.util.find_spec("mlx_lm") is None:
        raise ValueError(
            "comparing with mlx-lm needs mlx-lm installed: pip install mlx-lm"
        )


def _check_model(
    folder: Path, config: dict[str, Any], types: list[str], num_layers: int
) -> None:
    if not isinstance(num_layers, int) or num_layers < -1:
        raise ValueError(f"--num-layers must be -1 or more, got {num_layers!r}")
    if config.get("quantization") and "lora" in types:
        raise ValueError(
            f"{folder} is already quantized, so 'lora' would train QLoRA; give "
            "the float model (qlora quantizes it itself), or benchmark qlora only"
        )


def _stored_dtype(config: dict[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype")
    return name if isinstance(name, str) else "float32"


# ---------------------------------------------------------------------------
# Running


@contextmanager
def _work_folder(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        path = Path(work_dir).resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--work-dir {work_dir} is a file; give a folder")
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mlxbastion-bench-") as tmp:
        yield Path(tmp)


def _base_for(
    fine_tune_type: str, folder: Path, config: dict[str, Any], work: Path
) -> tuple[Path, dict[str, Any] | None]:
    """The model folder to train for ``fine_tune_type`` and its quantization
    entry (None for a float base)."""
    if fine_tune_type == "lora":
        return folder.resolve(), None
    if config.get("quantization"):
        logger.info("qlora: %s is already quantized; training it as it is", folder)
        return folder.resolve(), config["quantization"]

    from .quantization import QuantizeOptions, quantize

    target = work / QLORA_FOLDER
    logger.info(
        "qlora: quantizing %s to %d bits (group %d) into %s",
        folder,
        QLORA_BITS,
        QLORA_GROUP_SIZE,
        target,
    )
    options = QuantizeOptions(
        bits=QLORA_BITS, group_size=QLORA_GROUP_SIZE, method="rtn", evaluate=False
    )
    quantize(folder, target, options, force=True)
    written = json.loads((target / "config.json").read_text())
    return target, written["quantization"]


def _run_worker(run_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine in a fresh process; returns its result.json."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {**spec, "result": str(run_dir / "result.json")}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    log_path = run_dir / "worker.log"
    with open(log_path, "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "mlxbastion.benchmark_train", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    result_path = Path(spec["result"])
    if done.returncode != 0 or not result_path.is_file():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        logger.debug("the end of %s:\n%s", log_path, "\n".join(lines[-20:]))
        raise WorkerFailed(
            f"the {spec['engine']} training run failed: {_last_error(lines)} "
            f"(its log: {log_path}, kept with --work-dir)"
        )
    return json.loads(result_path.read_text())


class WorkerFailed(ValueError):
    """A training run of the benchmark failed; the message says why."""


def _last_error(lines: list[str]) -> str:
    """The exception message at the end of a log, without its class name."""
    for line in reversed(lines):
        found = re.match(r"^[\w.]*(Error|Exception): (.*)$", line.strip())
        if found:
            return found.group(2)
    return lines[-1].strip() if lines else "no output"


def _add_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    for name, field in RATIO_FIELDS.items():
        ours[name] = ours[field] / theirs[field] if theirs[field] else None


# ---------------------------------------------------------------------------
# The worker: one engine, one run, in its own process


class _Recorder:
    """Collects one record per iteration and resets the peak memory counter
    when the warm-up ends."""

    def __init__(self, warmup_iters: int) -> None:
        self.warmup_iters = warmup_iters
        self.iterations: list[dict[str, Any]] = []
        self.peak_memory_bytes = 0
        # The engine's cumulative token count at the last report.
        self.engine_total = 0

    def record(
        self, iteration: int, seconds: float, tokens: int, engine_total: int
    ) -> None:
        """One iteration: its time, its example tokens and the engine's
        cumulative count of trained tokens after it."""
        self.iterations.append(
            {
                "iteration": iteration,
                "seconds": seconds,
                "tokens": tokens,
                "engine_tokens": engine_total - self.engine_total,
            }
        )
        self.engine_total = engine_total
        if iteration == self.warmup_iters:
            mx.reset_peak_memory()
        self.peak_memory_bytes = mx.get_peak_memory()


def _run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from . import __version__
    from .checkpoint import default_compute_dtype, load_config
    from .finetune import DataOptions, finetune
    from .lora import LoRAConfig
    from .train import Callbacks, TrainingArgs

    recorder = _Recorder(spec["warmup_iters"])
    prepared = {}
    iters = spec["iters"]
    batch_size = spec["batch_size"]

    def on_report(report) -> None:
        # Our count is loss targets: every token of a text example but its
        # first, so each row adds one to reach the example's tokens.
        targets = report.trained_tokens - recorder.engine_total
        recorder.record(
            report.iteration,
            1.0 / report.iterations_per_second,
            targets + batch_size,
            report.trained_tokens,
        )

    finetune(
        spec["model"],
        spec["data"],
        spec["adapter_path"],
        lora=LoRAConfig(
            fine_tune_type="lora",
            num_layers=spec["num_layers"],
            rank=spec["rank"],
            scale=spec["scale"],
            dropout=spec["dropout"],
        ),
        args=TrainingArgs(
            iters=iters,
            batch_size=batch_size,
            learning_rate=spec["learning_rate"],
            weight_decay=spec["weight_decay"],
            grad_checkpoint=spec["grad_checkpoint"],
            steps_per_report=1,
            steps_per_eval=iters + 1,
            val_batches=1,
            save_every=iters + 1,
            seed=spec["seed"],
        ),
        data_options=DataOptions(
            max_seq_length=spec["max_seq_length"], mask_prompt=False
        ),
        force=True,
        callbacks=Callbacks(on_report=on_report),
        on_prepared=lambda p: prepared.update(trainable=p.trainable),
    )
    compute = default_compute_dtype()
    dtype = (
        str(compute).removeprefix("mlx.core.")
        if compute is not None
        else _stored_dtype(load_config(Path(spec["model"])))
    )
    return {
        "engine_version": __version__,
        "iterations": recorder.iterations,
        "peak_memory_bytes": recorder.peak_memory_bytes,
        "trainable_parameters": prepared["trainable"],
        "compute_dtype": dtype,
    }


def _mlx_lm_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The YAML settings for ``mlx_lm.lora --config`` matching ``spec``."""
    iters = spec["iters"]
    return {
        "model": spec["model"],
        "train": True,
        "test": False,
        "data": spec["data"],
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": spec["weight_decay"]}},
        "seed": spec["seed"],
        "num_layers": spec["num_layers"],
        "batch_size": spec["batch_size"],
        "iters": iters,
        "val_batches": 1,
        "learning_rate": spec["learning_rate"],
        "steps_per_report": 1,
        "steps_per_eval": iters + 1,
        "save_every": iters + 1,
        "adapter_path": spec["adapter_path"],
        "max_seq_length": spec["max_seq_length"],
        "grad_checkpoint": spec["grad_checkpoint"],
        "grad_accumulation_steps": 1,
        "mask_prompt": False,
        "lora_parameters": {
            "rank": spec["rank"],
            "scale": spec["scale"],
            "dropout": spec["dropout"],
        },
    }


def _run_mlx_lm(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx_lm
    import mlx_lm.lora as lora_cli
    import yaml
    from mlx.utils import tree_flatten
    from mlx_lm.tuner import trainer

    config_path = Path(spec["result"]).with_name("mlx_lm_config.yaml")
    config_path.write_text(yaml.safe_dump(_mlx_lm_config(spec), sort_keys=False))
    for name in ("main", "train", "get_reporting_callbacks"):
        if not hasattr(lora_cli, name):
            raise RuntimeError(
                f"mlx_lm.lora {mlx_lm.__version__} has no {name}; this benchmark "
                "knows mlx-lm 0.32"
            )

    recorder = _Recorder(spec["warmup_iters"])
    batch_tokens: list[int] = []
    found: dict[str, Any] = {}
    real_train = lora_cli.train
    real_batches = trainer.iterate_batches

    def recording_batches(*args, **kwargs):
        training = kwargs.get("loop", False)
        for batch, lengths in real_batches(*args, **kwargs):
            if training:
                # Rows are (prompt offset, length after truncation).
                batch_tokens.append(int(sum(row[1] for row in lengths.tolist())))
            yield batch, lengths

    def recording_train(*args, **kwargs):
        model = kwargs["model"]
        found["trainable"] = sum(
            v.size for _, v in tree_flatten(model.trainable_parameters())
        )
        floats = [
            v.dtype
            for _, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating)
        ]
        found["dtype"] = max(set(floats), key=floats.count)
        kwargs["iterate_batches"] = recording_batches
        return real_train(*args, **kwargs)

    class Listener(trainer.TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            iteration = int(info["iteration"])
            recorder.record(
                iteration,
                1.0 / float(info["iterations_per_second"]),
                batch_tokens[iteration - 1],
                int(info["trained_tokens"]),
            )

    lora_cli.train = recording_train
    lora_cli.get_reporting_callbacks = lambda *args, **kwargs: Listener()
    sys.argv = ["mlx_lm.lora", "--config", str(config_path)]
    lora_cli.main()
    return {
        "engine_version": mlx_lm.__version__,
        "iterations": recorder.iterations,
        "peak_memory_bytes": recorder.peak_memory_bytes,
        "trainable_parameters": found["trainable"],
        "compute_dtype": str(found["dtype"]).removeprefix("mlx.core."),
    }


def _worker_main(argv: Sequence[str]) -> None:
    """Entry point of ``python -m mlxbastion.benchmark_train SPEC.json``."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    spec = json.loads(Path(argv[0]).read_text())
    run = _run_ours if spec["engine"] == "mlxbastion" else _run_mlx_lm
    result = run(spec)
    result["device"] = str(mx.default_device())
    result["mlx_version"] = mx.__version__
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
