"""``mlxbastion perplexity`` on the real stories260K model: the reference
figure, text and JSON Lines input, the standard error, and bad data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import SHARED_DIR, STORIES_DIR, require

from mlxbastion.checkpoint import load
from mlxbastion.cli import main
from mlxbastion.convert import convert
from mlxbastion.perplexity import make_windows

TINYSTORIES = SHARED_DIR / "data" / "tinystories" / "tinystories_val_sample.txt"
RESULT = re.compile(r"Perplexity: (?P<ppl>\d+\.\d{4}) ± (?P<se>\d+\.\d{4})")
SUMMARY = re.compile(
    r"(?P<tokens>\d+) tokens in (?P<windows>\d+) windows of (?P<length>\d+); "
    r"mean NLL (?P<nll>\d+\.\d{5})"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted once."""
    return convert(
        require(STORIES_DIR / "hf"), tmp_path_factory.mktemp("ppl") / "stories"
    )


@pytest.fixture(scope="module")
def story() -> str:
    """About 2,400 tokens of TinyStories: 37 windows of 64."""
    return require(TINYSTORIES).read_text()[:5000]


@pytest.fixture(scope="module")
def story_file(story: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "story.txt"
    path.write_text(story)
    return path


@pytest.fixture(scope="module")
def story_figures(model_dir: Path, story_file: Path) -> dict[str, float]:
    """The story scored in windows of 64 with the default batch size."""
    return parse(perplexity(model_dir, story_file, "--sequence-length", 64))


def perplexity(model: Path, data: Path, *args: object) -> Result:
    return CliRunner().invoke(
        main,
        ["perplexity", "--model", str(model), "--data", str(data)]
        + [str(a) for a in args],
    )


def parse(result: Result) -> dict[str, float]:
    """The figure on stdout and the summary on stderr, each one line."""
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    (summary,) = result.stderr.splitlines()
    figures = RESULT.fullmatch(line)
    counts = SUMMARY.fullmatch(summary)
    assert figures and counts, (line, summary)
    return {
        k: float(v) for k, v in {**figures.groupdict(), **counts.groupdict()}.items()
    }


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    return line


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------
# The reference figure


def test_tinystories_perplexity_matches_the_reference(model_dir):
    reference = json.loads(require(STORIES_DIR / "reference.json").read_text())
    protocol = reference["perplexity"]
    assert protocol["windows"] == 64 and protocol["window"] == 256
    result = perplexity(
        model_dir, TINYSTORIES, "--sequence-length", 256, "--num-samples", 64
    )
    got = parse(result)

    assert got["tokens"] == 64 * 256 and got["windows"] == 64 and got["length"] == 256
    # transformers' mean NLL to all 5 printed decimals. exp of it is 4.61555,
    # which transformers rounds up to 4.6156 and we (1.5294255) down to 4.6155.
    assert got["nll"] == protocol["mean_nll"]
    assert got["ppl"] == pytest.approx(protocol["ppl"], abs=1e-4)
    # se = ppl * std(nll) / sqrt(n): about 0.076 here, not zero and not huge.
    assert 0.05 < got["se"] < 0.1


def test_figure_and_standard_error_follow_the_formula(model_dir, story, story_figures):
    """Recomputed from the logits by hand in float64: exp(mean NLL) and
    ppl * std(NLL, ddof=1) / sqrt(n)."""
    got = story_figures
    model, tokenizer = load(model_dir)
    windows = make_windows(tokenizer, [story], sequence_length=64)
    logits = np.array(model(windows[:, :-1]).astype(mx.float32), dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.array(windows[:, 1:])
    nll = -np.take_along_axis(logprobs, targets[..., None], -1).ravel()
    ppl = math.exp(nll.mean())
    se = ppl * nll.std(ddof=1) / math.sqrt(nll.size)

    assert got["tokens"] == nll.size == windows.shape[0] * 64
    assert got["ppl"] == pytest.approx(ppl, abs=6e-5)
    assert got["se"] == pytest.approx(se, abs=6e-5)
    assert got["se"] > 0


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_does_not_change_the_figure(
    model_dir, story_file, story_figures, batch_size
):
    other = perplexity(
        model_dir, story_file, "--sequence-length", 64, "--batch-size", batch_size
    )
    assert parse(other) == pytest.approx(story_figures, abs=1e-4)


# ---------------------------------------------------------------------------
# JSON Lines


def test_jsonl_text_and_prompt_completion_score_like_the_text_file(
    model_dir, story, story_figures, tmp_path
):
    """One document three ways: plain text, a {"text"} record, and a
    {"prompt", "completion"} record split mid-story; the same tokens, so the
    same figure."""
    records = write_jsonl(tmp_path / "text.jsonl", [{"text": story}])
    split = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": story[:1234], "completion": story[1234:]}],
    )
    for path in (records, split):
        got = parse(perplexity(model_dir, path, "--sequence-length", 64))
        assert got == story_figures
    assert story_figures["windows"] == 37


def test_jsonl_documents_are_joined_with_the_end_of_sequence_token(
    model_dir, story, tmp_path
):
    docs = [story[:2500], story[2500:]]
    data = write_jsonl(
        tmp_path / "docs.jsonl",
        [{"text": docs[0]}, {"prompt": docs[1][:10], "completion": docs[1][10:]}],
    )
    got = parse(perplexity(model_dir, data, "--sequence-length", 64))

    _, tokenizer = load(model_dir)
    n_ids = sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in docs) + 1
    assert got["windows"] == n_ids // 64
    assert got["tokens"] == 64 * (n_ids // 64)


@pytest.mark.parametrize(
    ("lines", "number", "problem"),
    [
        (['{"text": "ok"}', '{"text": "unterminated'], 2, "is not valid JSON"),
        (['{"text": "ok"}', "", '["a", "list"]'], 3, "must be a JSON object"),
        (['{"text": "ok"}', '{"prompt": "no completion"}'], 2, "needs a 'text'"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no chat template"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(
    model_dir, tmp_path, lines, number, problem
):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    line = one_line_error(perplexity(model_dir, data))
    assert line.startswith(f"error: {data}:{number} ")
    assert problem in line


# ---------------------------------------------------------------------------
# Bad data


def test_data_shorter_than_one_window_is_a_one_line_error(model_dir, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("Once upon a time, there was a cat.")
    line = one_line_error(perplexity(model_dir, data, "--sequence-length", 256))
    assert re.fullmatch(
        r"error: the data has \d+ tokens, fewer than one window of 256; give more "
        r"text or a shorter --sequence-length",
        line,
    )


def test_a_window_longer_than_the_context_is_a_one_line_error(model_dir, tmp_path):
    # stories260K's context is 2048 tokens; the data holds more than 3000.
    data = tmp_path / "long.txt"
    data.write_text(require(TINYSTORIES).read_text()[:20000])
    line = one_line_error(
        perplexity(model_dir, data, "--sequence-length", 3000, "--num-samples", 1)
    )
    assert line == (
        "error: a sequence length of 3000 is longer than the model's context "
        "(2048); use --sequence-length 2048 or less"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "error: data file {path} does not exist"),
        ("empty.txt", " \n", "error: data file {path} is empty"),
        ("empty.jsonl", "\n\n", "error: data file {path} has no records"),
    ],
)
def test_missing_or_empty_data_is_a_one_line_error(
    model_dir, tmp_path, name, content, message
):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    assert one_line_error(perplexity(model_dir, data)) == message.format(path=data)
