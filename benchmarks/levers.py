"""Measure each CPU speed lever on its own, on SmolLM2-135M's shapes.

Run from the repository root after the suite has built its models (or let
this script build them):

    .venv/bin/python benchmarks/levers.py            # writes benchmarks/LEVERS.md

Every figure is the median of ``--repeat`` runs after one warm-up, with the
project's benchmark harness (``mlxbastion.benchmark``): prompt tokens/s and
generated tokens/s (prompt time excluded), random prompt ids, greedy. Each
lever is switched on and off with everything else at our defaults:

- BLAS: the reference BLAS the mlx wheel links against, or OpenBLAS
  preloaded (a second process, as ``MLXBASTION_BLAS=reference`` gives).
- Compute dtype: float32 (our CPU default), bfloat16 (the stored dtype,
  mlx-lm's default) or float16.
- 4-bit weights: MLX's quantized matmul for every product; a float matmul
  for products of many rows with MLX's kernel for the rest; ours (the same,
  with our AVX2 kernel, ``mlxbastion.kernels``, for fewer than 32 rows); or
  the whole model dequantized at load (``--dequantize``).
- Prompt logits: the output head on every prompt position, or only on the
  last (what generation needs).
- ``mx.async_eval``: building the next decode step while the current one
  runs, or a loop that waits for each token before building the next.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suite import build  # noqa: E402

from mlxbastion import benchmark as bench  # noqa: E402
from mlxbastion import kernels  # noqa: E402
from mlxbastion.checkpoint import load  # noqa: E402
from mlxbastion.generate import generate_step  # noqa: E402

MODEL = "smollm2-135m"


def timed(engine: bench.Engine, spec: bench.RunSpec, repeat: int) -> dict:
    """Median prompt and generation tok/s of ``repeat`` runs after a warm-up."""
    bench.time_run(engine, spec, warmup=True)
    figures = [bench.run_figures(bench.time_run(engine, spec)) for _ in range(repeat)]
    return {
        "pp": statistics.median(f.prompt_tps for f in figures),
        "tg": statistics.median(f.decode_tps for f in figures),
    }


def spec_for(model, prompt_tokens: int, gen_tokens: int) -> bench.RunSpec:
    ids = bench.make_prompts(
        model.args.vocab_size, batch_size=1, prompt_tokens=prompt_tokens, seed=0
    )
    return bench.RunSpec(prompts=mx.array(ids, dtype=mx.int32), gen_tokens=gen_tokens)


def waiting_engine(model) -> bench.Engine:
    """Our model in a loop that evaluates each token before the next step is
    built: no overlap of graph building with computation."""

    def run(spec: bench.RunSpec):
        cache = model.make_cache()

        def steps():
            logits = model(spec.prompts, cache=cache, last_only=True)
            token = mx.argmax(logits[:, -1, :], axis=-1)
            for _ in range(spec.gen_tokens):
                yield [token.item()]
                logits = model(token[:, None], cache=cache)
                token = mx.argmax(logits[:, -1, :], axis=-1)

        return steps(), cache

    return bench.Engine("waiting", model, run)


def all_logits_engine(model) -> bench.Engine:
    """Our generation, but with the output head run on every prompt position."""

    def run(spec: bench.RunSpec):
        cache = model.make_cache()

        def steps():
            logits = model(spec.prompts, cache=cache)
            token = mx.argmax(logits[:, -1, :], axis=-1)
            rest = generate_step(
                token, model, max_tokens=spec.gen_tokens - 1, cache=cache
            )
            yield [token.item()]
            for t, _ in rest:
                yield [t]

        return steps(), cache

    return bench.Engine("all-logits", model, run)


def set_min_rows(model, rows: int) -> None:
    for _, module in model.named_modules():
        if hasattr(module, "min_rows"):
            module.min_rows = rows


def measure_here(folders: dict, prompt: int, gen: int, repeat: int) -> dict:
    results: dict[str, dict] = {}

    def record(name: str, model, engine: Callable = bench.ours) -> None:
        results[name] = timed(engine(model), spec_for(model, prompt, gen), repeat)
        click.echo(f"{name}: {results[name]}", err=True)

    for dtype in ("float32", "bfloat16", "float16"):
        model, _ = load(folders["bf16"], dtype=dtype)
        record(f"dtype {dtype}", model)
        if dtype == "float32":
            record("no async_eval", model, waiting_engine)
            record("all prompt logits", model, all_logits_engine)
        del model
        mx.clear_cache()

    model, _ = load(folders["q4"])
    record("4-bit ours", model)
    applies = kernels.applies
    kernels.applies = lambda layer: False  # MLX's kernel for few rows
    try:
        record("4-bit MLX kernel for few rows", model)
        set_min_rows(model, 1 << 30)
        record("4-bit quantized matmul only", model)
    finally:
        kernels.applies = applies
    del model
    model, _ = load(folders["q4"], dequantize=True)
    record("4-bit dequantized at load", model)
    return results


@click.command()
@click.option("--prompt-tokens", default=128, show_default=True)
@click.option("--gen-tokens", default=32, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--models-dir", default=str(HERE / "models"), show_default=True)
@click.option("--out", default=str(HERE / "LEVERS.md"), show_default=True)
@click.option("--blas-only", is_flag=True, hidden=True)
def main(
    prompt_tokens: int,
    gen_tokens: int,
    repeat: int,
    models_dir: str,
    out: str,
    blas_only: bool,
) -> None:
    """Measure each speed lever with the others at our defaults."""
    from mlxbastion.blas import loaded_blas, reexec_with_openblas

    folders = build(MODEL, Path(models_dir))
    if blas_only:
        model, _ = load(folders["bf16"], dtype="float32")
        spec = spec_for(model, prompt_tokens, gen_tokens)
        figures = timed(bench.ours(model), spec, repeat)
        print(json.dumps({"blas": loaded_blas(), **figures}))
        return
    reexec_with_openblas()

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MLXBASTION_BLAS"] = "reference"
    reference = subprocess.run(
        [sys.executable, __file__, "--blas-only", "--prompt-tokens",
         str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--repeat",
         str(repeat), "--models-dir", models_dir],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    results = {"reference BLAS": json.loads(reference.splitlines()[-1])}
    click.echo(f"reference BLAS: {results['reference BLAS']}", err=True)
    results |= measure_here(folders, prompt_tokens, gen_tokens, repeat)
    results["OpenBLAS"] = results["dtype float32"]
    Path(out).write_text(markdown(results, prompt_tokens, gen_tokens, repeat))
    click.echo(f"wrote {out}", err=True)


# (lever, off, on): rows of the table, each a pair of result names.
LEVERS = [
    ("OpenBLAS preloaded (float32)", "reference BLAS", "OpenBLAS"),
    ("float32 compute instead of bfloat16", "dtype bfloat16", "dtype float32"),
    ("float32 compute instead of float16", "dtype float16", "dtype float32"),
    ("float matmul for many-row products (4-bit)", "4-bit quantized matmul only",
     "4-bit MLX kernel for few rows"),
    ("our AVX2 kernel for few-row products (4-bit)",
     "4-bit MLX kernel for few rows", "4-bit ours"),
    ("dequantize at load (4-bit, --dequantize)", "4-bit ours",
     "4-bit dequantized at load"),
    ("output head on the last prompt position only", "all prompt logits",
     "dtype float32"),
    ("mx.async_eval overlap in the decode loop", "no async_eval", "dtype float32"),
]  # fmt: skip


def markdown(results: dict, prompt: int, gen: int, repeat: int) -> str:
    env = bench.environment()
    lines = [
        "# Speed levers on the CPU backend",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, mlx "
        f"{env['mlx_version']}, {env['device']}; {env['date']}, commit "
        f"{(env['git_commit'] or 'unknown')[:10]}.",
        "",
        f"SmolLM2-135M's configuration with random weights, prompt {prompt} "
        f"tokens, {gen} generated, median of {repeat} runs after a warm-up; "
        "each lever switched with the rest at our defaults (OpenBLAS, float32, "
        "float matmul for many-row products, our kernel for few rows). Made by "
        "`benchmarks/levers.py`.",
        "",
        "| lever | off: pp / tg tok/s | on: pp / tg tok/s | pp effect | tg effect |",
        "|---|---:|---:|---:|---:|",
    ]
    for lever, off, on in LEVERS:
        a, b = results[off], results[on]
        lines.append(
            f"| {lever} | {a['pp']:.1f} / {a['tg']:.2f} | {b['pp']:.1f} / "
            f"{b['tg']:.2f} | {b['pp'] / a['pp']:.2f}x | {b['tg'] / a['tg']:.2f}x |"
        )
    lines += [
        "",
        "Not a lever here: `mx.compile`. The decode step cannot be compiled "
        "once (the KV cache's position changes every step), and compiling "
        "the feed-forward alone gave no measurable change on this backend.",
    ]
    lines += ["", "All measurements:", ""]
    lines += [
        f"- {name}: prompt {r['pp']:.1f} tok/s, generation {r['tg']:.2f} tok/s"
        for name, r in results.items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
