"""The ``mlxbastion`` command line, end to end on the real stories260K model.

Commands run in-process through click's ``CliRunner`` (stdout and stderr kept
apart), except where the process itself is under test: ``python -m``,
``--verbose`` tracebacks and the progress bar on a terminal.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner, Result
from helpers import STORIES_DIR, require

from mlxbastion.cli import main

PROMPT = "Once upon a time"
REPORT_LINES = (
    r"=+",
    r"Prompt: (?P<prompt_tokens>\d+) tokens, (?P<prompt_tps>\d+\.\d{3}) "
    r"tokens-per-sec",
    r"Generation: (?P<generation_tokens>\d+) tokens, "
    r"(?P<generation_tps>\d+\.\d{3}) tokens-per-sec",
    r"Peak memory: (?P<peak_memory_gb>\d+\.\d{3}) GB",
)
SUPPORTED = "llama, mistral, qwen2, qwen3"


@pytest.fixture(scope="module")
def reference() -> dict:
    """The greedy 30-token continuation of PROMPT, from reference.json."""
    data = json.loads(require(STORIES_DIR / "reference.json").read_text())
    assert data["prompt"] == PROMPT
    return data["greedy_30"]


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    return require(STORIES_DIR / "hf")


@pytest.fixture(scope="module")
def model_dir(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted once with ``mlxbastion convert``."""
    dst = tmp_path_factory.mktemp("cli") / "stories260K-mlx"
    result = invoke("convert", "--hf-path", hf_dir, "--mlx-path", dst)
    assert result.exit_code == 0, result.stderr
    return dst


def invoke(*args: object, input: str | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def generate(model: Path, *args: object, input: str | None = None) -> Result:
    return invoke("generate", "--model", model, *args, input=input)


def ok_text(result: Result) -> str:
    """The generated text of a successful run, without the closing newline."""
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def report(result: Result) -> dict[str, float]:
    """The statistics generate writes to stderr, parsed; every line checked."""
    lines = result.stderr.splitlines()
    assert len(lines) == len(REPORT_LINES), result.stderr
    stats: dict[str, float] = {}
    for pattern, line in zip(REPORT_LINES, lines, strict=True):
        match = re.fullmatch(pattern, line)
        assert match, f"{line!r} does not match {pattern!r}"
        stats.update({k: float(v) for k, v in match.groupdict().items()})
    return stats


# ---------------------------------------------------------------------------
# convert


def test_convert_writes_an_mlx_folder_and_one_line_on_a_pipe(hf_dir, tmp_path):
    dst = tmp_path / "out"
    result = invoke("convert", "--hf-path", hf_dir, "--mlx-path", dst)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    # stderr is not a TTY here, so no progress bar: only the final line.
    assert result.stderr == f"Saved MLX model to {dst}\n"
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert len(mx.load(str(dst / "model.safetensors"))) == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_draws_a_progress_bar_when_stderr_is_a_tty(hf_dir, tmp_path):
    dst = tmp_path / "out"
    controller, terminal = pty.openpty()
    # An 80-column terminal: tqdm draws nothing on a 0x0 one.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mlxbastion", "convert"]
            + ["--hf-path", str(hf_dir), "--mlx-path", str(dst)],
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=60,
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
    stderr = b"".join(chunks).decode()

    assert proc.returncode == 0, stderr
    assert proc.stdout == b""
    assert "converting tensors: 100%" in stderr
    assert "48/48" in stderr
    assert stderr.rstrip().endswith(f"Saved MLX model to {dst}")


def test_convert_force_replaces_a_non_empty_folder(hf_dir, tmp_path):
    # --force replaces an earlier output (a folder with config.json) only.
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    (dst / "config.json").write_text("{}")
    result = invoke("convert", "--hf-path", hf_dir, "--mlx-path", dst, "--force")

    assert result.exit_code == 0, result.stderr
    assert not (dst / "old.txt").exists()
    assert (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_gguf_converts_and_generates_the_reference(reference, tmp_path):
    gguf = require(STORIES_DIR / "stories260K.gguf")
    dst = tmp_path / "from-gguf"
    result = invoke("convert", "--hf-path", gguf, "--mlx-path", dst)
    assert result.exit_code == 0, result.stderr

    result = generate(dst, "--prompt", PROMPT, "--max-tokens", 30, "--temp", 0)
    assert ok_text(result) == reference["continuation"]


# ---------------------------------------------------------------------------
# generate


def test_greedy_generate_prints_the_reference_and_statistics(model_dir, reference):
    result = generate(model_dir, "--prompt", PROMPT, "--max-tokens", 30, "--temp", 0)

    assert result.stdout == reference["continuation"] + "\n"
    stats = report(result)
    assert stats["prompt_tokens"] == len(reference["prompt_ids"]) == 5
    assert stats["generation_tokens"] == len(reference["new_ids"]) == 30
    assert stats["prompt_tps"] > 0
    assert stats["generation_tps"] > 0
    assert stats["peak_memory_gb"] >= 0


def test_prompt_dash_reads_stdin(model_dir, reference):
    result = generate(model_dir, "--prompt", "-", "--max-tokens", 30, input=PROMPT)

    assert ok_text(result) == reference["continuation"]
    assert report(result)["prompt_tokens"] == 5


@pytest.mark.parametrize(
    ("stops", "text", "tokens"),
    [
        # Tokens: 1 ",", 2 " there", 3 " was", 4 " a", 5 " little", ...,
        # 10 " Lily", 11 ".", 12 " She"; generation ends at the one that
        # completes a stop string.
        ([" little"], ", there was a", 5),
        (["Lily. She"], ", there was a little girl named ", 12),
        (["park", " was"], ", there", 3),
        (["park", "Lily"], ", there was a little girl named ", 10),
        # Text held back as a possible stop string is released once it is
        # ruled out, in the middle and at the very end of the stream.
        (["park. Two"], None, 30),
        (["day, the"], None, 30),
    ],
    ids=["one-token", "three-tokens", "two-first", "two-second", "near", "tail"],
)
def test_stop_strings_cut_the_text_before_them(
    model_dir, reference, stops, text, tokens
):
    options = [arg for stop in stops for arg in ("--stop", stop)]
    result = generate(model_dir, "--prompt", PROMPT, "--max-tokens", 30, *options)

    assert ok_text(result) == (text or reference["continuation"])
    assert report(result)["generation_tokens"] == tokens


def sample(model_dir: Path, *options: object) -> str:
    return ok_text(
        generate(model_dir, "--prompt", PROMPT, "--max-tokens", 30, *options)
    )


def test_seed_makes_sampling_reproducible(model_dir, reference):
    first = sample(model_dir, "--temp", 1.0, "--seed", 1)
    again = sample(model_dir, "--temp", 1.0, "--seed", 1)
    other = sample(model_dir, "--temp", 1.0, "--seed", 2)

    assert first == again
    assert first != other
    assert reference["continuation"] not in (first, other)


def test_max_kv_size_larger_than_the_text_changes_nothing(model_dir, reference):
    assert sample(model_dir, "--max-kv-size", 64) == reference["continuation"]


def test_small_max_kv_size_still_generates_every_token(model_dir, reference):
    result = generate(
        model_dir, "--prompt", PROMPT, "--max-tokens", 30, "--max-kv-size", 8
    )

    text = ok_text(result)
    assert report(result)["generation_tokens"] == 30
    # 5 prompt tokens plus the first few generated ones fit in the window.
    assert text.startswith(", there was a")
    assert len(text) > len(", there was a")


def test_max_tokens_zero_prints_only_a_newline(model_dir):
    result = generate(model_dir, "--prompt", PROMPT, "--max-tokens", 0)

    assert result.stdout == "\n"
    stats = report(result)
    assert stats["prompt_tokens"] == 5
    assert stats["generation_tokens"] == 0


def test_top_k_one_is_greedy_at_any_temperature(model_dir, reference):
    text = sample(model_dir, "--top-k", 1, "--temp", 5, "--seed", 3)
    assert text == reference["continuation"]


def test_repetition_penalty_changes_the_text(model_dir, reference):
    text = sample(model_dir, "--repetition-penalty", 1.3)
    assert text != reference["continuation"]
    assert text.startswith(", there was a little girl named Lily")


@pytest.mark.parametrize(
    "options",
    [
        ("--temp", 1.0, "--seed", 0, "--min-p", 0.5),
        ("--temp", 1.0, "--seed", 0, "--top-p", 0.5),
        ("--temp", 1.0, "--seed", 0, "--min-p", 0.0, "--top-p", 1.0),
    ],
    ids=["min-p", "top-p", "disabled"],
)
def test_sampling_filters_in_range_generate_the_full_length(model_dir, options):
    result = generate(model_dir, "--prompt", PROMPT, "--max-tokens", 30, *options)

    assert len(ok_text(result)) > 0
    assert report(result)["generation_tokens"] == 30


def test_system_prompt_without_chat_template_prefixes_the_prompt(model_dir, reference):
    result = generate(
        model_dir, "--prompt", PROMPT, "--max-tokens", 30, "--system", "Hello"
    )

    assert ok_text(result) != reference["continuation"]
    # "<s>", "Hello", "\n\n" and "Once upon a time" without its leading space.
    assert report(result)["prompt_tokens"] == 12


def test_ignore_chat_template_feeds_raw_text(model_dir, reference):
    assert sample(model_dir, "--ignore-chat-template") == reference["continuation"]


def test_python_dash_m_help_lists_the_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "mlxbastion", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: python -m mlxbastion [OPTIONS] COMMAND")
    commands = proc.stdout.split("Commands:")[1].split()
    assert "convert" in commands
    assert "generate" in commands
    assert proc.stderr == ""


def test_version():
    result = invoke("--version")

    assert result.exit_code == 0
    version = importlib.metadata.version("mlxbastion")
    assert result.stdout == f"mlxbastion, version {version}\n"


# ---------------------------------------------------------------------------
# Bad input: one `error:` line, exit status 1, nothing left behind


def copy_hf(hf_dir: Path, dst: Path, *, weights: bool = True) -> Path:
    """A writable copy of the stories260K HF folder."""
    dst.mkdir()
    for path in hf_dir.iterdir():
        if weights or path.suffix != ".safetensors":
            shutil.copyfile(path, dst / path.name)
    return dst


def edit_config(src: Path, **changes: object) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def no_config(hf_dir: Path, tmp: Path) -> Path:
    src = copy_hf(hf_dir, tmp / "src")
    (src / "config.json").unlink()
    return src


def malformed_config(hf_dir: Path, tmp: Path) -> Path:
    src = copy_hf(hf_dir, tmp / "src")
    (src / "config.json").write_text('{"model_type": "llama",')
    return src


def gpt2_config(hf_dir: Path, tmp: Path) -> Path:
    src = copy_hf(hf_dir, tmp / "src")
    edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    return src


def missing_shard(hf_dir: Path, tmp: Path) -> Path:
    src = copy_hf(hf_dir, tmp / "src", weights=False)
    weights = mx.load(str(hf_dir / "model.safetensors"))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:24],
        "model-00002-of-00002.safetensors": names[24:],
    }
    first = "model-00001-of-00002.safetensors"
    mx.save_safetensors(str(src / first), {k: weights[k] for k in shards[first]})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def edit_weights(
    hf_dir: Path, tmp: Path, change: Callable[[dict[str, mx.array]], None]
) -> Path:
    src = copy_hf(hf_dir, tmp / "src", weights=False)
    weights = mx.load(str(hf_dir / "model.safetensors"))
    change(weights)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    return src


def missing_tensor(hf_dir: Path, tmp: Path) -> Path:
    return edit_weights(
        hf_dir, tmp, lambda w: w.pop("model.layers.2.self_attn.k_proj.weight")
    )


def wrong_shape(hf_dir: Path, tmp: Path) -> Path:
    name = "model.layers.0.mlp.up_proj.weight"
    return edit_weights(hf_dir, tmp, lambda w: w.update({name: w[name][:100]}))


def truncated_weights(hf_dir: Path, tmp: Path) -> Path:
    src = copy_hf(hf_dir, tmp / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src


@pytest.mark.parametrize(
    ("make_source", "fragments"),
    [
        (no_config, ["has no config.json"]),
        (malformed_config, ["config.json is not valid JSON"]),
        (gpt2_config, ["unsupported model_type 'gpt2'", SUPPORTED]),
        (missing_shard, ["shard model-00002-of-00002.safetensors", "missing"]),
        (
            missing_tensor,
            ["tensor model.layers.2.self_attn.k_proj.weight is missing"],
        ),
        (
            wrong_shape,
            [
                "tensor model.layers.0.mlp.up_proj.weight has shape (100, 64)",
                "the config implies (172, 64)",
            ],
        ),
        (truncated_weights, ["model.safetensors", "truncated"]),
        (lambda hf_dir, tmp: tmp / "nowhere", ["nowhere' does not exist"]),
    ],
    ids=[
        "no-config",
        "malformed-config",
        "unsupported-type",
        "missing-shard",
        "missing-tensor",
        "wrong-shape",
        "truncated",
        "nonexistent",
    ],
)
def test_convert_refuses_bad_checkpoints(hf_dir, tmp_path, make_source, fragments):
    src = make_source(hf_dir, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("convert", "--hf-path", src, "--mlx-path", tmp_path / "out")

    message = one_error_line(result)
    for fragment in fragments:
        assert fragment in message
    # No destination, and no half-written temporary folder beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def one_error_line(result: Result) -> str:
    """The message of a run that failed as a user error should."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_convert_refuses_a_non_empty_destination_without_force(hf_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    result = invoke("convert", "--hf-path", hf_dir, "--mlx-path", dst)

    message = one_error_line(result)
    assert str(dst) in message
    assert "--force" in message
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert (dst / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("args", "input", "fragments"),
    [
        (["--prompt", ""], None, ["the prompt is empty"]),
        (["--prompt", " \n\t "], None, ["the prompt is empty"]),
        (["--prompt", "-"], "", ["the prompt is empty"]),
        (["--top-p", "1.5"], None, ["top_p must be in (0, 1]", "1.5"]),
        (["--top-p", "0"], None, ["top_p must be in (0, 1]", "got 0.0"]),
        (["--min-p", "1.0"], None, ["min_p must be in [0, 1)", "1.0"]),
        (["--min-p", "-0.1"], None, ["min_p must be in [0, 1)", "-0.1"]),
        (["--top-k", "-1"], None, ["top_k must be >= 0", "-1"]),
        (["--temp", "-1"], None, ["temp must be >= 0", "-1"]),
        (["--repetition-penalty", "0"], None, ["repetition_penalty must be > 0"]),
        (
            ["--repetition-penalty", "1.1", "--repetition-context-size", "0"],
            None,
            ["repetition_context_size must be >= 1, got 0"],
        ),
        (["--stop", ""], None, ["stop strings must be non-empty"]),
    ],
    ids=[
        "empty",
        "whitespace",
        "empty-stdin",
        "top-p-above-1",
        "top-p-zero",
        "min-p-1",
        "min-p-negative",
        "top-k-negative",
        "temp-negative",
        "repetition-penalty-zero",
        "repetition-context-zero",
        "empty-stop",
    ],
)
def test_generate_refuses_bad_settings(model_dir, args, input, fragments):
    result = generate(model_dir, *args, input=input)

    message = one_error_line(result)
    for fragment in fragments:
        assert fragment in message


def test_generate_refuses_a_prompt_longer_than_the_context(model_dir, hf_dir):
    from tokenizers import Tokenizer

    prompt = "Once upon a time there was a dog. " * 300
    n_tokens = len(Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(prompt))
    assert n_tokens > 2048
    result = generate(model_dir, "--prompt", "-", input=prompt)

    message = one_error_line(result)
    assert f"the prompt has {n_tokens} tokens" in message
    assert "context is 2048" in message


def test_generate_refuses_a_missing_model(tmp_path):
    result = generate(tmp_path / "nowhere", "--prompt", PROMPT)

    message = one_error_line(result)
    assert f"{tmp_path / 'nowhere'}' does not exist" in message


def test_generate_tells_to_convert_a_gguf_first():
    gguf = require(STORIES_DIR / "stories260K.gguf")
    result = generate(gguf, "--prompt", PROMPT)

    message = one_error_line(result)
    assert "convert it first" in message
    assert f"mlxbastion convert --hf-path {gguf}" in message


def test_verbose_shows_the_traceback_instead(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlxbastion", "--verbose", "generate"]
        + ["--model", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("FileNotFoundError: ")
    assert "error: " not in proc.stderr
