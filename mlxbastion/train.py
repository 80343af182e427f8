"""The training loop for adapters and full fine-tuning.

Each optimizer step sums the token losses of ``grad_accumulation_steps``
batches (and, under ``mx.distributed``, of every rank's share of them), then
divides by the number of target tokens, so one process with batch B, K
accumulation steps or N ranks splitting the batch all take the same step.

Everything a run depends on is a function of the step number: the batches
(``data.loop_batches``), the dropout randomness (seeded with ``seed + step``)
and the learning rate (the optimizer's own step counter). A checkpoint
stores the trainable weights, the optimizer state and the step, so a run
resumed from it continues exactly as the uninterrupted one would have.

The loop never prints: it reports through callbacks, and the CLI renders.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .data import Batch, Dataset, loop_batches

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class TrainingArgs:
    """Optimisation settings; defaults follow mlx-lm's where they mean the same."""

    iters: int = 1000
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "iters": self.iters,
            "batch_size": self.batch_size,
            "grad_accumulation_steps": self.grad_accumulation_steps,
            "steps_per_report": self.steps_per_report,
            "steps_per_eval": self.steps_per_eval,
            "save_every": self.save_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {value}"
                )
        if not self.learning_rate > 0:
            raise ValueError(
                f"--learning-rate must be positive, got {self.learning_rate}"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"unknown --lr-schedule {self.lr_schedule!r}; use constant or cosine"
            )
        if self.warmup < 0 or self.warmup >= self.iters and self.warmup:
            raise ValueError(
                f"--warmup must be between 0 and --iters - 1, got {self.warmup}"
            )


@dataclass
class Report:
    """One training report line: the averages since the previous report."""

    iteration: int
    train_loss: float
    learning_rate: float
    iterations_per_second: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory_gb: float
    val_loss: float | None = None


@dataclass
class Validation:
    iteration: int
    val_loss: float
    seconds: float


@dataclass
class Callbacks:
    on_report: Callable[[Report], None] = lambda report: None
    on_validation: Callable[[Validation], None] = lambda validation: None
    on_step: Callable[[int, int], None] = lambda step, total: None
    on_save: Callable[[int, Path], None] = lambda step, path: None


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def make_schedule(args: TrainingArgs) -> optim.schedulers.Callable | float:
    """Warm-up from 0 (linear), then constant or cosine decay to 0 at ``iters``."""
    peak = args.learning_rate
    if args.lr_schedule == "constant":
        main: Any = lambda step: mx.array(peak, mx.float32)  # noqa: E731
    else:
        main = optim.cosine_decay(peak, max(args.iters - args.warmup, 1), 0.0)
    if args.warmup == 0:
        return main
    warmup = optim.linear_schedule(0.0, peak, args.warmup)
    return optim.join_schedules([warmup, main], [args.warmup])


def loss_sum(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the batch's target tokens, and their count."""
    logits = model(batch.tokens[:, :-1]).astype(mx.float32)
    targets = batch.tokens[:, 1:]
    mask = batch.loss_mask.astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none") * mask
    return losses.sum(), mask.sum()


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_batches: int = -1,
    seed: int = 0,
) -> float:
    """Mean loss per target token over ``num_batches`` batches (-1: all)."""
    world = mx.distributed.init()
    total_loss, total_tokens = mx.array(0.0), mx.array(0.0)
    batches = len(dataset) // batch_size
    n = batches if num_batches < 0 else min(num_batches, batches)
    for i, batch in zip(
        range(n), loop_batches(dataset, batch_size, seed=seed), strict=False
    ):
        loss, tokens = loss_sum(model, _shard(batch, world))
        total_loss, total_tokens = total_loss + loss, total_tokens + tokens
        if i % 8 == 7:
            mx.eval(total_loss, total_tokens)
    if world.size() > 1:
        total_loss = mx.distributed.all_sum(total_loss)
        total_tokens = mx.distributed.all_sum(total_tokens)
    return (total_loss / mx.maximum(total_tokens, 1)).item()


def _shard(batch: Batch, world: Any) -> Batch:
    """This rank's rows of a global batch."""
    if world.size() == 1:
        return batch
    rows = slice(world.rank(), None, world.size())
    return Batch(
        batch.tokens[rows], batch.loss_mask[rows], batch.lengths[rows], batch.indices
    )


@contextmanager
def gradient_checkpointing(model: nn.Module) -> Iterator[None]:
    """Recompute each block's activations in the backward pass instead of
    keeping them: less memory for about a third more compute."""
    block_type = type(model.layers[0])
    original = block_type.__call__

    def checkpointed(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return original(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    block_type.__call__ = checkpointed
    try:
        yield
    finally:
        block_type.__call__ = original


# ---------------------------------------------------------------------------
# Checkpoints


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: optim.Optimizer, step: int, meta: dict
) -> Path:
    """Write ``checkpoints/step_NNNNNNN`` atomically; keep the last three."""
    root = folder / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "weights.safetensors"), trainable_weights(model))
    state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), state)
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-3]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    complete = [
        p
        for p in sorted((folder / CHECKPOINTS).glob("step_*"))
        if (p / "state.json").is_file()
    ]
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: optim.Optimizer
) -> dict[str, Any]:
    """Restore weights and optimizer state; returns the saved state.json."""
    model.load_weights(str(path / "weights.safetensors"), strict=False)
    state = mx.load(str(path / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(state.items()))
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float
    final_val_loss: float | None
    trained_tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    args: TrainingArgs,
    *,
    output: Path,
    save: Callable[[Path], None],
    resume: bool = False,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``train_set``.

    Args:
        model: the model, with adapters applied or layers unfrozen.
        train_set: training examples.
        valid_set: validation examples, or None to skip validation.
        args: optimisation settings.
        output: the adapter folder; checkpoints go in ``output/checkpoints``.
        save: writes the final (or latest good) trainable weights to a folder.
        resume: continue from the latest checkpoint in ``output``.
        callbacks: report, validation, progress and save hooks.

    Raises:
        TrainingDiverged: the loss became NaN or infinite; the last good
            adapter on disk is left as it was.
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    callbacks = callbacks or Callbacks()
    world = mx.distributed.init()
    if args.batch_size % world.size():
        raise ValueError(
            f"--batch-size {args.batch_size} must divide by the {world.size()} ranks"
        )
    optimizer = optim.AdamW(
        learning_rate=make_schedule(args), weight_decay=args.weight_decay
    )
    step, trained_tokens = 0, 0
    if resume:
        checkpoint = latest_checkpoint(output)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {output / CHECKPOINTS}; start without "
                "--resume"
            )
        state = load_checkpoint(checkpoint, model, optimizer)
        step, trained_tokens = state["step"], state.get("trained_tokens", 0)
        logger.info("resuming from %s at step %d", checkpoint, step)

    loss_and_grad = nn.value_and_grad(model, loss_sum)

    def micro_step(batch: Batch) -> tuple[mx.array, mx.array, Any]:
        (loss, tokens), grads = loss_and_grad(model, _shard(batch, world))
        return loss, tokens, grads

    def optimizer_step(batches: list[Batch]) -> tuple[mx.array, mx.array]:
        total_loss, total_tokens, total_grads = mx.array(0.0), mx.array(0.0), None
        for batch in batches:
            loss, tokens, grads = micro_step(batch)
            total_loss, total_tokens = total_loss + loss, total_tokens + tokens
            total_grads = (
                grads if total_grads is None else tree_map(mx.add, total_grads, grads)
            )
        if world.size() > 1:
            total_grads = tree_map(mx.distributed.all_sum, total_grads)
            total_loss = mx.distributed.all_sum(total_loss)
            total_tokens = mx.distributed.all_sum(total_tokens)
        scale = 1.0 / mx.maximum(total_tokens, 1)
        optimizer.update(model, tree_map(lambda g: g * scale, total_grads))
        return total_loss * scale, total_tokens

    def validate(at: int) -> float | None:
        if valid_set is None:
            return None
        tic = time.perf_counter()
        val_loss = evaluate(
            model, valid_set, batch_size=args.batch_size, num_batches=args.val_batches
        )
        callbacks.on_validation(Validation(at, val_loss, time.perf_counter() - tic))
        return val_loss

    batches = loop_batches(
        train_set,
        args.batch_size,
        seed=args.seed,
        step=step * args.grad_accumulation_steps,
    )
    history: list[dict[str, Any]] = []
    window_loss, window_tokens, window_steps = 0.0, 0, 0
    val_loss, train_loss = None, math.nan
    mx.reset_peak_memory()

    with gradient_checkpointing(model) if args.grad_checkpoint else _nothing():
        model.train()
        if step == 0:
            model.eval()
            val_loss = validate(0)
            model.train()
        tic = time.perf_counter()
        while step < args.iters:
            # Dropout draws depend only on the step, so resuming replays them.
            mx.random.seed(args.seed + step)
            group = [next(batches) for _ in range(args.grad_accumulation_steps)]
            loss, tokens = optimizer_step(group)
            mx.eval(loss, tokens, model.trainable_parameters(), optimizer.state)
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"the training loss became {loss_value} at step {step}; lower "
                    "--learning-rate (the last saved adapter is kept)"
                )
            window_loss += loss_value
            window_tokens += int(tokens.item())
            window_steps += 1
            trained_tokens += int(tokens.item())
            callbacks.on_step(step, args.iters)

            # Validate first, so a report on the same step can carry it.
            validated = None
            if step % args.steps_per_eval == 0 or step == args.iters:
                paused = time.perf_counter()
                model.eval()
                validated = val_loss = validate(step)
                model.train()
                if val_loss is not None:
                    history.append({"iteration": step, "val_loss": val_loss})
                # Validation time does not count against training speed.
                tic += time.perf_counter() - paused

            if step % args.steps_per_report == 0 or step == args.iters:
                elapsed = time.perf_counter() - tic
                train_loss = window_loss / window_steps
                report = Report(
                    iteration=step,
                    train_loss=train_loss,
                    learning_rate=float(optimizer.learning_rate.item()),
                    iterations_per_second=window_steps / elapsed,
                    tokens_per_second=window_tokens / elapsed,
                    trained_tokens=trained_tokens,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    val_loss=validated,
                )
                history.append(asdict(report))
                callbacks.on_report(report)
                window_loss, window_tokens, window_steps = 0.0, 0, 0
                tic = time.perf_counter()

            if step % args.save_every == 0 and step < args.iters and world.rank() == 0:
                meta = {"seed": args.seed, "trained_tokens": trained_tokens}
                path = save_checkpoint(output, model, optimizer, step, meta)
                save(output)
                callbacks.on_save(step, path)
        model.eval()

    if world.rank() == 0:
        meta = {"seed": args.seed, "trained_tokens": trained_tokens}
        save_checkpoint(output, model, optimizer, step, meta)
        save(output)
    return TrainResult(step, train_loss, val_loss, trained_tokens, history)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
