"""The ``mlxbastion`` command line: parse, call the library, render.

Every command is a thin layer over a library function of the same name. Bad
input raised by the library as ValueError, FileNotFoundError and the like
becomes a one-line ``error:`` message and exit status 1; ``--verbose`` shows
the traceback instead. Generated text goes to stdout, everything else to
stderr. Heavy imports happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    NotImplementedError,
    PermissionError,
)


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return record.getMessage()


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logger = logging.getLogger("mlxbastion")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False
    # The one-time kernel build takes seconds: say so rather than hang.
    kernel_logger = logging.getLogger("mlxbastion.kernels")
    kernel_logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _user_errors(command):
    """Turn library exceptions into one-line errors with a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        verbose = ctx.find_root().params.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            if verbose:
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            # Start a fresh line if generated text was left mid-line.
            click.echo(
                "\ninterrupted" if sys.stdout.isatty() else "interrupted", err=True
            )
            sys.exit(130)

    return wrapper


class _OneLineErrors(click.Group):
    """Report click's own usage errors (an unknown option, a value out of
    range) as one ``error:`` line, like every other bad input."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            message = " ".join(e.format_message().split())
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(e.exit_code)


@click.group(
    cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--verbose", "-v", is_flag=True, help="Show debug logs and tracebacks.")
@click.version_option(package_name="mlxbastion", prog_name="mlxbastion")
def main(verbose: bool) -> None:
    """Private, on-device LLMs on MLX: convert, quantize, generate, fine-tune
    and benchmark models on your own machine."""
    _setup_logging(verbose)


def run() -> None:
    """The console script: restart with OpenBLAS preloaded where that makes
    the CPU's matmuls faster (see ``mlxbastion.blas``), then run ``main``."""
    from .blas import reexec_with_openblas

    reexec_with_openblas()
    main()


class _StageBar:
    """One tqdm bar per stage of a long job, shown only on a terminal."""

    def __init__(self) -> None:
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(desc=stage, total=total, file=sys.stderr, disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _quantize_options(f):
    """The options `quantize` and `convert -q` share."""
    for option in reversed(
        [
            click.option(
                "--recipe", help="A recipe name from quantize/recipes or a YAML file."
            ),
            click.option(
                "--budget", help="Fit weights plus KV cache in this size, e.g. 1.5GB."
            ),
            click.option(
                "--device", help="Fit a device profile from quantize/devices.yaml."
            ),
            click.option(
                "--context-length",
                default=2048,
                show_default=True,
                type=click.IntRange(min=1),
                help="KV cache length counted against --budget/--device.",
            ),
            click.option(
                "--method",
                type=click.Choice(["gptq", "rtn"]),
                default="gptq",
                show_default=True,
                help="GPTQ (calibrated) or plain round-to-nearest.",
            ),
            click.option("--calibration-data", help="Text or JSONL for calibration."),
            click.option(
                "--calibration-tokens",
                default=2048,
                show_default=True,
                type=click.IntRange(min=1),
            ),
            click.option("--eval-data", help="Held-out text or JSONL for the report."),
            click.option(
                "--eval-tokens",
                type=click.IntRange(min=1),
                help="Evaluate on at most this many tokens (default: the whole file).",
            ),
            click.option(
                "--sequence-length",
                default=256,
                show_default=True,
                type=click.IntRange(min=1),
                help="Window length for calibration and evaluation.",
            ),
            click.option(
                "--no-eval",
                "no_eval",
                is_flag=True,
                help="Skip the perplexity and KL measurement (sizes only).",
            ),
        ]
    ):
        f = option(f)
    return f


def _echo_quant_report(report: dict, path: str) -> None:
    bits = sorted(
        {
            (v["bits"], v["group_size"])
            for v in report["layers"].values()
            if v != "float"
        }
    )
    click.echo(f"Saved quantized model to {path}", err=True)
    click.echo(
        f"Size: {report['size_bytes'] / 1e6:.2f} MB on disk "
        f"(float: {report['float_size_bytes'] / 1e6:.2f} MB), "
        f"{report['bits_per_weight']:.3f} bits per weight",
        err=True,
    )
    click.echo(
        "Layers: "
        + ", ".join(f"{b}-bit g{g}" for b, g in bits)
        + (
            f"; {len(report['kept_float'])} kept in float"
            if report["kept_float"]
            else ""
        ),
        err=True,
    )
    for path_ in report["kept_float"]:
        click.echo(f"  float: {path_}", err=True)
    if report["budget"]:
        from .quant import format_bytes as size

        b = report["budget"]
        click.echo(
            f"Budget: {size(b['total_bytes'])} of {size(b['budget_bytes'])} "
            f"(weights {size(b['weights_bytes'])} + KV cache "
            f"{size(b['kv_cache_bytes'])} at {b['context_length']} tokens)",
            err=True,
        )
    evaluation = report["evaluation"]
    if evaluation is None:
        return
    click.echo(
        f"Perplexity on {evaluation['tokens']} tokens of {evaluation['data']}: "
        f"float {evaluation['float_perplexity']:.4f}, "
        f"{report['method']} {evaluation['perplexity']:.4f} "
        f"(KL {evaluation['mean_kl']:.5f})",
        err=True,
    )
    if "rtn_perplexity" in evaluation:
        click.echo(
            f"Plain rounding for comparison: {evaluation['rtn_perplexity']:.4f} "
            f"(KL {evaluation['rtn_mean_kl']:.5f})",
            err=True,
        )


def _options_from(cls, kwargs: dict):
    kwargs["evaluate"] = not kwargs.pop("no_eval", False)
    for key in ("bits", "group_size"):
        if kwargs.get(key) is not None:
            kwargs[key] = int(kwargs[key])
    return cls(**kwargs)


@main.command()
@click.option(
    "--hf-path",
    required=True,
    help="Source: a Hugging Face folder, a hub repo id, or a .gguf file.",
)
@click.option(
    "--mlx-path",
    default="mlx_model",
    show_default=True,
    help="Folder to write the MLX model to.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Cast float weights to this type (default: keep the checkpoint's).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --mlx-path.")
@click.option("-q", "--quantize", "q", is_flag=True, help="Quantize in the same step.")
@click.option(
    "--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="With -q: bits."
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    help="With -q: group size.",
)
@_quantize_options
@_user_errors
def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str | None,
    force: bool,
    q: bool,
    q_bits: str | None,
    q_group_size: str | None,
    **quantize_kwargs,
) -> None:
    """Convert a Hugging Face checkpoint or GGUF file to an MLX model folder."""
    from tqdm import tqdm

    from .convert import convert as convert_model

    # The bar starts with the first tensor written, so an early error prints
    # no empty bar; disable=None draws it only when stderr is a TTY.
    bars: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(
                    desc="converting tensors",
                    unit="tensor",
                    total=total,
                    file=sys.stderr,
                    disable=None,
                )
            )
        bars[0].update(done - bars[0].n)

    options = None
    if q:
        from .quantization import QuantizeOptions

        quantize_kwargs.update(bits=q_bits, group_size=q_group_size, dtype=dtype)
        options = _options_from(QuantizeOptions, quantize_kwargs)
    elif q_bits or q_group_size:
        raise ValueError("--q-bits and --q-group-size need -q")
    stages = _StageBar()
    try:
        out = convert_model(
            hf_path,
            mlx_path,
            dtype=dtype,
            force=force,
            progress=progress,
            quantize=options,
            stage_progress=stages,
        )
    finally:
        for bar in bars:
            bar.close()
        stages.close()
    if options is None:
        click.echo(f"Saved MLX model to {out}", err=True)
    else:
        from .quantization import REPORT_FILE

        report = json.loads((Path(out) / REPORT_FILE).read_text())
        _echo_quant_report(report, str(out))


@main.command()
@click.option("--model", required=True, help="An MLX model folder or hub repo id.")
@click.option(
    "--prompt",
    "-p",
    default="hello",
    show_default=True,
    help="The prompt; '-' reads it from stdin (one trailing newline dropped).",
)
@click.option(
    "--max-tokens", "-m", default=100, show_default=True, type=click.IntRange(min=0)
)
@click.option("--temp", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables.")
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option(
    "--repetition-penalty", type=float, help="Penalty > 1 discourages repeats."
)
@click.option("--repetition-context-size", default=20, show_default=True, type=int)
@click.option("--seed", type=int, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--system", "--system-prompt", "system", help="System prompt.")
@click.option(
    "--ignore-chat-template",
    is_flag=True,
    help="Feed the prompt as raw text even if the model has a chat template.",
)
@click.option(
    "--max-kv-size",
    type=click.IntRange(min=5),
    help="Bound the KV cache: keep the first 4 tokens and a window of recent ones.",
)
@click.option("--adapter-path", help="Apply this LoRA/DoRA adapter folder at load.")
@click.option(
    "--kv-bits",
    type=click.Choice([4, 8]),
    help="Store the KV cache quantized to this many bits (less memory).",
)
@click.option(
    "--kv-group-size",
    type=click.Choice([32, 64, 128]),
    default=64,
    show_default=True,
    help="Numbers per KV quantization group along head_dim.",
)
@click.option(
    "--prefill-step-size", default=512, show_default=True, type=click.IntRange(min=1)
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    default="auto",
    show_default=True,
    help="Compute dtype; auto is float32 on CPU, the stored dtype on GPU.",
)
@click.option(
    "--dequantize",
    is_flag=True,
    help="Dequantize a quantized model at load: faster on the CPU backend, "
    "4-8x the weights' memory.",
)
@_user_errors
def generate(
    model: str,
    prompt: str,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float | None,
    repetition_context_size: int,
    seed: int | None,
    stop: tuple[str, ...],
    system: str | None,
    ignore_chat_template: bool,
    max_kv_size: int | None,
    adapter_path: str | None,
    kv_bits: int | None,
    kv_group_size: int,
    prefill_step_size: int,
    dtype: str,
    dequantize: bool,
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    import mlx.core as mx

    from .checkpoint import load
    from .generate import stream_generate
    from .sample import make_logits_processors, make_sampler
    from .tokenizer import StopMatcher

    # Refuse bad settings before the slow model and tokenizer load.
    make_sampler(temp, top_p=top_p, top_k=top_k, min_p=min_p)
    make_logits_processors(repetition_penalty, repetition_context_size)
    StopMatcher(stop)
    if prompt == "-":
        # Drop the newline that `echo ... |` adds; it would become a token.
        prompt = sys.stdin.read().removesuffix("\n")
    if not prompt.strip():
        raise ValueError(
            "the prompt is empty; pass --prompt TEXT or pipe text to --prompt -"
        )
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"--seed must be between 0 and 2**64 - 1, got {seed}")
        mx.random.seed(seed)

    llm, tokenizer = load(model, dtype=dtype, dequantize=dequantize)
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(llm, adapter_path)
        llm.eval()
    cache = llm.make_cache(max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    tokens = tokenizer.encode_prompt(
        prompt, system=system, use_chat_template=not ignore_chat_template
    )
    out = sys.stdout.buffer
    response = None
    for response in stream_generate(
        llm,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        stop=list(stop),
        cache=cache,
        prefill_step_size=prefill_step_size,
    ):
        out.write(response.text.encode("utf-8"))
        out.flush()
    out.write(b"\n")
    out.flush()
    _report(response, cache)


def _report(response, cache: list) -> None:
    click.echo("=" * 10, err=True)
    click.echo(
        f"Prompt: {response.prompt_tokens} tokens, "
        f"{response.prompt_tps:.3f} tokens-per-sec",
        err=True,
    )
    click.echo(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        err=True,
    )
    click.echo(f"Peak memory: {response.peak_memory_gb:.3f} GB", err=True)
    if cache[0].bits is not None:
        # Buffers as allocated (KVCache grows 256 tokens at a time).
        used = sum(c.nbytes for c in cache) / 1e6
        full = sum(c.unquantized_nbytes for c in cache) / 1e6
        click.echo(
            f"KV cache: {used:.1f} MB ({cache[0].bits}-bit, group "
            f"{cache[0].group_size}; {full:.1f} MB unquantized)",
            err=True,
        )
    # Last, beside the figures it explains, and never before an error.
    from .blas import warn_if_reference_blas

    warn_if_reference_blas()


@main.command()
@click.option(
    "--model", required=True, help="A float MLX or Hugging Face model folder."
)
@click.option(
    "--mlx-path", default="mlx_model", show_default=True, help="Output folder."
)
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8"]),
    help="Bits per weight (default 4).",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    help="Weights per scale (default 64).",
)
@_quantize_options
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Dtype of scales and float layers (default: the model's).",
)
@click.option("--from-float", is_flag=True, help="Dequantize a quantized model first.")
@click.option("--force", is_flag=True, help="Replace a non-empty --mlx-path.")
@_user_errors
def quantize(model: str, mlx_path: str, force: bool, **kwargs) -> None:
    """Quantize a model to fit a device, with a quality report."""
    from .quantization import QuantizeOptions
    from .quantization import quantize as quantize_model

    options = _options_from(QuantizeOptions, kwargs)
    bar = _StageBar()
    try:
        report = quantize_model(model, mlx_path, options, force=force, progress=bar)
    finally:
        bar.close()
    _echo_quant_report(report, mlx_path)


@main.command()
@click.option("--model", required=True, help="An MLX model folder.")
@click.option("--data", required=True, help="A text or JSONL file.")
@click.option(
    "--sequence-length", default=256, show_default=True, type=click.IntRange(min=1)
)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    help="Score at most this many windows (default: all).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    default="auto",
    show_default=True,
)
@_user_errors
def perplexity(
    model: str,
    data: str,
    sequence_length: int,
    batch_size: int,
    num_samples: int | None,
    dtype: str,
) -> None:
    """Perplexity of a model on a text or JSONL file, with its standard error."""
    from .checkpoint import load
    from .perplexity import make_windows, read_texts
    from .perplexity import perplexity as score

    llm, tokenizer = load(model, dtype=dtype)
    windows = make_windows(
        tokenizer,
        read_texts(data, tokenizer),
        sequence_length=sequence_length,
        num_windows=num_samples,
    )
    bar = _StageBar()
    try:
        result = score(
            llm,
            windows,
            batch_size=batch_size,
            progress=lambda done, total: bar("scoring", done, total),
        )
    finally:
        bar.close()
    click.echo(f"Perplexity: {result.perplexity:.4f} ± {result.standard_error:.4f}")
    click.echo(
        f"{result.tokens} tokens in {result.windows} windows of {sequence_length}; "
        f"mean NLL {result.mean_nll:.5f}",
        err=True,
    )


# Options of `finetune`, in the order of their dataclasses; each defaults to
# None so that the YAML file given to --config can fill what flags leave out.
_LORA_FIELDS = ("fine_tune_type", "num_layers", "rank", "scale", "dropout")
_DATA_FIELDS = ("max_seq_length", "mask_prompt")
_TRAIN_FIELDS = (
    "iters",
    "batch_size",
    "grad_accumulation_steps",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "weight_decay",
    "grad_checkpoint",
    "steps_per_report",
    "steps_per_eval",
    "val_batches",
    "save_every",
    "seed",
)


def _merge_settings(flags: dict, config_file: str | None) -> dict:
    """Dataclass defaults < the YAML file < flags given on the command line."""
    import yaml

    settings: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(
                f"{path} is not valid YAML ({' '.join(str(e).split())})"
            ) from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        # mlx-lm's layout nests the adapter settings under lora_parameters.
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        raw.update(raw.pop("lora_parameters", None) or {})
        known = set(_LORA_FIELDS + _DATA_FIELDS + _TRAIN_FIELDS) | {
            "keys",
            "model",
            "data",
            "adapter_path",
            "resume",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting {unknown[0]!r}")
        settings.update(raw)
    settings.update({k: v for k, v in flags.items() if v is not None})
    return settings


class _TrainingView:
    """Renders training progress: one line per report, a bar on a terminal."""

    def __init__(self, report_every: int, iters: int) -> None:
        from tqdm import tqdm

        self.report_every = report_every
        self.iters = iters
        self.rank0 = _is_rank0()
        self.bar = None
        self._tqdm = tqdm

    def echo(self, line: str) -> None:
        if not self.rank0:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

    def step(self, step: int, total: int) -> None:
        if not self.rank0:
            return
        if self.bar is None:
            self.bar = self._tqdm(
                total=total,
                initial=step - 1,
                desc="training",
                unit="it",
                file=sys.stderr,
                disable=None,
                leave=False,
            )
        self.bar.update(step - self.bar.n)

    def report(self, r) -> None:
        val = f", val loss {r.val_loss:.3f}" if r.val_loss is not None else ""
        self.echo(
            f"Iter {r.iteration}: train loss {r.train_loss:.3f}{val}, "
            f"lr {r.learning_rate:.3e}, {r.iterations_per_second:.3f} it/s, "
            f"{r.tokens_per_second:.1f} tok/s, trained {r.trained_tokens} tokens, "
            f"peak mem {r.peak_memory_gb:.3f} GB"
        )

    def validation(self, v) -> None:
        # Validations on a report step are shown in that step's report line.
        if (
            v.iteration % self.report_every
            and v.iteration != self.iters
            or not v.iteration
        ):
            self.echo(
                f"Iter {v.iteration}: val loss {v.val_loss:.3f} ({v.seconds:.1f} s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_rank0() -> bool:
    import mlx.core as mx

    return mx.distributed.init().rank() == 0


@main.command()
@click.option("--model", required=True, help="A float or quantized MLX model folder.")
@click.option("--data", help="Folder with train.jsonl and valid.jsonl (test.jsonl).")
@click.option("--adapter-path", help="Where adapters and checkpoints go [adapters].")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]))
@click.option("--num-layers", type=int, help="Adapt the last N blocks; -1 all [16].")
@click.option("--rank", type=click.IntRange(min=1), help="Adapter rank [8].")
@click.option("--scale", type=float, help="Adapter output multiplier [20.0].")
@click.option("--dropout", type=float, help="Dropout on the adapter input [0.0].")
@click.option("--iters", type=int, help="Optimizer steps [1000].")
@click.option("--batch-size", type=int, help="Examples per batch [4].")
@click.option("--grad-accumulation-steps", type=int, help="Batches per step [1].")
@click.option("--learning-rate", type=float, help="Peak learning rate [1e-5].")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]))
@click.option("--warmup", type=int, help="Linear warm-up steps [0].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [0.0].")
@click.option("--max-seq-length", type=int, help="Truncate longer examples [2048].")
@click.option(
    "--mask-prompt", is_flag=True, default=None, help="Loss on completions only."
)
@click.option(
    "--grad-checkpoint", is_flag=True, default=None, help="Trade compute for memory."
)
@click.option("--steps-per-report", type=int, help="Steps between report lines [10].")
@click.option("--steps-per-eval", type=int, help="Steps between validations [200].")
@click.option("--val-batches", type=int, help="Validation batches; -1 all [25].")
@click.option("--save-every", type=int, help="Steps between checkpoints [100].")
@click.option(
    "--resume", is_flag=True, default=None, help="Continue the last checkpoint."
)
@click.option("--seed", type=int, help="Seed for data order and dropout [0].")
@click.option("--config", "config_file", help="YAML file of settings (flags win).")
@click.option(
    "--force", is_flag=True, help="Start over in an --adapter-path that holds a run."
)
@_user_errors
def finetune(model: str, config_file: str | None, force: bool, **flags) -> None:
    """Fine-tune with LoRA, QLoRA (quantized base), DoRA or fully."""
    from .finetune import DataOptions
    from .finetune import finetune as run_finetune
    from .lora import LoRAConfig
    from .train import Callbacks, TrainingArgs, TrainingDiverged

    settings = _merge_settings(flags, config_file)
    data = settings.pop("data", None)
    if data is None:
        raise ValueError("no --data folder given (flag or config file)")
    adapter_path = settings.pop("adapter_path", None) or "adapters"
    resume = bool(settings.pop("resume", False))
    settings.pop("model", None)
    lora = LoRAConfig(
        **{k: settings[k] for k in (*_LORA_FIELDS, "keys") if k in settings}
    )
    args = TrainingArgs(**{k: settings[k] for k in _TRAIN_FIELDS if k in settings})
    data_options = DataOptions(
        **{k: settings[k] for k in _DATA_FIELDS if k in settings}
    )
    view = _TrainingView(args.steps_per_report, args.iters)

    def prepared(p) -> None:
        summary = p.data
        for name, split in summary.splits.items():
            view.echo(
                f"{name}: {split.examples} examples, {split.tokens} tokens "
                f"({split.target_tokens} trained on)"
            )
        for warning in summary.warnings:
            view.echo(f"warning: {warning}")
        view.echo("One training example as the model sees it:")
        view.echo(summary.example)
        view.echo(
            f"Trainable parameters: {p.trainable:,} of {p.total:,} "
            f"({100 * p.trainable / max(p.total, 1):.3f}%)"
        )
        # After the input is checked, so that bad input stays one line.
        if view.rank0:
            from .blas import warn_if_reference_blas

            warn_if_reference_blas()

    callbacks = Callbacks(
        on_report=view.report,
        on_validation=view.validation,
        on_step=view.step,
    )
    try:
        result = run_finetune(
            model,
            data,
            adapter_path,
            lora=lora,
            args=args,
            data_options=data_options,
            resume=resume,
            force=force,
            callbacks=callbacks,
            on_prepared=prepared,
        )
    except TrainingDiverged as e:
        view.close()
        raise ValueError(str(e)) from e
    finally:
        view.close()
    val = f", val loss {result.final_val_loss:.3f}" if result.final_val_loss else ""
    view.echo(
        f"Saved adapters to {adapter_path} after {result.steps} steps "
        f"(train loss {result.final_train_loss:.3f}{val})"
    )


@main.command()
@click.option("--model", required=True, help="The base model folder.")
@click.option("--adapter-path", default="adapters", show_default=True)
@click.option(
    "--mlx-path", default="fused_model", show_default=True, help="Output folder."
)
@click.option("--dequantize", is_flag=True, help="Write the fused model in float.")
@click.option(
    "--requantize-bits",
    type=click.Choice(["4", "5", "6", "8", "base"]),
    default="8",
    show_default=True,
    help="Bits for fused layers of a quantized base ('base' keeps its bits).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --mlx-path.")
@_user_errors
def fuse(
    model: str,
    adapter_path: str,
    mlx_path: str,
    dequantize: bool,
    requantize_bits: str,
    force: bool,
) -> None:
    """Fold an adapter into the model's weights, and check the result."""
    from .finetune import fuse as run_fuse

    bits = None if requantize_bits == "base" else int(requantize_bits)
    result = run_fuse(
        model,
        adapter_path,
        mlx_path,
        dequantize=dequantize,
        requantize_bits=bits,
        force=force,
    )
    click.echo(
        f"Fused {result.fused_layers} layers ({result.bits}) into {result.path}; "
        f"largest logit difference from model + adapter: {result.max_logit_diff:.2e}",
        err=True,
    )


@main.command()
@click.option("--model", required=True, help="Model folders, comma-separated.")
@click.option(
    "--prompt-tokens",
    default="128,512,2048",
    show_default=True,
    help="Prompt lengths (context), comma-separated.",
)
@click.option(
    "--gen-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=8),
    help="Tokens generated per sequence (EOS does not stop them); at least 8, "
    "since decode speed is timed between the first and the last.",
)
@click.option(
    "--batch-size", default="1", show_default=True, help="Batch sizes, comma-separated."
)
@click.option(
    "--kv-bits",
    default="none",
    show_default=True,
    help="KV cache bits: none, 8 or 4, comma-separated.",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto, float32, bfloat16 or float16, comma-separated.",
)
@click.option(
    "--repeat",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed runs per combination (median, min, max).",
)
@click.option(
    "--warmup",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Untimed runs first.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seed of the random prompt ids.",
)
@click.option(
    "--prefill-step-size", default=512, show_default=True, type=click.IntRange(min=1)
)
@click.option(
    "--compare",
    type=click.Choice(["mlx-lm"]),
    help="Also run mlx-lm on the same model and prompts, and give ratios.",
)
@click.option(
    "--dequantize",
    is_flag=True,
    help="Dequantize quantized models at load (ours only), as generate does.",
)
@click.option("--json", "json_path", help="Write the rows as JSON Lines.")
@click.option("--csv", "csv_path", help="Write the rows as CSV.")
@click.option("--plot", "plot_path", help="Plot speed against context to a PNG.")
@_user_errors
def benchmark(
    json_path: str | None,
    csv_path: str | None,
    plot_path: str | None,
    **flags,
) -> None:
    """Measure prompt and generation speed over a sweep, like llama-bench."""
    from . import benchmark as bench

    options = bench.parse_options(**flags)
    bench.check_outputs(json_path=json_path, csv_path=csv_path, plot_path=plot_path)
    # Each run is logged at INFO: the progress of a long sweep.
    progress = logging.getLogger(bench.__name__)
    saved = progress.level
    if progress.getEffectiveLevel() > logging.INFO:
        progress.setLevel(logging.INFO)
    try:
        rows = bench.run_benchmark(options)
    finally:
        progress.setLevel(saved)
    written = bench.write_outputs(
        rows, json_path=json_path, csv_path=csv_path, plot_path=plot_path
    )
    click.echo(bench.format_table(rows), err=True)
    for path in written:
        click.echo(f"Wrote {path}", err=True)


@main.command("benchmark-finetune")
@click.option("--model", required=True, help="A float model folder (or hub id).")
@click.option(
    "--data", required=True, help="A folder with train.jsonl and valid.jsonl."
)
@click.option(
    "--fine-tune-type",
    default="lora,qlora",
    show_default=True,
    help="lora, qlora (a 4-bit copy of --model), or both, comma-separated.",
)
@click.option("--iters", default=20, show_default=True, type=int)
@click.option(
    "--warmup-iters",
    default=2,
    show_default=True,
    type=int,
    help="Leading iterations left out of every figure.",
)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--max-seq-length", default=2048, show_default=True, type=int)
@click.option(
    "--num-layers",
    default=16,
    show_default=True,
    type=int,
    help="Adapt the last N blocks (-1: all).",
)
@click.option("--rank", default=8, show_default=True, type=int)
@click.option("--scale", default=20.0, show_default=True, type=float)
@click.option("--learning-rate", default=1e-5, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--compare",
    type=click.Choice(["mlx-lm"]),
    help="Also train with mlx_lm.lora on the same model and data, and give ratios.",
)
@click.option(
    "--work-dir",
    help="Keep the quantized copy, adapters and logs here (default: a temporary "
    "folder, removed).",
)
@click.option("--json", "json_path", help="Write the rows as JSON Lines.")
@click.option("--csv", "csv_path", help="Write the rows as CSV.")
@_user_errors
def benchmark_finetune(
    model: str,
    data: str,
    fine_tune_type: str,
    compare: str | None,
    json_path: str | None,
    csv_path: str | None,
    **settings,
) -> None:
    """Measure fine-tuning tokens/s and peak memory, LoRA and QLoRA."""
    from . import benchmark as bench
    from . import benchmark_train

    bench.check_outputs(json_path=json_path, csv_path=csv_path)
    progress = logging.getLogger(benchmark_train.__name__)
    saved = progress.level
    if progress.getEffectiveLevel() > logging.INFO:
        progress.setLevel(logging.INFO)
    try:
        rows = benchmark_train.benchmark_finetune(
            model,
            data,
            fine_tune_types=fine_tune_type,
            compare_mlx_lm=compare == "mlx-lm",
            **settings,
        )
    finally:
        progress.setLevel(saved)
    env = bench.environment()
    rows = [{**env, **row} for row in rows]
    written = bench.write_outputs(rows, json_path=json_path, csv_path=csv_path)
    click.echo(benchmark_train.format_table(rows), err=True)
    for path in written:
        click.echo(f"Wrote {path}", err=True)


if __name__ == "__main__":
    run()
