"""The fine-tuning benchmark on stories260K: ours beside mlx-lm, LoRA and
QLoRA, with every row's fields and the token accounting checked against the
data set's own token counts. Speeds are never asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import SHARED_DIR, STORIES_DIR, require

from mlxbastion import benchmark_train
from mlxbastion.benchmark_train import benchmark_finetune, summarize_iterations
from mlxbastion.convert import convert

ITERS, WARMUP, BATCH = 4, 2, 4
# Two of the four examples (205 and 221 tokens) are longer than this.
MAX_SEQ_LENGTH = 200
NUM_LAYERS, RANK = 2, 4

SETTINGS = {
    "iters": ITERS,
    "warmup_iters": WARMUP,
    "timed_iters": ITERS - WARMUP,
    "batch_size": BATCH,
    "max_seq_length": MAX_SEQ_LENGTH,
    "num_layers": NUM_LAYERS,
    "rank": RANK,
    "scale": 20.0,
    "dropout": 0.0,
    "learning_rate": 1e-4,
    "optimizer": "adamw",
    "weight_decay": 0.0,
    "grad_checkpoint": False,
    "seed": 0,
}
FIGURES = (
    "train_tokens",
    "train_seconds",
    "train_tokens_per_s",
    "iters_per_s",
    "peak_memory_gb",
    "engine_reported_tokens_per_s",
    "trainable_parameters",
)
RATIOS = ("train_tokens_per_s_ratio", "iters_per_s_ratio", "peak_memory_ratio")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return convert(require(STORIES_DIR / "hf"), tmp_path_factory.mktemp("bt") / "m")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Exactly one batch of examples, so every iteration of both engines
    trains on the same four."""
    source = require(SHARED_DIR / "data" / "wikisql") / "train.jsonl"
    lines = source.read_text().splitlines()[:BATCH]
    folder = tmp_path_factory.mktemp("data")
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def rows(model, data, work) -> list[dict]:
    return benchmark_finetune(
        model,
        data,
        fine_tune_types="lora,qlora",
        iters=ITERS,
        warmup_iters=WARMUP,
        batch_size=BATCH,
        max_seq_length=MAX_SEQ_LENGTH,
        num_layers=NUM_LAYERS,
        rank=RANK,
        learning_rate=1e-4,
        compare_mlx_lm=True,
        work_dir=work,
    )


def example_lengths(model: Path, data: Path) -> list[int]:
    """Tokens per example as the model's tokenizer.json gives them (BOS
    included), plus the end-of-sequence token both engines append."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in open(data / "train.jsonl")]
    return [len(tokenizer.encode(text).ids) + 1 for text in texts]


def test_rows_for_each_type_and_engine(rows, model, data):
    assert [(r["fine_tune_type"], r["engine"]) for r in rows] == [
        ("lora", "mlxbastion"),
        ("lora", "mlx-lm"),
        ("qlora", "mlxbastion"),
        ("qlora", "mlx-lm"),
    ]
    json.dumps(rows)  # plain data only
    for row in rows:
        assert {k: row[k] for k in SETTINGS} == SETTINGS
        assert row["model"] == str(model)
        assert row["data"] == str(data.resolve())
        assert row["compute_dtype"] == "float32"
        assert row["timed_iters"] == ITERS - WARMUP
        for name in FIGURES:
            assert row[name] > 0, name
            assert math.isfinite(row[name]), name
        # A 260K-parameter model trains in well under a gigabyte.
        assert row["peak_memory_gb"] < 1
        quantized = row["fine_tune_type"] == "qlora"
        assert row["base_bits"] == (4 if quantized else None)
        assert row["base_group_size"] == (64 if quantized else None)


def test_trainable_parameters_match_the_lora_formula(rows):
    # Every linear layer of the last two blocks: q 64->64, k 64->32,
    # v 64->32, o 64->64, gate and up 64->172, down 172->64 (left in float
    # by 4-bit group-64 quantization, adapted all the same).
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 172), (64, 172), (172, 64)]
    expected = NUM_LAYERS * RANK * sum(i + o for i, o in shapes)
    assert [r["trainable_parameters"] for r in rows] == [expected] * 4


def test_token_accounting_excludes_warmup_and_counts_example_tokens(rows, model, data):
    lengths = example_lengths(model, data)
    assert sorted(lengths) == [183, 189, 205, 221]
    timed = ITERS - WARMUP
    per_step = sum(min(n, MAX_SEQ_LENGTH) for n in lengths)
    for row in rows:
        assert row["train_tokens"] == timed * per_step
        assert row["train_tokens_per_s"] == pytest.approx(
            row["train_tokens"] / row["train_seconds"]
        )
        assert row["iters_per_s"] == pytest.approx(timed / row["train_seconds"])
        engine_tokens = row["engine_reported_tokens_per_s"] * row["train_seconds"]
        if row["engine"] == "mlxbastion":
            # Our console counts loss targets: one fewer per example.
            expected = timed * sum(min(n, MAX_SEQ_LENGTH) - 1 for n in lengths)
        else:
            # mlx-lm's mask covers min(n, width - 1) positions per example.
            expected = timed * sum(min(n, MAX_SEQ_LENGTH - 1) for n in lengths)
        assert engine_tokens == pytest.approx(expected)


def test_ratios_are_ours_over_mlx_lm(rows):
    for ours, theirs in (rows[0:2], rows[2:4]):
        assert ours["train_tokens_per_s_ratio"] == pytest.approx(
            ours["train_tokens_per_s"] / theirs["train_tokens_per_s"]
        )
        assert ours["iters_per_s_ratio"] == pytest.approx(
            ours["iters_per_s"] / theirs["iters_per_s"]
        )
        assert ours["peak_memory_ratio"] == pytest.approx(
            ours["peak_memory_gb"] / theirs["peak_memory_gb"]
        )
        assert not any(name in theirs for name in RATIOS)


def test_qlora_trains_a_4bit_group64_copy_in_both_engines(rows, work):
    config = json.loads((work / "qlora-base" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (
        4,
        64,
    )
    for engine in ("mlxbastion", "mlx-lm"):
        spec = json.loads((work / f"qlora-{engine}" / "spec.json").read_text())
        assert spec["model"] == str(work / "qlora-base")
        adapters = work / f"qlora-{engine}" / "adapters"
        assert (adapters / "adapters.safetensors").is_file()
    settings = (work / "qlora-mlx-lm" / "mlx_lm_config.yaml").read_text()
    assert "steps_per_eval: 5" in settings and "grad_checkpoint: false" in settings


def test_summarize_leaves_out_the_warmup():
    iterations = [
        {"iteration": i + 1, "seconds": s, "tokens": 100, "engine_tokens": 96}
        for i, s in enumerate([30.0, 10.0, 1.0, 1.0, 2.0])
    ]
    figures = summarize_iterations(iterations, warmup_iters=2)
    assert figures == {
        "timed_iters": 3,
        "train_tokens": 300,
        "train_seconds": 4.0,
        "train_tokens_per_s": 75.0,
        "iters_per_s": 0.75,
        "engine_reported_tokens_per_s": 72.0,
    }
    with pytest.raises(ValueError, match="no iteration left"):
        summarize_iterations(iterations, warmup_iters=5)
    with pytest.raises(ValueError, match="expected iterations"):
        summarize_iterations(iterations[1:], warmup_iters=1)


def fake_result(speed: float, peak: float) -> dict:
    return {
        "engine_version": "x",
        "iterations": [
            {"iteration": i, "seconds": 1.0 / speed, "tokens": 10, "engine_tokens": 9}
            for i in range(1, 4)
        ],
        "peak_memory_bytes": peak * 1e9,
        "trainable_parameters": 7,
        "compute_dtype": "float32",
        "device": "cpu",
        "mlx_version": "y",
    }


def test_without_compare_only_our_rows_and_no_ratios(model, data, monkeypatch):
    specs = []

    def worker(run_dir, spec):
        specs.append(spec)
        return fake_result(2.0, 0.5)

    monkeypatch.setattr(benchmark_train, "_run_worker", worker)
    rows = benchmark_finetune(
        model, data, fine_tune_types=["lora"], iters=3, warmup_iters=1, num_layers=-1
    )
    assert [(r["engine"], r["fine_tune_type"]) for r in rows] == [
        ("mlxbastion", "lora")
    ]
    assert not any(name in rows[0] for name in RATIOS)
    assert rows[0]["train_tokens_per_s"] == pytest.approx(20.0)
    assert rows[0]["iters_per_s"] == pytest.approx(2.0)
    assert rows[0]["peak_memory_gb"] == pytest.approx(0.5)
    assert [s["engine"] for s in specs] == ["mlxbastion"]


def test_compare_ratios_from_known_results(model, data, monkeypatch):
    results = {"mlxbastion": fake_result(3.0, 0.4), "mlx-lm": fake_result(2.0, 0.5)}
    monkeypatch.setattr(
        benchmark_train, "_run_worker", lambda run_dir, spec: results[spec["engine"]]
    )
    rows = benchmark_finetune(
        model,
        data,
        fine_tune_types="lora",
        iters=3,
        warmup_iters=1,
        num_layers=-1,
        compare_mlx_lm=True,
    )
    assert rows[0]["train_tokens_per_s_ratio"] == pytest.approx(1.5)
    assert rows[0]["iters_per_s_ratio"] == pytest.approx(1.5)
    assert rows[0]["peak_memory_ratio"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": "missing"}, r"data folder .*missing does not exist"),
        ({"drop": "train.jsonl"}, r"has no train\.jsonl"),
        ({"drop": "valid.jsonl"}, r"has no valid\.jsonl"),
        ({"fine_tune_types": "lora,dora"}, r"unknown fine-tune type 'dora'"),
        ({"fine_tune_types": ""}, r"unknown fine-tune type ''"),
        ({"warmup_iters": 4}, r"--warmup-iters must be between 1 and"),
        ({"warmup_iters": 0}, r"--warmup-iters must be between 1 and"),
        ({"learning_rate": 0.0}, r"--learning-rate must be a positive"),
    ],
)
def test_bad_input_is_one_line_value_error(model, data, tmp_path, change, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        if change.get("drop") != name:
            (folder / name).write_text((data / name).read_text())
    kwargs = {"iters": 4, "warmup_iters": 1}
    kwargs.update({k: v for k, v in change.items() if k not in ("data", "drop")})
    target = tmp_path / change["data"] if "data" in change else folder
    with pytest.raises(ValueError, match=message) as error:
        benchmark_finetune(model, target, **kwargs)
    assert "\n" not in str(error.value)


def test_lora_on_an_already_quantized_model_is_refused(rows, work, data):
    with pytest.raises(ValueError, match="already quantized"):
        benchmark_finetune(
            work / "qlora-base", data, fine_tune_types="lora", num_layers=-1
        )


def test_more_layers_than_blocks_become_every_block(model, data, monkeypatch):
    specs = []

    def worker(run_dir, spec):
        specs.append(spec)
        return fake_result(2.0, 0.5)

    monkeypatch.setattr(benchmark_train, "_run_worker", worker)
    rows = benchmark_finetune(model, data, fine_tune_types="lora", iters=3)
    # mlx-lm's trainer refuses 16 on a 5-block model; both get 5.
    assert specs[0]["num_layers"] == rows[0]["num_layers"] == 5


def test_a_failed_run_is_one_line_naming_the_cause(model, tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    line = json.dumps({"messages": turns})
    for split in ("train", "valid"):
        (chat / f"{split}.jsonl").write_text((line + "\n") * 4)
    with pytest.raises(benchmark_train.WorkerFailed, match="chat template") as error:
        benchmark_finetune(model, chat, fine_tune_types="lora", iters=3)
    assert "\n" not in str(error.value)
    assert "mlxbastion training run failed" in str(error.value)
