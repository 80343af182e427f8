"""Generation benchmark: prompt and decode speed, memory and the roofline.

``run_benchmark`` sweeps every combination of model, dtype, prompt length,
batch size and KV cache bits, as llama-bench does, and returns one row of
plain data per combination. Each row carries the environment (machine, OS,
versions, backend, BLAS, git commit) so a file of rows says where it was
measured.

How a row is measured:

- The prompt is ``batch_size`` sequences of random token ids in
  ``[0, vocab)`` from ``numpy.random.default_rng(seed)``; every repeat and
  both engines get the same ids.
- Generation is greedy and always produces exactly ``gen_tokens`` tokens
  (end-of-sequence tokens do not stop it): one sequence goes through
  ``generate_step``; several go through ``batched_greedy`` below.
- Every token is on the host (evaluated) before the clock is read. A run
  records three timestamps: its start, the first token (the end of prefill,
  also the time to first token) and the last token. ``run_figures`` turns
  them into speeds: prompt tok/s is ``batch * prompt_tokens`` over the
  prefill time; decode tok/s is ``batch * (gen_tokens - 1)`` over the time
  from the first token to the last, since the first token belongs to the
  prompt phase.
- Warm-up runs come first and are left out; ``summarize`` reports the
  median, minimum and maximum over the timed repeats.
- Peak memory is ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``,
  so it includes the weights (and, when comparing, the other engine's).
- The roofline: the machine's memory bandwidth is measured once per process
  (``measure_bandwidth``), and ``decode_bytes_per_token`` counts what one
  decode step reads per sequence: every weight once (shared by the batch),
  one embedding row per sequence for an untied table, and the KV cache at the
  decode phase's mean context length. The bound is bandwidth over those
  bytes.
- ``compare="mlx-lm"`` loads the same folder with mlx-lm and runs its
  generation on the same ids, alternating engines repeat by repeat, and
  reports ours over theirs.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import kernels
from .blas import cpu_backend, warn_if_reference_blas
from .cache import KV_BITS, kv_cache_bytes, kv_group_size_for
from .config import ModelArgs

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPARE_ENGINES = ("mlx-lm",)
OURS = "mlxbastion"
MLX_LM = "mlx-lm"
# The KV group size asked for; a head_dim it does not divide gets the
# largest of 64 and 32 that does (``kv_group_size_for``), on both engines.
KV_GROUP_SIZE = 64
BANDWIDTH_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------------------
# Options


def parse_int_list(text: str, option: str, *, minimum: int = 1) -> list[int]:
    """``"128,512"`` as ``[128, 512]``.

    Raises:
        ValueError: an empty list, an item that is not an integer, or one
            below ``minimum``, naming the option and the item.
    """
    items = [item.strip() for item in str(text).split(",")]
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise ValueError(
                f"{option} takes comma-separated integers like 128,512; "
                f"{item!r} is not an integer"
            ) from None
        if value < minimum:
            raise ValueError(f"{option} values must be at least {minimum}; got {value}")
        values.append(value)
    return values


def parse_kv_bits(text: str) -> list[int | None]:
    """``"none,8,4"`` as ``[None, 8, 4]``.

    Raises:
        ValueError: an item other than none, 4 or 8.
    """
    values: list[int | None] = []
    for item in (item.strip().lower() for item in str(text).split(",")):
        if item == "none":
            values.append(None)
        elif item in {str(b) for b in KV_BITS}:
            values.append(int(item))
        else:
            raise ValueError(
                f"--kv-bits takes none, 4 or 8 (comma-separated); got {item!r}"
            )
    return values


def parse_dtypes(text: str) -> list[str]:
    """``"auto,float16"`` as a list, each one of ``DTYPES``.

    Raises:
        ValueError: an unknown dtype.
    """
    values = [item.strip().lower() for item in str(text).split(",")]
    for value in values:
        if value not in DTYPES:
            raise ValueError(
                f"--dtype takes {', '.join(DTYPES)} (comma-separated); got {value!r}"
            )
    return values


def parse_models(text: str) -> list[str]:
    """Comma-separated model folders (or hub repo ids).

    Raises:
        ValueError: an empty item.
    """
    models = [item.strip() for item in str(text).split(",")]
    if not all(models):
        raise ValueError("--model has an empty item; give folders separated by commas")
    return models


@dataclass
class BenchmarkOptions:
    """What to sweep and how to measure it (the CLI's flags).

    Attributes:
        models: model folders (or hub repo ids).
        prompt_tokens: prompt lengths, the context of the decode phase.
        gen_tokens: tokens generated per sequence, the first included.
        batch_sizes: sequences generated together.
        kv_bits: KV cache bits, None for an unquantized cache.
        dtypes: "auto" or a float dtype, as ``load`` takes it.
        repeat: timed runs per combination and engine.
        warmup: untimed runs before them.
        seed: seed of the random prompt ids.
        prefill_step_size: prompt tokens per prefill chunk.
        compare: "mlx-lm" to run mlx-lm too, or None.
        dequantize: load our model with quantized layers dequantized (see
            ``load``); mlx-lm's stays as stored.
    """

    models: list[str]
    prompt_tokens: list[int] = field(default_factory=lambda: [128, 512, 2048])
    gen_tokens: int = 128
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    kv_bits: list[int | None] = field(default_factory=lambda: [None])
    dtypes: list[str] = field(default_factory=lambda: ["auto"])
    repeat: int = 5
    warmup: int = 1
    seed: int = 0
    prefill_step_size: int = 512
    compare: str | None = None
    dequantize: bool = False

    def check(self) -> None:
        """Refuse settings no model could run.

        Raises:
            ValueError: naming the setting and what to give instead.
        """
        if not self.models:
            raise ValueError("give at least one model with --model")
        for name, values in (
            ("--prompt-tokens", self.prompt_tokens),
            ("--batch-size", self.batch_sizes),
        ):
            if not values or min(values) < 1:
                raise ValueError(f"{name} values must be positive integers")
        if self.gen_tokens < 2:
            raise ValueError(
                "--gen-tokens must be at least 2: the first token ends the prompt "
                "phase, decode speed is measured over the ones after it"
            )
        if self.repeat < 1:
            raise ValueError(f"--repeat must be at least 1; got {self.repeat}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 or more; got {self.warmup}")
        if self.seed < 0:
            raise ValueError(f"--seed must be 0 or more; got {self.seed}")
        if self.prefill_step_size < 1:
            raise ValueError("--prefill-step-size must be at least 1")
        for bits in self.kv_bits:
            if bits is not None and bits not in KV_BITS:
                raise ValueError(f"--kv-bits takes none, 4 or 8; got {bits}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"--dtype takes {', '.join(DTYPES)}; got {dtype!r}")
        if self.compare is not None and self.compare not in COMPARE_ENGINES:
            raise ValueError(f"--compare takes only mlx-lm; got {self.compare!r}")


def parse_options(
    *,
    model: str,
    prompt_tokens: str = "128,512,2048",
    batch_size: str = "1",
    kv_bits: str = "none",
    dtype: str = "auto",
    **settings: Any,
) -> BenchmarkOptions:
    """Options from the CLI's flags: the lists as comma-separated text, the
    other settings (``gen_tokens``, ``repeat``, ...) as they are.

    Raises:
        ValueError: as the ``parse_*`` functions and ``BenchmarkOptions.check``.
    """
    options = BenchmarkOptions(
        models=parse_models(model),
        prompt_tokens=parse_int_list(prompt_tokens, "--prompt-tokens"),
        batch_sizes=parse_int_list(batch_size, "--batch-size"),
        kv_bits=parse_kv_bits(kv_bits),
        dtypes=parse_dtypes(dtype),
        **settings,
    )
    options.check()
    return options


def check_outputs(
    *,
    json_path: str | None = None,
    csv_path: str | None = None,
    plot_path: str | None = None,
) -> None:
    """Refuse output paths that could not be written, before anything runs.

    Raises:
        ValueError: a plot not ending in .png, a folder given as a file, a
            missing parent folder, or the same file given twice.
    """
    if plot_path is not None and not plot_path.lower().endswith(".png"):
        raise ValueError(
            f"--plot writes a PNG; give a file ending in .png, not {plot_path!r}"
        )
    given = [
        (flag, p)
        for flag, p in (
            ("--json", json_path),
            ("--csv", csv_path),
            ("--plot", plot_path),
        )
        if p is not None
    ]
    seen: dict[Path, str] = {}
    for flag, text in given:
        path = Path(text).expanduser()
        if path.is_dir():
            raise ValueError(f"{flag} {text} is a folder; give a file name")
        if not path.parent.is_dir():
            raise ValueError(
                f"{flag} {text}: folder {path.parent} does not exist; create it first"
            )
        resolved = path.resolve()
        if resolved in seen:
            raise ValueError(f"{flag} and {seen[resolved]} name the same file {text}")
        seen[resolved] = flag


# ---------------------------------------------------------------------------
# Accounting: raw runs in, figures out


@dataclass(frozen=True)
class RunTiming:
    """What one run measured: clock readings (``time.perf_counter``) and counts.

    Attributes:
        engine: "mlxbastion" or "mlx-lm".
        warmup: a warm-up run, left out of the summary.
        batch_size: sequences generated together.
        prompt_tokens: prompt length of each sequence.
        gen_tokens: tokens generated per sequence, the first included.
        start: before the prompt went in.
        first_token: when the first generated tokens were on the host.
        last_token: when the last ones were.
        peak_memory_bytes: ``mx.get_peak_memory()`` over the run.
        start_memory_bytes: ``mx.get_active_memory()`` before it.
        kv_itemsize: bytes per number of the KV cache's float arrays (the
            keys, or a quantized cache's scales), as the run left them.
        tokens: the generated ids, one list of ``batch_size`` per step.
    """

    engine: str
    warmup: bool
    batch_size: int
    prompt_tokens: int
    gen_tokens: int
    start: float
    first_token: float
    last_token: float
    peak_memory_bytes: int = 0
    start_memory_bytes: int = 0
    kv_itemsize: int = 4
    tokens: list[list[int]] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class RunFigures:
    """Speeds of one run (see ``run_figures``)."""

    prefill_s: float
    ttft_s: float
    prompt_tps: float
    decode_s: float
    decode_tps: float


def run_figures(run: RunTiming) -> RunFigures:
    """Speeds from one run's timestamps.

    The prefill lasts from the start to the first token (that is also the time
    to first token): prompt tok/s is ``batch * prompt_tokens`` over it. Decode
    lasts from the first token to the last and produced the ``gen_tokens - 1``
    tokens after the first, per sequence: decode tok/s is ``batch *
    (gen_tokens - 1)`` over it.

    Raises:
        ValueError: fewer than 2 generated tokens, or clocks out of order.
    """
    if run.gen_tokens < 2:
        raise ValueError("a run needs at least 2 generated tokens to time decoding")
    prefill = run.first_token - run.start
    decode = run.last_token - run.first_token
    if prefill <= 0 or decode <= 0:
        raise ValueError(
            f"clock readings out of order: start {run.start}, first token "
            f"{run.first_token}, last token {run.last_token}"
        )
    return RunFigures(
        prefill_s=prefill,
        ttft_s=prefill,
        prompt_tps=run.batch_size * run.prompt_tokens / prefill,
        decode_s=decode,
        decode_tps=run.batch_size * (run.gen_tokens - 1) / decode,
    )


def summarize(runs: list[RunTiming]) -> dict[str, float]:
    """Median, minimum and maximum of each speed over the timed runs.

    Warm-up runs are left out. Memory is the largest peak of the timed runs;
    ``run_memory_gb`` is the most a run added on top of what was allocated
    when it started (its KV cache and activations).

    Returns:
        ``prompt_tps_*``, ``decode_tps_*`` and ``ttft_s_*`` with suffixes
        ``median``, ``min``, ``max``, plus ``peak_memory_gb``,
        ``run_memory_gb`` and ``runs`` (the number summarized).

    Raises:
        ValueError: no timed run.
    """
    timed = [r for r in runs if not r.warmup]
    if not timed:
        raise ValueError("no timed runs to summarize (only warm-up runs)")
    figures = [run_figures(r) for r in timed]
    out: dict[str, float] = {}
    for name in ("prompt_tps", "decode_tps", "ttft_s"):
        values = [getattr(f, name) for f in figures]
        out[f"{name}_median"] = statistics.median(values)
        out[f"{name}_min"] = min(values)
        out[f"{name}_max"] = max(values)
    out["peak_memory_gb"] = max(r.peak_memory_bytes for r in timed) / 1e9
    out["run_memory_gb"] = (
        max(r.peak_memory_bytes - r.start_memory_bytes for r in timed) / 1e9
    )
    out["runs"] = len(timed)
    return out


# ---------------------------------------------------------------------------
# The roofline


def weight_bytes_per_step(model: nn.Module, batch_size: int = 1) -> int:
    """Bytes of parameters one decode step of ``batch_size`` sequences reads.

    Every parameter is read once per step (the batch shares it): each
    Linear's or QuantizedLinear's weight, scales and biases, the norms, the
    output head. A tied head reads the whole embedding table as the head; an
    untied embedding table is only looked up, one row per sequence.
    """
    tied = not any(
        name.split(".")[-1] == "lm_head" for name, _ in model.named_modules()
    )
    total = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    if tied:
        return total
    for _, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            table = [p for _, p in tree_flatten(module.parameters())]
            rows = module.weight.shape[0]
            total -= sum(p.nbytes for p in table)
            total += batch_size * sum(p.nbytes // rows for p in table)
    return total


def mean_decode_context(prompt_tokens: int, gen_tokens: int) -> float:
    """Mean number of cached tokens a decode step attends to.

    Decode step ``k`` (1 to ``gen_tokens - 1``) feeds the ``k``-th generated
    token and attends to ``prompt_tokens + k`` keys; the mean is
    ``prompt_tokens + gen_tokens / 2``.
    """
    return prompt_tokens + gen_tokens / 2


def decode_bytes_per_token(
    model: nn.Module,
    args: ModelArgs,
    *,
    prompt_tokens: int,
    gen_tokens: int,
    batch_size: int = 1,
    kv_bits: int | None = None,
    kv_group_size: int = KV_GROUP_SIZE,
    kv_itemsize: int = 4,
) -> float:
    """Bytes read from memory per generated token during decoding.

    A step reads ``weight_bytes_per_step`` once for the batch, and each
    sequence's keys and values at the decode phase's mean context length
    (``kv_cache_bytes``); divided by the batch size.

    Args:
        model: the model whose parameters are counted (either engine's).
        args: its architecture (layers, kv heads, head_dim).
        prompt_tokens, gen_tokens: the run's lengths.
        batch_size: sequences decoded together.
        kv_bits, kv_group_size: the KV cache's quantization, None for none.
        kv_itemsize: bytes per number of the cache's keys (or scales).
    """
    per_token_kv = kv_cache_bytes(
        args, 1, kv_bits=kv_bits, kv_group_size=kv_group_size, dtype_bytes=kv_itemsize
    )
    kv = per_token_kv * mean_decode_context(prompt_tokens, gen_tokens)
    step = weight_bytes_per_step(model, batch_size) + batch_size * kv
    return step / batch_size


_bandwidth: float | None = None


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """The memory bandwidth in bytes per second, measured once per process.

    Copies a float32 array of ``nbytes`` ``repeats`` times after one warm-up
    copy and takes the fastest, as bytes read plus written over the time (a
    busy machine only slows copies down, so the fastest is the memory's). On
    the CPU backend numpy does the copy: MLX's element-wise kernels are not
    vectorized there and would measure the kernel, not the memory. On a GPU
    an evaluated MLX copy measures the device's memory. Later calls return
    the first measurement.
    """
    global _bandwidth
    if _bandwidth is None:
        if cpu_backend():
            src = np.ones(nbytes // 4, dtype=np.float32)
            dst = np.empty_like(src)

            def copy() -> None:
                np.copyto(dst, src)

        else:
            x = mx.ones((nbytes // 4,), dtype=mx.float32)
            mx.eval(x)

            def copy() -> None:
                mx.eval(x + 1)

        times = []
        for n in range(repeats + 1):
            tic = time.perf_counter()
            copy()
            if n:
                times.append(time.perf_counter() - tic)
        _bandwidth = 2 * (nbytes // 4 * 4) / min(times)
        mx.clear_cache()
        logger.info("memory bandwidth: %.1f GB/s", _bandwidth / 1e9)
    return _bandwidth


# ---------------------------------------------------------------------------
# Environment


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Where the benchmark runs: machine, OS, versions, backend, BLAS, commit."""
    ram = _total_ram()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": _processor(),
        "cpu_count": os.cpu_count(),
        "ram_gb": ram / 1e9 if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx_version": _version("mlx"),
        "mlx_lm_version": _version("mlx-lm"),
        "mlxbastion_version": _version("mlxbastion"),
        "device": str(mx.default_device()),
        "metal_available": bool(mx.metal.is_available()),
        "cuda_available": bool(mx.cuda.is_available()),
        "blas": _blas(),
        "cpu_quantized_kernel": _quantized_kernel(),
        **_git(),
    }


def _quantized_kernel() -> str | None:
    """Which kernel multiplies quantized weights by a few rows on the CPU."""
    if not cpu_backend():
        return None
    return "mlxbastion-avx2" if kernels.load() is not None else "mlx"


def _processor() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    return platform.processor() or None


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _blas() -> str | None:
    """The BLAS and LAPACK libraries mapped into this process, grouped by the
    package that brought them (mlx's are the ones its matrix products use);
    Linux only, as /proc/self/maps is."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "Accelerate" if sys.platform == "darwin" else None
    owners: dict[str, set[str]] = {}
    for line in maps.splitlines():
        if "/" not in line:
            continue
        path = line[line.index("/") :]
        name = path.rsplit("/", 1)[-1]
        if not any(k in name.lower() for k in ("blas", "lapack", "mkl")):
            continue
        # Wheels name bundled libraries like libblas-bd8a282c.so.3; drop the hash.
        name = re.sub(r"-[0-9a-f]{8}(?=\.so)", "", name)
        owner = next(
            (p for p in ("mlx", "numpy", "scipy", "torch") if f"/{p}" in path),
            "other",
        )
        owners.setdefault(owner, set()).add(name)
    return (
        "; ".join(
            f"{owner}: {', '.join(sorted(names))}"
            for owner, names in sorted(owners.items())
        )
        or None
    )


def _git() -> dict[str, Any]:
    """The commit of the checkout this package runs from, if it is one."""
    root = Path(__file__).resolve().parents[1]
    top = _run(["git", "-C", str(root), "rev-parse", "--show-toplevel"])
    if (
        top is None
        or Path(top).resolve() != root
        or not (root / "pyproject.toml").exists()
    ):
        return {"git_commit": None, "git_dirty": None}
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    status = _run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]
    )
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---------------------------------------------------------------------------
# Running generation


def make_prompts(
    vocab_size: int, *, batch_size: int, prompt_tokens: int, seed: int
) -> np.ndarray:
    """Random prompt ids, shape ``(batch_size, prompt_tokens)``, in ``[0, vocab)``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(batch_size, prompt_tokens))


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def batched_greedy(
    model: nn.Module,
    prompts: mx.array,
    *,
    cache: list,
    gen_tokens: int,
    prefill_step_size: int = 512,
    after_call: Callable[[list], None] | None = None,
) -> Iterator[list[int]]:
    """Greedy generation for a batch of equal-length prompts.

    Yields the ``B`` new tokens of each step as host integers, exactly
    ``gen_tokens`` times. The prompt goes in chunks of ``prefill_step_size``;
    each step's graph is queued (``mx.async_eval``) before the previous
    step's tokens are fetched, as ``generate_step`` does for one sequence.

    Args:
        model: called as ``model(tokens, cache=cache)`` with ``(B, L)`` ids.
        prompts: ``(B, P)`` ids.
        cache: the model's per-layer cache, updated in place.
        gen_tokens: tokens to generate per sequence.
        prefill_step_size: prompt tokens per chunk.
        after_call: called with the cache after every model call (mlx-lm
            quantizes its cache there).
    """

    def next_tokens(tokens: mx.array) -> mx.array:
        logits = model(tokens, cache=cache)
        if after_call is not None:
            after_call(cache)
        return _greedy(logits[:, -1, :])

    while prompts.shape[1] > prefill_step_size:
        # Only the cache is evaluated: the chunk's logits are never needed.
        model(prompts[:, :prefill_step_size], cache=cache)
        if after_call is not None:
            after_call(cache)
        mx.eval([c.state for c in cache])
        prompts = prompts[:, prefill_step_size:]

    token = next_tokens(prompts)
    mx.async_eval(token)
    for n in range(gen_tokens):
        if n + 1 < gen_tokens:
            following = next_tokens(token[:, None])
            mx.async_eval(following)
        yield token.tolist()
        if n + 1 < gen_tokens:
            token = following


@dataclass(frozen=True)
class RunSpec:
    """One combination's inputs: what every run of it gets."""

    prompts: mx.array  # (batch_size, prompt_tokens)
    gen_tokens: int
    kv_bits: int | None = None
    kv_group_size: int = KV_GROUP_SIZE
    prefill_step_size: int = 512

    @property
    def batch_size(self) -> int:
        return self.prompts.shape[0]

    @property
    def prompt_tokens(self) -> int:
        return self.prompts.shape[1]


# An engine's generation: a stream of per-step tokens (not yet started) and
# the cache it fills.
Runner = Callable[[RunSpec], tuple[Iterator[list[int]], list]]


@dataclass
class Engine:
    """A loaded model and how to generate with it.

    Attributes:
        name: "mlxbastion" or "mlx-lm".
        model: the model.
        run: starts a generation for a ``RunSpec``.
    """

    name: str
    model: nn.Module
    run: Runner


def ours(model: nn.Module) -> Engine:
    """Our model: ``generate_step`` for one sequence, ``batched_greedy`` for more."""
    from .generate import generate_step

    def run(spec: RunSpec) -> tuple[Iterator[list[int]], list]:
        cache = model.make_cache(kv_bits=spec.kv_bits, kv_group_size=spec.kv_group_size)
        if spec.batch_size > 1:
            stream = batched_greedy(
                model,
                spec.prompts,
                cache=cache,
                gen_tokens=spec.gen_tokens,
                prefill_step_size=spec.prefill_step_size,
            )
            return stream, cache
        steps = generate_step(
            spec.prompts[0],
            model,
            max_tokens=spec.gen_tokens,
            cache=cache,
            prefill_step_size=spec.prefill_step_size,
        )
        return ([token] for token, _ in steps), cache

    return Engine(OURS, model, run)


def mlx_lm_engine(model: nn.Module) -> Engine:
    """mlx-lm's model: its ``generate_step`` for one sequence, with the cache
    quantized from the first token (``quantized_kv_start=0``) when asked; for
    more, ``batched_greedy`` on its ``make_prompt_cache``, quantized the same
    way."""
    from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    def run(spec: RunSpec) -> tuple[Iterator[list[int]], list]:
        cache = make_prompt_cache(model)
        quantize = dict(kv_group_size=spec.kv_group_size, kv_bits=spec.kv_bits)
        if spec.batch_size > 1:
            stream = batched_greedy(
                model,
                spec.prompts,
                cache=cache,
                gen_tokens=spec.gen_tokens,
                prefill_step_size=spec.prefill_step_size,
                after_call=lambda c: maybe_quantize_kv_cache(c, 0, **quantize),
            )
            return stream, cache
        steps = generate_step(
            spec.prompts[0],
            model,
            max_tokens=spec.gen_tokens,
            sampler=_greedy,
            prompt_cache=cache,
            prefill_step_size=spec.prefill_step_size,
            quantized_kv_start=0,
            **quantize,
        )
        return ([token] for token, _ in steps), cache

    return Engine(MLX_LM, model, run)


def time_run(engine: Engine, spec: RunSpec, *, warmup: bool = False) -> RunTiming:
    """Run ``engine`` on ``spec`` once and read the clock around it.

    Every token the stream yields is a host integer, so the computation
    behind it is done when the clock is read.

    Raises:
        RuntimeError: the engine produced a different number of tokens.
    """
    stream, cache = engine.run(spec)
    mx.reset_peak_memory()
    start_memory = mx.get_active_memory()
    tokens: list[list[int]] = []
    start = time.perf_counter()
    first = last = start
    for step in stream:
        last = time.perf_counter()
        first = first if tokens else last
        tokens.append(step)
        if len(tokens) == spec.gen_tokens:
            break
    peak = mx.get_peak_memory()
    for _ in stream:  # let the generator finish, outside the timing
        pass

    if len(tokens) != spec.gen_tokens:
        raise RuntimeError(
            f"{engine.name} produced {len(tokens)} tokens instead of {spec.gen_tokens}"
        )
    return RunTiming(
        engine=engine.name,
        warmup=warmup,
        batch_size=spec.batch_size,
        prompt_tokens=spec.prompt_tokens,
        gen_tokens=len(tokens),
        start=start,
        first_token=first,
        last_token=last,
        peak_memory_bytes=peak,
        start_memory_bytes=start_memory,
        kv_itemsize=_kv_itemsize(cache),
        tokens=tokens,
    )


def _kv_itemsize(cache: list) -> int:
    keys = cache[0].keys
    if isinstance(keys, (tuple, list)):
        return keys[1].itemsize  # the scales of (codes, scales, biases)
    return keys.itemsize


def float_dtypes(model: nn.Module) -> str | None:
    """The floating dtypes of the model's parameters, e.g. "float32" or
    "float16+float32" (quantized codes are not floats and do not count)."""
    names = {
        str(p.dtype).split(".")[-1]
        for _, p in tree_flatten(model.parameters())
        if mx.issubdtype(p.dtype, mx.floating)
    }
    return "+".join(sorted(names)) or None


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all the model's parameters."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


# ---------------------------------------------------------------------------
# The sweep


@dataclass
class ModelInfo:
    """What the sweep knows about a model before loading its weights."""

    name: str
    path: Path
    config: dict[str, Any]
    args: ModelArgs

    @property
    def bits(self) -> int | None:
        return (self.config.get("quantization") or {}).get("bits")

    @property
    def group_size(self) -> int | None:
        return (self.config.get("quantization") or {}).get("group_size")


def check_models(options: BenchmarkOptions) -> list[ModelInfo]:
    """Read each model's config and refuse a sweep it cannot run.

    Raises:
        FileNotFoundError: a model that does not exist.
        ValueError: a malformed or unsupported config, prompt plus generated
            tokens beyond the model's context, or KV bits its head_dim cannot
            take.
    """
    from .checkpoint import check_supported, load_config, resolve_model_path

    infos = []
    longest = max(options.prompt_tokens) + options.gen_tokens
    for name in options.models:
        path = resolve_model_path(name)
        if path.is_file():
            raise ValueError(
                f"{name} is a file; convert it first with "
                f"'mlxbastion convert --hf-path {name} --mlx-path DST'"
            )
        config = load_config(path)
        args = check_supported(config, path)
        if longest > args.max_position_embeddings:
            raise ValueError(
                f"{name}: {max(options.prompt_tokens)} prompt tokens plus "
                f"{options.gen_tokens} generated tokens ({longest}) exceed the "
                f"model's context of {args.max_position_embeddings}; lower "
                "--prompt-tokens or --gen-tokens"
            )
        if any(bits is not None for bits in options.kv_bits):
            try:
                kv_group_size_for(args.head_dim, KV_GROUP_SIZE)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        infos.append(ModelInfo(name, path, config, args))
    return infos


def load_engines(
    info: ModelInfo, *, dtype: str, compare: str | None, dequantize: bool = False
) -> list[Engine]:
    """Our model loaded with ``dtype``, and mlx-lm's when comparing.

    mlx-lm keeps the stored dtype when ``dtype`` is "auto"; otherwise its
    float parameters are cast to ``dtype`` by the rules our loader follows.
    """
    from .checkpoint import FLOAT_DTYPES, cast_floats, load

    logger.info("loading %s (dtype %s)", info.name, dtype)
    model, _ = load(info.path, dtype=dtype, dequantize=dequantize)
    engines = [ours(model)]
    if compare == MLX_LM:
        import mlx_lm

        # Limitation: both engines' models stay loaded together for the whole
        # comparison, so a model that fits in memory once but not twice
        # cannot be compared; benchmark it without --compare.
        logger.info("loading %s with mlx-lm", info.name)
        theirs, _ = mlx_lm.load(str(info.path))
        if dtype != "auto":
            cast_floats(theirs, FLOAT_DTYPES[dtype])
        mx.eval(theirs.parameters())
        engines.append(mlx_lm_engine(theirs))
    return engines


def run_benchmark(
    options: BenchmarkOptions, *, bandwidth: float | None = None
) -> list[dict[str, Any]]:
    """Run the sweep and return one row per combination.

    Every setting and model is checked before anything loads. Combinations
    run in the order model, dtype, prompt tokens, batch size, KV bits.

    Args:
        options: the sweep.
        bandwidth: memory bandwidth in bytes per second; measured with
            ``measure_bandwidth`` when None.

    Returns:
        Rows of plain data: the environment, the settings, our figures and,
        when comparing, mlx-lm's (prefixed ``mlx_lm_``) and the ratios.

    Raises:
        FileNotFoundError, ValueError: as ``BenchmarkOptions.check`` and
            ``check_models``.
    """
    options.check()
    infos = check_models(options)
    warn_if_reference_blas()
    bandwidth = bandwidth or measure_bandwidth()
    combos = list(
        itertools.product(options.prompt_tokens, options.batch_sizes, options.kv_bits)
    )
    progress = _Progress(
        len(infos) * len(options.dtypes) * len(combos), options=options
    )

    rows = []
    for info in infos:
        for dtype in options.dtypes:
            engines = load_engines(
                info,
                dtype=dtype,
                compare=options.compare,
                dequantize=options.dequantize,
            )
            for prompt_tokens, batch_size, kv_bits in combos:
                spec = _spec(info, options, prompt_tokens, batch_size, kv_bits)
                runs = measure(engines, spec, options=options, progress=progress)
                rows.append(_row(info, options, spec, dtype, engines, runs, bandwidth))
            del engines
            mx.clear_cache()
    return rows


def _spec(
    info: ModelInfo,
    options: BenchmarkOptions,
    prompt_tokens: int,
    batch_size: int,
    kv_bits: int | None,
) -> RunSpec:
    ids = make_prompts(
        info.args.vocab_size,
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        seed=options.seed,
    )
    prompts = mx.array(ids, dtype=mx.int32)
    mx.eval(prompts)
    group = KV_GROUP_SIZE
    if kv_bits is not None:
        group = kv_group_size_for(info.args.head_dim, KV_GROUP_SIZE)
    return RunSpec(
        prompts=prompts,
        gen_tokens=options.gen_tokens,
        kv_bits=kv_bits,
        kv_group_size=group,
        prefill_step_size=options.prefill_step_size,
    )


class _Progress:
    """Logs each run at INFO, numbered out of the whole sweep."""

    def __init__(self, combinations: int, *, options: BenchmarkOptions) -> None:
        engines = 2 if options.compare else 1
        self.total = combinations * engines * (options.warmup + options.repeat)
        self.done = 0

    def __call__(self, run: RunTiming, spec: RunSpec, label: str) -> None:
        self.done += 1
        figures = run_figures(run)
        logger.info(
            "[%d/%d] %s prompt %d batch %d kv %s, %s: "
            "prompt %.1f tok/s, decode %.1f tok/s",
            self.done, self.total, run.engine, spec.prompt_tokens,
            spec.batch_size, spec.kv_bits or "none", label,
            figures.prompt_tps, figures.decode_tps,
        )  # fmt: skip


def measure(
    engines: list[Engine],
    spec: RunSpec,
    *,
    options: BenchmarkOptions,
    progress: Callable[[RunTiming, RunSpec, str], None] | None = None,
) -> dict[str, list[RunTiming]]:
    """Warm-up runs for each engine first, then the engines alternately,
    repeat by repeat, so that drift in the machine's speed hits both alike.

    Returns:
        Each engine's runs, warm-ups included (marked), by engine name.
    """
    schedule = [
        (engine, True, f"warm-up {n + 1}/{options.warmup}")
        for engine in engines
        for n in range(options.warmup)
    ]
    schedule += [
        (engine, False, f"run {n + 1}/{options.repeat}")
        for n in range(options.repeat)
        for engine in engines
    ]
    runs: dict[str, list[RunTiming]] = {engine.name: [] for engine in engines}
    for engine, warmup, label in schedule:
        run = time_run(engine, spec, warmup=warmup)
        runs[engine.name].append(run)
        if progress is not None:
            progress(run, spec, label)
    return runs


def engine_figures(
    engine: Engine,
    runs: list[RunTiming],
    *,
    args: ModelArgs,
    spec: RunSpec,
    bandwidth: float,
) -> dict[str, Any]:
    """One engine's summary plus its dtype, weights and roofline figures."""
    summary = summarize(runs)
    del summary["runs"]
    per_token = decode_bytes_per_token(
        engine.model,
        args,
        prompt_tokens=spec.prompt_tokens,
        gen_tokens=spec.gen_tokens,
        batch_size=spec.batch_size,
        kv_bits=spec.kv_bits,
        kv_group_size=spec.kv_group_size,
        kv_itemsize=runs[-1].kv_itemsize,
    )
    bound = bandwidth / per_token
    return {
        "dtype": float_dtypes(engine.model),
        **summary,
        "weights_gb": model_weight_bytes(engine.model) / 1e9,
        "decode_bytes_per_token": per_token,
        "decode_bound_tps": bound,
        "roofline_fraction": summary["decode_tps_median"] / bound,
    }


def _row(
    info: ModelInfo,
    options: BenchmarkOptions,
    spec: RunSpec,
    dtype: str,
    engines: list[Engine],
    runs: dict[str, list[RunTiming]],
    bandwidth: float,
) -> dict[str, Any]:
    row = {
        **environment(),
        "model": info.name,
        "model_path": str(info.path),
        "model_type": info.args.model_type,
        "dtype_setting": dtype,
        "dequantize": options.dequantize,
        "bits": info.bits,
        "group_size": info.group_size,
        "kv_bits": spec.kv_bits,
        "kv_group_size": spec.kv_group_size if spec.kv_bits else None,
        "prompt_tokens": spec.prompt_tokens,
        "gen_tokens": spec.gen_tokens,
        "batch_size": spec.batch_size,
        "repeat": options.repeat,
        "warmup": options.warmup,
        "seed": options.seed,
        "prefill_step_size": spec.prefill_step_size,
        "bandwidth_gbps": bandwidth / 1e9,
        "engine": OURS,
    }
    figures = [
        engine_figures(e, runs[e.name], args=info.args, spec=spec, bandwidth=bandwidth)
        for e in engines
    ]
    row.update(figures[0])
    if options.compare:
        row["compare"] = MLX_LM
        row["settings"] = "defaults" if dtype == "auto" else "identical"
        row.update({f"mlx_lm_{k}": v for k, v in figures[1].items()})
        for name in ("prompt_tps", "decode_tps"):
            row[f"{name}_ratio"] = row[f"{name}_median"] / row[f"mlx_lm_{name}_median"]
        # Greedy tokens of the last timed runs: do both engines compute the
        # same thing? (Rounding can flip a near tie without anything wrong.)
        row["greedy_tokens_match"] = runs[OURS][-1].tokens == runs[MLX_LM][-1].tokens
    return row


# ---------------------------------------------------------------------------
# Output


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows' medians, and a line on the machine."""
    if not rows:
        return "no results"
    compare = "compare" in rows[0]
    header = _TABLE_HEADER + (_COMPARE_HEADER if compare else [])
    cells = [_table_cells(r, compare=compare) for r in rows]
    lines = text_table(header, cells, left=2)

    r = rows[0]
    lines.append(
        f"{r['processor'] or r['machine']}, {r['cpu_count']} CPUs, {r['device']}, "
        f"mlx {r['mlx_version']}, bandwidth {r['bandwidth_gbps']:.1f} GB/s; "
        f"medians of {r['repeat']} runs after {r['warmup']} warm-up, "
        f"{r['gen_tokens']} generated tokens"
    )
    if compare:
        lines.append(
            "ratios are ours / mlx-lm; dtype auto runs each engine's default "
            "dtype, a named dtype runs both in it"
        )
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]], *, left: int) -> list[str]:
    """Lines of a plain-text table: the first ``left`` columns aligned left,
    the rest right, a rule under the header."""
    table = [header, *rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


_TABLE_HEADER = ["model", "dtype", "bits", "kv", "prompt", "batch", "pp tok/s",
                 "tg tok/s", "TTFT ms", "peak GB", "roofline"]  # fmt: skip
_COMPARE_HEADER = ["mlx-lm dtype", "mlx-lm pp", "mlx-lm tg", "pp ratio", "tg ratio"]


def _table_cells(r: dict[str, Any], *, compare: bool) -> list[str]:
    cells = [
        model_label(r["model"]),
        r["dtype"],
        str(r["bits"] or "-"),
        str(r["kv_bits"] or "-"),
        str(r["prompt_tokens"]),
        str(r["batch_size"]),
        f"{r['prompt_tps_median']:.1f}",
        f"{r['decode_tps_median']:.1f}",
        f"{r['ttft_s_median'] * 1e3:.1f}",
        f"{r['peak_memory_gb']:.3f}",
        f"{r['roofline_fraction']:.0%}",
    ]
    if compare:
        cells += [
            r["mlx_lm_dtype"],
            f"{r['mlx_lm_prompt_tps_median']:.1f}",
            f"{r['mlx_lm_decode_tps_median']:.1f}",
            f"{r['prompt_tps_ratio']:.2f}x",
            f"{r['decode_tps_ratio']:.2f}x",
        ]
    return cells


def model_label(name: str, width: int = 28) -> str:
    """A short name for tables and plots: the folder's name, with its parent's
    when the name alone says little ("stories260K/hf"), cut from the left to
    ``width`` characters."""
    path = Path(name)
    label = path.name or name
    if len(label) <= 4 and path.parent.name:
        label = f"{path.parent.name}/{label}"
    return label if len(label) <= width else "..." + label[-(width - 3) :]


def write_outputs(
    rows: list[dict[str, Any]],
    *,
    json_path: str | None = None,
    csv_path: str | None = None,
    plot_path: str | None = None,
) -> list[Path]:
    """Write JSON Lines, CSV and a PNG plot of the rows, all or nothing.

    Each file is written under a temporary name beside its destination; only
    when all are written are they renamed into place.

    Returns:
        The paths written.
    """
    writers = [
        (json_path, _write_jsonl),
        (csv_path, _write_csv),
        (plot_path, _write_plot),
    ]
    staged: list[tuple[Path, Path]] = []
    try:
        for text, writer in writers:
            if text is None:
                continue
            path = Path(text).expanduser()
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
            staged.append((tmp, path))
            writer(rows, tmp)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    return [path for _, path in staged]


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(_finite(row)) + "\n")


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(_finite(row))


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in row.items()
    }


def plot_lines(rows: list[dict[str, Any]]) -> dict[tuple, list[tuple]]:
    """The plot's lines, by (model, dtype setting, dtype, bits, kv bits,
    batch, engine): points (prompt tokens, decode tok/s, prompt tok/s), sorted
    by prompt tokens."""
    lines: dict[tuple, list[tuple]] = {}
    for r in rows:
        sides = [(OURS, "")] + ([(MLX_LM, "mlx_lm_")] if "compare" in r else [])
        for engine, prefix in sides:
            key = (
                model_label(r["model"], 24), r["dtype_setting"], r[f"{prefix}dtype"],
                r["bits"], r["kv_bits"], r["batch_size"], engine,
            )  # fmt: skip
            point = (
                r["prompt_tokens"],
                r[f"{prefix}decode_tps_median"],
                r[f"{prefix}prompt_tps_median"],
            )
            lines.setdefault(key, []).append(point)
    return {key: sorted(points) for key, points in lines.items()}


def _write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = plot_lines(rows)
    # The legend goes under the plots, two entries a row; the figure grows
    # with it so the plots keep their size.
    figure = Figure(figsize=(11, 4.5 + 0.2 * math.ceil(len(lines) / 2)))
    figure.set_layout_engine("constrained")
    FigureCanvasAgg(figure)
    decode_ax, prompt_ax = figure.subplots(1, 2)
    # One colour per configuration; the engines differ in line and marker.
    colours: dict[tuple, str] = {}
    for key, points in lines.items():
        model, setting, dtype, bits, kv, batch, engine = key
        colour = colours.setdefault(key[:2] + key[3:6], f"C{len(colours) % 10}")
        label = (
            f"{model} {dtype}"
            + (f" {bits}-bit" if bits else "")
            + (f" kv{kv}" if kv else "")
            + (f" B={batch}" if batch > 1 else "")
            + f" ({engine})"
        )
        ours_line = engine == OURS
        style = dict(
            color=colour,
            marker="o" if ours_line else "s",
            linestyle="-" if ours_line else "--",
            label=label,
        )
        x = [p[0] for p in points]
        decode_ax.plot(x, [p[1] for p in points], **style)
        prompt_ax.plot(x, [p[2] for p in points], **style)
    _style_axes(rows, decode_ax, prompt_ax)
    figure.legend(
        *decode_ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=2,
        fontsize="small",
    )
    r = rows[0]
    generated = {row["gen_tokens"] for row in rows}
    figure.suptitle(
        f"{r['processor'] or r['machine']}, {r['device']}, mlx {r['mlx_version']}, "
        + (
            f"{r['gen_tokens']} generated tokens"
            if len(generated) == 1
            else f"{min(generated)}-{max(generated)} generated tokens"
        ),
        fontsize="medium",
    )
    figure.savefig(path, format="png", dpi=100)


def _style_axes(rows: list[dict[str, Any]], decode_ax, prompt_ax) -> None:
    xs = sorted({r["prompt_tokens"] for r in rows})
    for ax, phase in ((decode_ax, "decode"), (prompt_ax, "prompt (prefill)")):
        if len(xs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_ylabel(f"{phase} tok/s")
        ax.set_title(f"{phase} speed")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
