"""The generation benchmark: its accounting, its roofline bytes, and the
``benchmark`` command end to end on stories260K and on tiny random models.

Speeds are never asserted (they depend on the machine); what is asserted is
the arithmetic that turns clock readings into figures, the bytes counted per
token, and that every row carries its settings, environment and units.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import STORIES_DIR, require
from mlx.utils import tree_flatten

from mlxbastion import benchmark as bench
from mlxbastion.benchmark import RunTiming, run_figures, summarize
from mlxbastion.cli import main
from mlxbastion.config import ModelArgs
from mlxbastion.generate import generate_step
from mlxbastion.model import Model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A stand-in bandwidth for library-level sweeps: 10 GB/s.
BANDWIDTH = 10e9


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def timing(start=0.0, first=1.0, last=3.0, *, warmup=False, batch=1, prompt=100,
           gen=11, peak=0, start_memory=0) -> RunTiming:  # fmt: skip
    return RunTiming(
        engine="mlxbastion",
        warmup=warmup,
        batch_size=batch,
        prompt_tokens=prompt,
        gen_tokens=gen,
        start=start,
        first_token=first,
        last_token=last,
        peak_memory_bytes=peak,
        start_memory_bytes=start_memory,
    )


# ---------------------------------------------------------------------------
# Accounting on synthetic timings


def test_prompt_speed_is_prompt_tokens_over_time_to_first_token():
    figures = run_figures(timing(start=10.0, first=10.5, last=12.5, batch=2))

    assert figures.ttft_s == figures.prefill_s == 0.5
    assert figures.prompt_tps == 2 * 100 / 0.5


def test_decode_speed_leaves_out_the_prompt_time_and_the_first_token():
    # 11 tokens: the first ends the prompt phase, 10 are decoded in 2 s.
    fast_prompt = run_figures(timing(start=0.9, first=1.0, last=3.0))
    slow_prompt = run_figures(timing(start=-50.0, first=1.0, last=3.0))

    assert fast_prompt.decode_tps == slow_prompt.decode_tps == 10 / 2.0
    assert fast_prompt.decode_s == 2.0


def test_decode_speed_counts_generated_tokens_of_every_sequence_only():
    # A longer prompt changes nothing; a batch of 4 decodes 4 x 10 tokens.
    short = run_figures(timing(prompt=10, batch=4))
    long = run_figures(timing(prompt=5000, batch=4))

    assert short.decode_tps == long.decode_tps == 4 * 10 / 2.0


def test_a_run_needs_two_tokens_and_ordered_clocks():
    with pytest.raises(ValueError, match="at least 2 generated tokens"):
        run_figures(timing(gen=1))
    with pytest.raises(ValueError, match="out of order"):
        run_figures(timing(start=2.0, first=1.0))


def test_summary_gives_median_min_and_max_of_the_timed_runs():
    # Decode times 1, 2, 4 and 5 s for 10 tokens: 10, 5, 2.5 and 2 tok/s.
    runs = [timing(first=1.0, last=1.0 + d, peak=p) for d, p in
            [(1, 300), (2, 100), (4, 400), (5, 200)]]  # fmt: skip

    summary = summarize(runs)

    assert summary["decode_tps_median"] == (5 + 2.5) / 2
    assert summary["decode_tps_min"] == 2.0
    assert summary["decode_tps_max"] == 10.0
    assert summary["prompt_tps_median"] == summary["prompt_tps_min"] == 100.0
    assert summary["ttft_s_max"] == 1.0
    assert summary["peak_memory_gb"] == 400 / 1e9
    assert summary["runs"] == 4


def test_summary_leaves_out_a_slow_warm_up():
    runs = [
        timing(start=0.0, first=60.0, last=600.0, warmup=True, peak=10**12),
        timing(first=1.0, last=3.0, peak=500, start_memory=200),
        timing(first=1.0, last=2.0, peak=700, start_memory=550),
        timing(first=1.0, last=5.0, peak=600, start_memory=100),
    ]

    summary = summarize(runs)

    assert summary["runs"] == 3
    assert summary["decode_tps_median"] == 10 / 2.0
    assert summary["decode_tps_min"] == 10 / 4.0
    assert summary["prompt_tps_min"] == summary["prompt_tps_max"] == 100.0
    assert summary["ttft_s_max"] == 1.0
    assert summary["peak_memory_gb"] == 700 / 1e9
    assert summary["run_memory_gb"] == 500 / 1e9


def test_summary_of_warm_ups_only_is_refused():
    with pytest.raises(ValueError, match="no timed runs"):
        summarize([timing(warmup=True)])


def test_mean_decode_context_is_the_prompt_plus_half_the_generation():
    # Decode steps 1..7 attend to 17..23 keys.
    assert bench.mean_decode_context(16, 8) == np.mean(np.arange(17, 24)) == 20.0


# ---------------------------------------------------------------------------
# Bytes read per token

# hidden 64, 2 layers, 2 query heads and 1 kv head of 32, FFN 128, vocab 256.
TINY = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# (out, in) of each block's projections: q, k, v, o, gate, up, down.
BLOCK_LINEARS = [
    (64, 64),
    (32, 64),
    (32, 64),
    (64, 64),
    (128, 64),
    (128, 64),
    (64, 128),
]
NORMS = 2 * 2 + 1  # two per block and the final one, 64 float32 each


def tiny_model(*, tied: bool, bits: int | None = None) -> Model:
    model = Model(ModelArgs.from_dict({**TINY, "tie_word_embeddings": tied}))
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def linear_bytes(out: int, inp: int, bits: int | None) -> int:
    """float32 weights, or codes plus a float32 scale and bias per 32 numbers."""
    if bits is None:
        return out * inp * 4
    return out * inp * bits // 8 + 2 * (out * inp // 32) * 4


def expected_weight_bytes(*, tied: bool, bits: int | None, batch: int) -> int:
    blocks = 2 * sum(linear_bytes(o, i, bits) for o, i in BLOCK_LINEARS)
    table = linear_bytes(256, 64, bits)  # the embedding, (vocab, hidden)
    head = table if tied else linear_bytes(256, 64, bits) + batch * table // 256
    return blocks + NORMS * 64 * 4 + head


@pytest.mark.parametrize("bits", [None, 4], ids=["float32", "4bit"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weight_bytes_count_every_layer_once_and_embedding_rows(tied, bits):
    model = tiny_model(tied=tied, bits=bits)

    for batch in (1, 3):
        assert bench.weight_bytes_per_step(model, batch) == expected_weight_bytes(
            tied=tied, bits=bits, batch=batch
        )


def test_weight_bytes_of_the_tiny_models_written_out():
    # Each block holds 36,864 weights, the head or embedding 16,384. float32:
    # 4 bytes each, plus 1,280 bytes of norms and a 256-byte embedding row.
    assert bench.weight_bytes_per_step(tiny_model(tied=False)) == (
        2 * 147_456 + 1_280 + 65_536 + 256
    )
    assert bench.weight_bytes_per_step(tiny_model(tied=True)) == (
        2 * 147_456 + 1_280 + 65_536
    )
    # 4 bits: half a byte a weight plus a float32 scale and bias per 32.
    assert bench.weight_bytes_per_step(tiny_model(tied=False, bits=4)) == (
        2 * 27_648 + 1_280 + 12_288 + 48
    )


@pytest.mark.parametrize(
    "kv_bits, kv_per_token",
    # Per context token: 2 layers x (key, value) x 1 head x 32 numbers, in
    # float32 (4 bytes), or 8-bit codes plus a float32 scale and bias.
    [(None, 2 * 2 * 32 * 4), (8, 2 * 2 * (32 + 8)), (4, 2 * 2 * (16 + 8))],
)
def test_decode_bytes_per_token_add_the_kv_cache_at_the_mean_context(
    kv_bits, kv_per_token
):
    model = tiny_model(tied=False, bits=4)
    weights = expected_weight_bytes(tied=False, bits=4, batch=1)

    per_token = bench.decode_bytes_per_token(
        model, model.args, prompt_tokens=16, gen_tokens=8, kv_bits=kv_bits,
        kv_group_size=32, kv_itemsize=4,
    )  # fmt: skip

    assert per_token == weights + 20 * kv_per_token


def test_a_batch_shares_the_weights_but_not_rows_or_cache():
    model = tiny_model(tied=False)
    weights = expected_weight_bytes(tied=False, bits=None, batch=4)

    per_token = bench.decode_bytes_per_token(
        model, model.args, prompt_tokens=100, gen_tokens=20, batch_size=4
    )

    assert per_token == weights / 4 + 110 * 2 * 2 * 32 * 4


# ---------------------------------------------------------------------------
# Generation paths


def random_model(**overrides) -> Model:
    model = Model(ModelArgs.from_dict({**TINY, **overrides}))
    mx.random.seed(3)
    weights = [
        (name, 0.1 * mx.random.normal(p.shape) + (1.0 if "norm" in name else 0.0))
        for name, p in tree_flatten(model.parameters())
    ]
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_batched_greedy_gives_each_row_its_single_sequence_tokens(kv_bits):
    # Our model and caches take a batch axis: each row of a batch of 3,
    # prefilled in chunks of 8, continues as it does alone.
    model = random_model()
    prompts = mx.array(bench.make_prompts(256, batch_size=3, prompt_tokens=20, seed=1))
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32)

    steps = list(
        bench.batched_greedy(
            model, prompts, cache=cache, gen_tokens=6, prefill_step_size=8
        )
    )

    alone = [
        [t for t, _ in generate_step(p, model, max_tokens=6, kv_bits=kv_bits,
                                     kv_group_size=32, prefill_step_size=8)]
        for p in prompts
    ]  # fmt: skip
    assert np.array(steps).T.tolist() == alone
    assert cache[0].offset == 20 + 5


def test_prompts_are_seeded_ids_inside_the_vocabulary():
    ids = bench.make_prompts(512, batch_size=2, prompt_tokens=300, seed=0)
    again = bench.make_prompts(512, batch_size=2, prompt_tokens=300, seed=0)

    assert ids.shape == (2, 300)
    assert ids.min() >= 0 and ids.max() < 512
    assert (ids == again).all()
    assert not (ids == bench.make_prompts(512, batch_size=2, prompt_tokens=300,
                                          seed=1)).all()  # fmt: skip


def test_every_run_produces_exactly_the_tokens_asked_for():
    # Generation knows no end-of-sequence token: a run always has them all.
    model = random_model()
    spec = bench.RunSpec(prompts=mx.array([[5, 2, 2, 2]]), gen_tokens=12)

    run = bench.time_run(bench.ours(model), spec)

    assert run.gen_tokens == len(run.tokens) == 12
    assert run.start < run.first_token < run.last_token
    assert run.kv_itemsize == 4


# ---------------------------------------------------------------------------
# End to end on stories260K

ENVIRONMENT = {
    "machine": str, "processor": (str, type(None)), "cpu_count": int,
    "ram_gb": float, "os": str, "python": str, "mlx_version": str,
    "mlx_lm_version": str, "device": str, "metal_available": bool,
    "cuda_available": bool, "blas": (str, type(None)),
    "git_commit": (str, type(None)), "git_dirty": (bool, type(None)),
}  # fmt: skip
FIGURES = [
    f"{name}_{stat}"
    for name in ("prompt_tps", "decode_tps", "ttft_s")
    for stat in ("median", "min", "max")
] + ["peak_memory_gb", "run_memory_gb", "weights_gb", "decode_bytes_per_token",
     "decode_bound_tps", "roofline_fraction"]  # fmt: skip
# stories260K: 1,171,200 bytes of float32 weights, 131,072 of them the untied
# embedding (512 x 64), which is read one 256-byte row per sequence; its KV
# cache takes 2 x 5 layers x 4 heads x 8 x 4 bytes = 1,280 bytes per token.
STORIES_WEIGHTS = 1_171_200
STORIES_TABLE = 131_072
STORIES_KV_PER_TOKEN = 1_280


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory) -> tuple[Result, Path]:
    hf = require(STORIES_DIR / "hf")
    out = tmp_path_factory.mktemp("bench")
    result = invoke(
        "benchmark", "--model", hf, "--prompt-tokens", "16,32", "--gen-tokens", 8,
        "--batch-size", "1,2", "--repeat", 2, "--compare", "mlx-lm",
        "--json", out / "rows.jsonl", "--csv", out / "rows.csv",
        "--plot", out / "speed.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return result, out


@pytest.fixture(scope="module")
def rows(stories_run) -> list[dict]:
    _, out = stories_run
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_one_row_per_combination_with_its_settings(rows):
    # stories260K's folder loads directly: it is a Hugging Face folder.
    assert [(r["prompt_tokens"], r["batch_size"]) for r in rows] == [
        (16, 1), (16, 2), (32, 1), (32, 2)
    ]  # fmt: skip
    for r in rows:
        assert r["model_path"] == str(STORIES_DIR / "hf")
        assert r["model_type"] == "llama"
        assert (r["dtype_setting"], r["dtype"], r["mlx_lm_dtype"]) == (
            "auto", "float32", "float32"
        )  # fmt: skip
        assert r["bits"] is r["group_size"] is r["kv_bits"] is r["kv_group_size"]
        assert r["bits"] is None
        assert (r["gen_tokens"], r["repeat"], r["warmup"], r["seed"]) == (8, 2, 1, 0)
        assert r["prefill_step_size"] == 512
        assert (r["engine"], r["compare"], r["settings"]) == (
            "mlxbastion", "mlx-lm", "defaults"
        )  # fmt: skip


def test_every_row_carries_the_environment(rows):
    for r in rows:
        for key, kind in ENVIRONMENT.items():
            assert isinstance(r[key], kind), key
        assert r["device"] == str(mx.default_device())
        assert r["mlx_version"] == mx.__version__
        assert r["cpu_count"] >= 1 and r["ram_gb"] > 0
        if r["git_commit"] is not None:
            assert len(r["git_commit"]) == 40
    assert len({json.dumps({k: r[k] for k in ENVIRONMENT}) for r in rows}) == 1


def test_figures_are_positive_and_ordered(rows):
    for r in rows:
        for prefix in ("", "mlx_lm_"):
            for key in FIGURES:
                assert r[prefix + key] > 0, prefix + key
            for name in ("prompt_tps", "decode_tps", "ttft_s"):
                low, mid, high = (r[f"{prefix}{name}_{s}"] for s in
                                  ("min", "median", "max"))  # fmt: skip
                assert low <= mid <= high
            # The run with the shortest prefill has the fastest prompt speed.
            prompt = r["prompt_tokens"] * r["batch_size"]
            assert r[f"{prefix}ttft_s_min"] == pytest.approx(
                prompt / r[f"{prefix}prompt_tps_max"], rel=1e-12
            )


def test_ratios_are_ours_over_mlx_lm_medians(rows):
    for r in rows:
        for name in ("prompt_tps", "decode_tps"):
            assert (
                r[f"{name}_ratio"] == r[f"{name}_median"] / r[f"mlx_lm_{name}_median"]
            )


def test_both_engines_give_the_same_greedy_tokens(rows):
    assert all(r["greedy_tokens_match"] for r in rows)


def test_roofline_figures_of_stories260k(rows):
    for r in rows:
        batch, context = r["batch_size"], r["prompt_tokens"] + 8 / 2
        weights = STORIES_WEIGHTS - STORIES_TABLE + batch * 256
        expected = weights / batch + context * STORIES_KV_PER_TOKEN
        assert r["decode_bytes_per_token"] == r["mlx_lm_decode_bytes_per_token"]
        assert r["decode_bytes_per_token"] == expected
        assert r["weights_gb"] == r["mlx_lm_weights_gb"] == STORIES_WEIGHTS / 1e9
        bound = r["bandwidth_gbps"] * 1e9 / expected
        assert r["decode_bound_tps"] == pytest.approx(bound, rel=1e-12)
        assert r["roofline_fraction"] == pytest.approx(
            r["decode_tps_median"] / bound, rel=1e-12
        )
    assert r["bandwidth_gbps"] > 0


def test_csv_holds_the_same_rows(stories_run, rows):
    _, out = stories_run
    with open(out / "rows.csv", newline="") as f:
        table = list(csv.DictReader(f))

    assert len(table) == len(rows)
    assert list(table[0]) == list(rows[0])
    for line, row in zip(table, rows, strict=True):
        assert float(line["decode_tps_median"]) == row["decode_tps_median"]
        assert float(line["decode_tps_ratio"]) == row["decode_tps_ratio"]
        assert line["kv_bits"] == "" and line["machine"] == row["machine"]


def test_plot_is_a_png(stories_run, rows):
    _, out = stories_run
    data = (out / "speed.png").read_bytes()

    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])
    # The legend under the plots adds a row for every two lines.
    lines = len(bench.plot_lines(rows))
    assert (width, height) == (1100, round(100 * (4.5 + 0.2 * math.ceil(lines / 2))))


def test_plot_has_a_line_per_configuration_and_engine(rows):
    lines = bench.plot_lines(rows)

    assert len(lines) == 4  # batch 1 and 2, each engine
    for points in lines.values():
        assert [p[0] for p in points] == [16, 32]


def test_stderr_shows_progress_and_a_table(stories_run):
    result, out = stories_run
    lines = result.stderr.splitlines()

    assert result.stdout == ""
    # 4 combinations x 2 engines x (1 warm-up + 2 repeats).
    assert sum(line.startswith("[") for line in lines) == 4 * 2 * 3
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = lines[header + 2 : header + 6]
    assert [row.split()[4:6] for row in rows] == [
        ["16", "1"], ["16", "2"], ["32", "1"], ["32", "2"]
    ]  # fmt: skip
    assert lines[header + 7].startswith("ratios are ours / mlx-lm")
    assert [line.split()[0] for line in lines[header + 8 :]] == ["Wrote"] * 3
    assert not list(out.glob(".*partial*"))


# ---------------------------------------------------------------------------
# Tiny random folders: KV bits, quantized weights, identical dtypes


def write_folder(folder: Path, *, bits: int | None = None) -> Path:
    """A tiny random llama in the layout both loaders read, with stories260K's
    tokenizer (whose vocabulary is 512)."""
    tokenizer = require(STORIES_DIR / "hf")
    config = {**TINY, "vocab_size": 512, "tie_word_embeddings": True,
              "eos_token_id": 2, "bos_token_id": 1, "rope_theta": 10000.0}  # fmt: skip
    model = random_model(vocab_size=512, tie_word_embeddings=True)
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
        config["quantization"] = {"group_size": 32, "bits": bits}
    folder.mkdir(parents=True)
    mx.save_safetensors(
        str(folder / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


def test_sweep_with_kv_bits_quantized_weights_and_identical_dtypes(tmp_path):
    float_dir = write_folder(tmp_path / "float")
    quant_dir = write_folder(tmp_path / "q4", bits=4)
    options = bench.BenchmarkOptions(
        models=[str(float_dir), str(quant_dir)], prompt_tokens=[12], gen_tokens=4,
        batch_sizes=[2], kv_bits=[None, 8], dtypes=["float16"], repeat=1,
        warmup=0, prefill_step_size=8, compare="mlx-lm",
    )  # fmt: skip

    rows = bench.run_benchmark(options, bandwidth=BANDWIDTH)

    assert [(Path(r["model"]).name, r["kv_bits"]) for r in rows] == [
        ("float", None), ("float", 8), ("q4", None), ("q4", 8)
    ]  # fmt: skip
    for r in rows:
        assert r["settings"] == "identical"
        assert r["dtype"] == r["mlx_lm_dtype"] == "float16"
        assert r["kv_group_size"] == (32 if r["kv_bits"] else None)
        assert r["decode_bytes_per_token"] == r["mlx_lm_decode_bytes_per_token"]
        assert r["bandwidth_gbps"] == 10.0
    assert [(r["bits"], r["group_size"]) for r in rows] == [(None, None)] * 2 + [
        (4, 32)
    ] * 2
    # float16 everywhere: the 8-bit cache's scales are 2 bytes too.
    f16, f16_kv8 = rows[0]["decode_bytes_per_token"], rows[1]["decode_bytes_per_token"]
    assert f16 - f16_kv8 == 14 * 2 * 2 * (32 * 2 - (32 + 2 * 2))


def test_output_files_are_written_all_or_nothing(tmp_path, monkeypatch):
    row = {"model": "m", "decode_tps_median": 1.0}

    def broken_plot(rows, path):
        path.write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(bench, "_write_plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        bench.write_outputs(
            [row], json_path=str(tmp_path / "a.jsonl"),
            csv_path=str(tmp_path / "a.csv"), plot_path=str(tmp_path / "a.png"),
        )  # fmt: skip

    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--prompt-tokens", "16,abc"], "--prompt-tokens takes comma-separated "
         "integers like 128,512; 'abc' is not an integer"),
        (["--batch-size", "0"], "--batch-size values must be at least 1; got 0"),
        (["--prompt-tokens", "2040", "--gen-tokens", 16], "2040 prompt tokens plus "
         "16 generated tokens (2056) exceed the model's context of 2048"),
        (["--compare", "llama.cpp"], "Invalid value for '--compare': 'llama.cpp' "
         "is not 'mlx-lm'"),
        (["--kv-bits", "none,3"], "--kv-bits takes none, 4 or 8 (comma-separated); "
         "got '3'"),
        (["--kv-bits", "8"], "needs head_dim divisible by 32; this model's head_dim "
         "is 8"),
        (["--dtype", "float64"], "--dtype takes auto, float32, bfloat16, float16"),
        (["--plot", "speed.jpg"], "--plot writes a PNG; give a file ending in .png"),
        (["--csv", "missing/rows.csv"], "does not exist; create it first"),
        (["--gen-tokens", 1], "Invalid value for '--gen-tokens'"),
    ],
    ids=["model", "integer", "batch", "context", "compare", "kv-bits", "head-dim",
         "dtype", "plot", "folder", "gen-tokens"],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    defaults = {
        "--model": str(require(STORIES_DIR / "hf")),
        "--prompt-tokens": "16",
        "--json": "rows.jsonl",
    }
    given = dict(zip(args[::2], args[1::2], strict=True))
    flags = [str(a) for item in {**defaults, **given}.items() for a in item]

    result = invoke("benchmark", *flags)

    assert result.exit_code != 0
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert list(tmp_path.iterdir()) == []
