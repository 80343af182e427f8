"""The benchmark suite: build random-weight models of real configurations,
benchmark them against mlx-lm, and write RESULTS.md, results.jsonl and a plot.

Run from the repository root after ``make install`` (``make bench`` does both):

    .venv/bin/python benchmarks/suite.py            # the whole suite
    .venv/bin/python benchmarks/suite.py --quick    # a few minutes' check

Models are built once under ``benchmarks/models/`` (git-ignored) from the
configs in ``benchmarks/configs/`` with random weights, stored in bfloat16
as the published checkpoints are, plus 8-bit and 4-bit copies. The tokenizer
comes from ``../shared/tokenizers``; random weights make speed, not text, the
point. Each model runs in its own ``mlxbastion benchmark`` process.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"

# config file -> tokenizer folder in ../shared/tokenizers
MODELS = {
    "smollm2-135m": "smollm2",
    "qwen2.5-0.5b": "qwen2.5",
    "llama-3.2-1b": "llama3.2",
}
VARIANTS = ("bf16", "q8", "q4")


def build_float(name: str, dst: Path) -> None:
    """Random weights in the configuration's shapes, saved in bfloat16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxbastion import Model, ModelArgs
    from mlxbastion.checkpoint import atomic_output_dir, save_config, save_weights

    config = json.loads((HERE / "configs" / f"{name}.json").read_text())
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    with atomic_output_dir(dst, force=True) as tmp:
        save_weights(tmp, dict(tree_flatten(model.parameters())))
        save_config(tmp, config)
        copy_tokenizer(SHARED / "tokenizers" / MODELS[name], tmp)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.name.endswith(".gz"):
            with gzip.open(path) as f, open(dst / path.stem, "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(path, dst / path.name)


def build(name: str, root: Path) -> dict[str, Path]:
    """The model's folders by variant, built where missing."""
    folders = {v: root / f"{name}-{v}" for v in VARIANTS}
    if not (folders["bf16"] / "config.json").exists():
        click.echo(f"building {folders['bf16']}", err=True)
        build_float(name, folders["bf16"])
    for variant, bits in (("q8", 8), ("q4", 4)):
        if not (folders[variant] / "config.json").exists():
            click.echo(f"quantizing {folders[variant]}", err=True)
            mlxbastion(
                "quantize",
                "--model", folders["bf16"],
                "--mlx-path", folders[variant],
                "--bits", bits,
                "--method", "rtn",
                "--no-eval",
                "--force",
            )  # fmt: skip
    return folders


def mlxbastion(*args: object) -> None:
    command = [str(Path(sys.executable).with_name("mlxbastion"))]
    subprocess.run([*command, *map(str, args)], check=True)


def run_part(
    folders: list[Path], dtype: str, out: Path, *, prompts: str, gen: int, repeat: int
) -> list[dict]:
    """One ``mlxbastion benchmark`` process; its rows."""
    part = out.with_suffix(f".{int(time.time() * 1e3)}.part.jsonl")
    mlxbastion(
        "benchmark",
        "--model", ",".join(map(str, folders)),
        "--dtype", dtype,
        "--prompt-tokens", prompts,
        "--gen-tokens", gen,
        "--repeat", repeat,
        "--compare", "mlx-lm",
        "--json", part,
    )  # fmt: skip
    return take_rows(part)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of prompt and generation tok/s, ours beside mlx-lm, row by row."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [
        f"{Path(r['model']).name.rsplit('-', 1)[0]} {weights_label(r)}, "
        f"{r['dtype']} / {r['mlx_lm_dtype']}, prompt {r['prompt_tokens']}"
        for r in rows
    ]
    y = np.arange(len(rows))[::-1]
    figure = Figure(figsize=(13, 1.5 + 0.32 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, (field, title) in zip(
        axes,
        (
            ("prompt_tps_median", "prompt tok/s"),
            ("decode_tps_median", "generation tok/s"),
        ),
        strict=True,
    ):
        ax.barh(y + 0.2, [r[field] for r in rows], 0.4, label="mlxbastion")
        ax.barh(y - 0.2, [r[f"mlx_lm_{field}"] for r in rows], 0.4, label="mlx-lm")
        ax.set_xscale("log")
        ax.set_title(f"{title} (log scale; dtypes: ours / mlx-lm)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize="small")
    axes[1].legend(loc="lower right")
    env = rows[0]
    figure.suptitle(
        f"{env['processor']}, {env['cpu_count']} CPUs, {env['device']}, "
        f"mlx {env['mlx_version']}, mlx-lm {env['mlx_lm_version']}"
    )
    figure.savefig(path, format="png", dpi=90)


def take_rows(part: Path) -> list[dict]:
    """The rows of a part file, which is then removed."""
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    part.unlink()
    return rows


def weights_label(row: dict) -> str:
    if row["bits"]:
        return f"{row['bits']}-bit"
    return "bf16 file"


def markdown(rows: list[dict]) -> str:
    env = rows[0]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, "
        f"{env['ram_gb']:.0f} GB, {env['os']}; mlx {env['mlx_version']}, "
        f"mlx-lm {env['mlx_lm_version']}, backend {env['device']}; BLAS: "
        f"{env['blas']}; memory bandwidth (copy) {env['bandwidth_gbps']:.1f} GB/s; "
        f"commit {env['git_commit'][:10] if env['git_commit'] else 'unknown'}"
        f"{' with uncommitted changes' if env.get('git_dirty') else ''}, "
        f"{env['date']}.",
        "",
        "Random-weight models of the named configurations; prompts of random "
        "token ids (seed 0); greedy; every generated token counted. `pp` is "
        "prompt tokens/s, `tg` generated tokens/s (prompt time excluded), "
        "medians of the timed runs (`runs`) after one warm-up, ours and mlx-lm "
        "alternating in one process. `defaults` rows run each engine's default "
        "compute dtype (ours: float32 on the CPU; mlx-lm: the stored dtype); "
        "`identical` rows run both in the named dtype. Ratios are ours / "
        "mlx-lm. Roofline: our decode's share of the bound set by the "
        "measured bandwidth and the bytes read per token.",
        "",
        "| model | weights | settings | ours dtype | mlx-lm dtype | prompt | gen "
        "| runs | ours pp | ours tg | mlx-lm pp | mlx-lm tg | pp ratio | tg ratio "
        "| roofline (ours) | peak GB (both loaded) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} | {weights_label(r)} | {r['settings']} | "
            f"{r['dtype']} | {r['mlx_lm_dtype']} | {r['prompt_tokens']} | "
            f"{r['gen_tokens']} | {r['repeat']} | "
            f"{r['prompt_tps_median']:.1f} | {r['decode_tps_median']:.2f} | "
            f"{r['mlx_lm_prompt_tps_median']:.1f} | "
            f"{r['mlx_lm_decode_tps_median']:.2f} | {r['prompt_tps_ratio']:.2f}x | "
            f"{r['decode_tps_ratio']:.2f}x | {100 * r['roofline_fraction']:.0f}% | "
            f"{r['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def finetune_markdown(rows: list[dict]) -> str:
    r = rows[0]
    lines = [
        "",
        "## Fine-tuning",
        "",
        f"{Path(r['model']).name} on ../shared/data/wikisql: batch "
        f"{r['batch_size']}, max length {r['max_seq_length']}, rank {r['rank']}, "
        f"last {r['num_layers']} blocks, {r['timed_iters']} timed iterations "
        f"after {r['warmup_iters']} warm-up, each engine in its own process. "
        "Tokens/s counts example tokens, padding excluded. QLoRA trains a 4-bit "
        "(group 64) copy.",
        "",
        "| type | engine | compute dtype | tokens/s | it/s | peak GB | trainable "
        "| tok/s ratio | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("train_tokens_per_s_ratio")
        memory = r.get("peak_memory_ratio")
        lines.append(
            f"| {r['fine_tune_type']} | {r['engine']} | {r['compute_dtype']} | "
            f"{r['train_tokens_per_s']:.0f} | {r['iters_per_s']:.3f} | "
            f"{r['peak_memory_gb']:.3f} | {r['trainable_parameters']:,} | "
            f"{f'{ratio:.2f}x' if ratio else ''} | "
            f"{f'{memory:.2f}x' if memory else ''} |"
        )
    return "\n".join(lines) + "\n"


# What one run of the suite measures: per configuration, parts of
# (variants, dtypes, prompt lengths, generated tokens, timed runs). "auto" is
# each engine's default compute dtype. None for a number: the command line's.
FULL_PLAN = {
    name: [
        (("bf16",), "auto,bfloat16,float32", None, None, None),
        (("q8", "q4"), "auto,float32", None, None, None),
    ]
    for name in MODELS
}
# What this project's 2-core development machine runs in about an hour.
# mlx-lm's default on a quantized bfloat16 model computes the quantized
# matmul in bfloat16, about 1 prompt token/s for SmolLM2-135M here, so those
# rows get short prompts and, for the larger models, only float32.
REDUCED_PLAN = {
    "smollm2-135m": [
        (("bf16",), "auto,bfloat16,float32", "128,512", 128, 1),
        (("q8", "q4"), "auto,float32", "128", 32, 1),
    ],
    "qwen2.5-0.5b": [
        (("bf16",), "auto,bfloat16,float32", "128", 32, 1),
        (("q8", "q4"), "float32", "128", 32, 1),
    ],
    "llama-3.2-1b": [
        (("bf16",), "auto,float32", "128", 32, 1),
        (("q4",), "float32", "128", 32, 1),
    ],
}
FINETUNE_MODEL = "smollm2-135m"


@click.command()
@click.option(
    "--models",
    default=",".join(MODELS),
    show_default=True,
    help="Configurations to run, comma-separated; none for the fine-tuning part alone.",
)
@click.option("--prompt-tokens", default="128,512", show_default=True)
@click.option("--gen-tokens", default=128, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option(
    "--reduced",
    is_flag=True,
    help="Shorter runs where a row would take many minutes on a small CPU "
    "machine (each row records its own settings).",
)
@click.option(
    "--quick", is_flag=True, help="SmolLM2 only, prompt 128, 32 tokens, 1 run."
)
@click.option(
    "--finetune/--no-finetune",
    default=True,
    show_default=True,
    help="Also measure LoRA and QLoRA training against mlx_lm.lora.",
)
@click.option(
    "--out",
    default=str(HERE),
    show_default=True,
    help="Folder for RESULTS.md, results.jsonl and results.png.",
)
@click.option("--models-dir", default=str(HERE / "models"), show_default=True)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the recorded rows of the configurations not run this time.",
)
def main(
    models: str,
    prompt_tokens: str,
    gen_tokens: int,
    repeat: int,
    reduced: bool,
    quick: bool,
    finetune: bool,
    out: str,
    models_dir: str,
    keep: bool,
) -> None:
    """Build the models, benchmark them against mlx-lm, write the results."""
    names = [] if models == "none" else models.split(",")
    plan = REDUCED_PLAN if reduced else FULL_PLAN
    if quick:
        names, prompt_tokens, gen_tokens, repeat = names[:1], "128", 32, 1
        plan, finetune = FULL_PLAN, False
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise click.UsageError(f"unknown model {unknown[0]}; use {', '.join(MODELS)}")
    if not (SHARED / "tokenizers").is_dir():
        raise click.UsageError(f"{SHARED / 'tokenizers'} is missing; see README")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "results.jsonl"

    rows: list[dict] = []
    train_rows: list[dict] = []
    if keep:
        rows, train_rows = recorded(out_dir, names, finetune)
    for name in names:
        folders = build(name, Path(models_dir))
        for variants, dtypes, prompts, gen, runs in plan[name]:
            rows += run_part(
                [folders[v] for v in variants],
                dtypes,
                target,
                prompts=prompts or prompt_tokens,
                gen=gen or gen_tokens,
                repeat=runs or repeat,
            )
            write(rows, train_rows, out_dir)
    if finetune:
        # A float32 copy, so that both trainers compute in float32 (on a
        # bfloat16 model mlx-lm trains in bfloat16, ~20x slower on a CPU).
        folders = build(FINETUNE_MODEL, Path(models_dir))
        float32 = Path(models_dir) / f"{FINETUNE_MODEL}-f32"
        if not (float32 / "config.json").exists():
            mlxbastion(
                "convert",
                "--hf-path", folders["bf16"],
                "--mlx-path", float32,
                "--dtype", "float32",
                "--force",
            )  # fmt: skip
        train_rows = run_finetune(float32, target)
        write(rows, train_rows, out_dir)
    click.echo(f"wrote {out_dir / 'RESULTS.md'} ({len(rows)} rows)", err=True)


def recorded(
    out_dir: Path, names: list[str], finetune: bool
) -> tuple[list[dict], list[dict]]:
    """The rows already in ``out_dir`` that this run does not replace."""

    def read(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    ran = {f"{name}-{v}" for name in names for v in VARIANTS}
    rows = [
        r for r in read(out_dir / "results.jsonl") if Path(r["model"]).name not in ran
    ]
    train_rows = [] if finetune else read(out_dir / "finetune.jsonl")
    return rows, train_rows


def run_finetune(model: Path, out: Path) -> list[dict]:
    """LoRA and QLoRA training speed, ours against mlx_lm.lora."""
    part = out.with_suffix(f".{int(time.time() * 1e3)}.part.jsonl")
    mlxbastion(
        "benchmark-finetune",
        "--model", model,
        "--data", SHARED / "data" / "wikisql",
        "--fine-tune-type", "lora,qlora",
        "--iters", 12,
        "--warmup-iters", 2,
        "--batch-size", 4,
        "--max-seq-length", 256,
        "--num-layers", 16,
        "--compare", "mlx-lm",
        "--json", part,
    )  # fmt: skip
    return take_rows(part)


def write(rows: list[dict], train_rows: list[dict], out_dir: Path) -> None:
    from mlxbastion.benchmark import write_outputs

    order = list(MODELS)
    rows = sorted(
        rows, key=lambda r: order.index(Path(r["model"]).name.rsplit("-", 1)[0])
    )
    write_outputs(rows, json_path=str(out_dir / "results.jsonl"))
    plot(rows, out_dir / "results.png")
    if train_rows:
        write_outputs(train_rows, json_path=str(out_dir / "finetune.jsonl"))
    text = markdown(rows) + (finetune_markdown(train_rows) if train_rows else "")
    (out_dir / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
