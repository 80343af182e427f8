"""The ``mlxbastion`` command line: parse, call the library, render.

Every command is a thin layer over a library function of the same name. Bad
input raised by the library as ValueError, FileNotFoundError and the like
becomes a one-line ``error:`` message and exit status 1; ``--verbose`` shows
the traceback instead. Generated text goes to stdout, everything else to
stderr. Heavy imports happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import logging
import sys

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
    """Private, on-device LLMs on MLX: convert, generate (and more to come)."""
    _setup_logging(verbose)


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
@_user_errors
def convert(hf_path: str, mlx_path: str, dtype: str | None, force: bool) -> None:
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

    try:
        out = convert_model(
            hf_path, mlx_path, dtype=dtype, force=force, progress=progress
        )
    finally:
        for bar in bars:
            bar.close()
    click.echo(f"Saved MLX model to {out}", err=True)


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
    type=click.IntRange(min=1),
    help="Bound the KV cache: keep the first tokens and a window of recent ones.",
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
    prefill_step_size: int,
    dtype: str,
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
        mx.random.seed(seed)

    llm, tokenizer = load(model, dtype=dtype)
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
        max_kv_size=max_kv_size,
        prefill_step_size=prefill_step_size,
    ):
        out.write(response.text.encode("utf-8"))
        out.flush()
    out.write(b"\n")
    out.flush()
    _report(response)


def _report(response) -> None:
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


if __name__ == "__main__":
    main()
