"""Quantization: recipes, budgets, GPTQ, the report, the saved format (loaded by
mlx-lm too) and the ``quantize`` / ``convert -q`` commands.

Real figures come from stories260K (float32, untied; its ``lm_head`` equals its
embedding, so dropping it gives a real tied model); sizes at scale from a
random model with SmolLM2-135M's shape; plan logic from tiny random Llamas.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
import yaml
from click.testing import CliRunner, Result
from helpers import SHARED_DIR, STORIES_DIR, require
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlxbastion
from mlxbastion.checkpoint import save_config, save_weights
from mlxbastion.cli import main
from mlxbastion.config import ModelArgs
from mlxbastion.convert import convert
from mlxbastion.model import Model
from mlxbastion.perplexity import make_windows, read_texts
from mlxbastion.quant import (
    Calibration,
    LayerSpec,
    data_dir,
    format_bytes,
    kv_cache_bytes,
    load_recipe,
    plan_for_budget,
    plan_from_recipe,
    planned_bytes,
    quantizable_layers,
    quantization_config,
    quantize_layers,
)
from mlxbastion.quantization import REPORT_FILE, QuantizeOptions, quantize
from mlxbastion.tokenizer import load_tokenizer

TINYSTORIES = SHARED_DIR / "data" / "tinystories" / "tinystories_val_sample.txt"
RECIPES = ["mixed-3-6", "mixed-4-6", "mixed-4-8", "uniform-4", "uniform-8"]
STORIES_DOWN_PROJ = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


# ---------------------------------------------------------------------------
# Models and helpers


def tiny_args(**changes: object) -> ModelArgs:
    """A small Llama with stories260K's vocabulary (so its tokenizer fits)."""
    config = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    )
    return ModelArgs(**{**config, **changes})


def tiny_model(seed: int = 0, scale: float = 4.0, **changes: object) -> Model:
    """Random weights, matrices scaled up so greedy decoding does not get stuck
    on one token."""
    mx.random.seed(seed)
    model = Model(tiny_args(**changes))
    model.update(
        tree_map(lambda v: v * scale if v.ndim == 2 else v, model.parameters())
    )
    mx.eval(model.parameters())
    return model


def save_model(model: Model, dst: Path, dtype: str = "float32") -> Path:
    """An MLX model folder with stories260K's tokenizer."""
    dst.mkdir(parents=True)
    model.set_dtype(getattr(mx, dtype))
    save_weights(dst, dict(tree_flatten(model.parameters())))
    save_config(dst, {**model.args.to_dict(), "torch_dtype": dtype})
    hf = require(STORIES_DIR / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf / name, dst / name)
    return dst


def greedy(model: nn.Module, prompt: list[int], n: int = 20) -> list[int]:
    """``n`` greedy tokens, each from a full forward pass (no cache), so that
    ours and mlx-lm's model run exactly the same computation."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        ids.append(mx.argmax(logits).item())
    return ids[len(prompt) :]


def log_softmax(model: nn.Module, ids: list[int]) -> mx.array:
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(file)))
    return out


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def read_report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text())


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="mlxbastion")


def quantize_cli(model: Path, dst: Path, *args: object) -> tuple[dict, Result]:
    result = invoke("quantize", "--model", model, "--mlx-path", dst, *args)
    assert result.exit_code == 0, result.stderr
    return read_report(dst), result


def one_line_error(result: Result, out: Path) -> str:
    """The single ``error:`` line of a failed run that left nothing behind."""
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    return line


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(require(STORIES_DIR / "reference.json").read_text())


@pytest.fixture(scope="module")
def prompt(reference: dict) -> list[int]:
    return reference["greedy_30"]["prompt_ids"]


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted once (float32, untied)."""
    root = tmp_path_factory.mktemp("stories")
    return convert(require(STORIES_DIR / "hf"), root / "stories")


@pytest.fixture(scope="module")
def tied_stories(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K with its head tied: llama2.c trained it with shared weights,
    so this is the same model, stored the tied way."""
    weights = tensors(stories)
    assert mx.array_equal(
        weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    )
    dst = tmp_path_factory.mktemp("tied") / "tied"
    shutil.copytree(stories, dst)
    (dst / "model.safetensors").unlink()
    save_weights(dst, {k: v for k, v in weights.items() if not k.startswith("lm_head")})
    save_config(dst, {**read_config(stories), "tie_word_embeddings": True})
    return dst


@pytest.fixture(scope="module")
def random_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tied model with rope_theta 100000 (which mlx-lm must read)."""
    model = tiny_model(seed=3, num_hidden_layers=3, tie_word_embeddings=True)
    return save_model(model, tmp_path_factory.mktemp("random") / "random")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Separate calibration and evaluation text from TinyStories: the first
    ~6,000 tokens for evaluation, ~5,000 from the middle for calibration."""
    full = require(TINYSTORIES).read_text()
    root = tmp_path_factory.mktemp("texts")
    (root / "eval.txt").write_text(full[:12_000])
    (root / "calibration.txt").write_text(full[len(full) // 2 :][:10_000])
    return {"eval": root / "eval.txt", "calibration": root / "calibration.txt"}


@pytest.fixture(scope="module")
def quantized(
    stories: Path,
    tied_stories: Path,
    random_tied: Path,
    texts: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[Path, dict]]:
    """``quantized(source, **options)``: a folder and its report, made once per
    source and options. ``data=True`` uses the TinyStories split (2,048
    calibration and, unless given, 4,096 evaluation tokens in windows of 256)."""
    sources = {"stories": stories, "tied": tied_stories, "random": random_tied}
    root = tmp_path_factory.mktemp("quantized")
    made: dict[tuple, tuple[Path, dict]] = {}

    def get(source: str = "stories", data: bool = False, **options):
        if data:
            options = {
                "calibration_data": str(texts["calibration"]),
                "eval_data": str(texts["eval"]),
                "calibration_tokens": 2048,
                "eval_tokens": 4096,
                **options,
            }
        key = (source, tuple(sorted(options.items())))
        if key not in made:
            dst = root / f"q{len(made)}"
            made[key] = dst, quantize(sources[source], dst, QuantizeOptions(**options))
        return made[key]

    return get


SIZES_ONLY = {"method": "rtn", "evaluate": False}


# ---------------------------------------------------------------------------
# Recipes


def recipe_plan(n_layers: int, body: int, high: int, blocks: set[int], g: int = 64):
    """What a mixed recipe promises: embedding and head at ``high``, v_proj and
    down_proj at ``high`` in ``blocks``, everything else at ``body``."""
    plan = {"model.embed_tokens": LayerSpec(high, g), "lm_head": LayerSpec(high, g)}
    for i in range(n_layers):
        for name in PROJECTIONS:
            sensitive = name in ("self_attn.v_proj", "mlp.down_proj") and i in blocks
            plan[f"model.layers.{i}.{name}"] = LayerSpec(high if sensitive else body, g)
    return plan


# 16 blocks: the first eighth {0, 1}, the last eighth {14, 15} and every third
# block counting from the first, {0, 3, 6, 9, 12, 15} (``every: 3`` selects the
# blocks whose index divides by 3).
MIXED_BLOCKS = {0, 1, 3, 6, 9, 12, 14, 15}


@pytest.mark.parametrize(
    ("recipe", "body", "high", "blocks"),
    [
        ("mixed-4-6", 4, 6, MIXED_BLOCKS),
        ("mixed-3-6", 3, 6, MIXED_BLOCKS),
        ("mixed-4-8", 4, 8, set(range(16))),
        ("uniform-4", 4, 4, set()),
        ("uniform-8", 8, 8, set()),
    ],
)
def test_recipe_selects_the_promised_layers_on_16_blocks(recipe, body, high, blocks):
    model = Model(tiny_args(num_hidden_layers=16))
    plan = plan_from_recipe(model, load_recipe(recipe))
    assert plan == recipe_plan(16, body, high, blocks)


def test_bits_and_group_size_replace_the_defaults_but_rules_keep_their_bits():
    model = Model(tiny_args(num_hidden_layers=16))
    plan = plan_from_recipe(model, load_recipe("mixed-4-6"), bits=3, group_size=32)
    assert plan == recipe_plan(16, 3, 6, MIXED_BLOCKS, g=32)


def test_layers_whose_input_does_not_divide_stay_float():
    """intermediate_size 96: down_proj's input divides by 32 but not by 64."""
    model = Model(tiny_args(intermediate_size=96))
    for group_size, kept in ((32, set()), (64, {"mlp.down_proj"})):
        plan = plan_from_recipe(model, load_recipe("uniform-4"), group_size=group_size)
        assert {p.split(".", 3)[-1] for p, s in plan.items() if s is None} == kept
        config = quantization_config(plan)
        for i in range(2):
            expected = False if kept else None
            assert config.get(f"model.layers.{i}.mlp.down_proj") is expected


def test_a_recipe_file_path_works(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "bits: 5\ngroup_size: 32\nrules:\n"
        "  - match: '*.mlp.*'\n    bits: 8\n    layers: {last: 0.25}\n"
        "  - match: model.embed_tokens\n    bits: 3\n    group_size: 64\n"
    )
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.bits, recipe.group_size) == ("mine", 5, 32)

    plan = plan_from_recipe(Model(tiny_args(num_hidden_layers=16)), recipe)
    high = {p for p, s in plan.items() if s.bits == 8}
    assert high == {
        f"model.layers.{i}.mlp.{n}"
        for i in (12, 13, 14, 15)
        for n in ("gate_proj", "up_proj", "down_proj")
    }
    assert plan["model.embed_tokens"] == LayerSpec(3, 64)
    assert {s for p, s in plan.items() if p not in high | {"model.embed_tokens"}} == {
        LayerSpec(5, 32)
    }


def test_quantize_takes_a_recipe_file(stories, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "bits: 5\ngroup_size: 32\nrules:\n"
        "  - match: '*.mlp.*'\n    bits: 8\n    layers: {last: 0.25}\n"
        "  - match: model.embed_tokens\n    bits: 3\n    group_size: 64\n"
    )
    report, _ = quantize_cli(
        stories, tmp_path / "out", "--recipe", path, "--method", "rtn", "--no-eval"
    )
    eight = {"bits": 8, "group_size": 32}
    # 5 blocks: the last quarter is blocks 3 and 4; down_proj stays float.
    assert read_config(tmp_path / "out")["quantization"] == {
        "bits": 5,
        "group_size": 32,
        "mode": "affine",
        "model.embed_tokens": {"bits": 3, "group_size": 64},
        **{
            f"model.layers.{i}.mlp.{n}": eight
            for i in (3, 4)
            for n in ("gate_proj", "up_proj")
        },
        **dict.fromkeys(STORIES_DOWN_PROJ, False),
    }
    assert report["recipe"] == str(path)
    assert report["recipe_overrides"] == {}


def test_unknown_recipe_names_the_available_ones():
    assert sorted(p.stem for p in (data_dir() / "recipes").glob("*.yaml")) == RECIPES
    with pytest.raises(ValueError) as e:
        load_recipe("mixed-9-9")
    assert str(e.value) == (
        "unknown recipe 'mixed-9-9'; use a YAML file or one of " + ", ".join(RECIPES)
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bits: [4\n", "is malformed (while parsing a flow sequence"),
        ("- bits: 4\n", "is malformed (expected a mapping"),
        ("bits: four\n", "is malformed (invalid literal for int()"),
        ("bits: 7\n", "unsupported bit width 7; use one of 2, 3, 4, 5, 6, 8"),
        ("group_size: 48\n", "unsupported group size 48; use one of 32, 64, 128"),
        ("bits: 4\nrule: []\n", "is malformed (unknown key 'rule' in the recipe"),
        ("rules: {match: lm_head}\n", "is malformed ('rules' must be a list)"),
        ("rules:\n  - bits: 8\n", "every rule needs a 'match' pattern"),
        ("rules:\n  - match: lm_head\n    bit: 8\n", "unknown key 'bit' in the rule"),
        ("rules:\n  - match: lm_head\n    bits: 9\n", "unsupported bit width 9"),
        (
            "rules:\n  - match: '*'\n    layers: {first: half}\n",
            "'layers.first' must be within 0..1, not 'half'",
        ),
        (
            "rules:\n  - match: '*'\n    layers: {every: 0}\n",
            "'layers.every' must be a positive integer, not 0",
        ),
    ],
)
def test_a_malformed_recipe_is_a_one_line_error(stories, tmp_path, text, problem):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = invoke(
        "quantize", "--model", stories, "--mlx-path", out, "--recipe", recipe
    )
    line = one_line_error(result, out)
    assert problem in line
    assert line.startswith(f"error: recipe {recipe}") or "unsupported" in line


# ---------------------------------------------------------------------------
# The saved format: config.json, mlx-lm, our loader


def test_config_records_defaults_overrides_and_float_layers(quantized):
    folder, _ = quantized("stories", recipe="mixed-4-6", group_size=32, **SIZES_ONLY)
    config = read_config(folder)
    six = {"bits": 6, "group_size": 32}
    # 5 blocks: first eighth {0}, last eighth {4}, every third {0, 3}.
    assert config["quantization"] == {
        "bits": 4,
        "group_size": 32,
        "mode": "affine",
        "model.embed_tokens": six,
        "lm_head": six,
        **{f"model.layers.{i}.self_attn.v_proj": six for i in (0, 3, 4)},
        **dict.fromkeys(STORIES_DOWN_PROJ, False),
    }
    assert config["quantization_config"] == config["quantization"]
    weights = tensors(folder)
    assert weights["lm_head.scales"].shape == (512, 64 // 32)
    assert weights["model.layers.0.self_attn.v_proj.weight"].shape == (32, 64 * 6 // 32)
    assert weights["model.layers.1.self_attn.v_proj.weight"].shape == (32, 64 * 4 // 32)
    assert "model.layers.0.mlp.down_proj.scales" not in weights
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32


@pytest.mark.parametrize(
    ("source", "options"),
    [
        ("stories", {"bits": 4, "group_size": 32}),
        ("stories", {"recipe": "mixed-4-6"}),
        ("tied", {"bits": 4, "group_size": 64}),
        ("tied", {"recipe": "mixed-3-6", "group_size": 32}),
        ("random", {"recipe": "mixed-4-8", "group_size": 32}),
        ("random", {"bits": 3, "group_size": 64, "method": "gptq"}),
    ],
)
def test_mlx_lm_loads_our_output_and_decodes_the_same_tokens(
    quantized, prompt, source, options
):
    options = {**SIZES_ONLY, **options}
    folder, report = quantized(source, **options)
    ours, _ = mlxbastion.load(folder)
    theirs, _ = mlx_lm.load(str(folder))

    tokens = greedy(ours, prompt)
    assert greedy(theirs, prompt) == tokens
    assert len(set(tokens)) > 3, "degenerate text proves little"
    # Our CPU kernel sums in another order than MLX's: float32 rounding.
    assert mx.allclose(
        ours(mx.array([prompt + tokens])),
        theirs(mx.array([prompt + tokens])),
        rtol=1e-4,
        atol=1e-4,
    )
    # Both loaders built the layers the report lists, at its bits.
    for model in (ours, theirs):
        built = {
            path: (
                {"group_size": m.group_size, "bits": m.bits}
                if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
                else "float"
            )
            for path, m in model.named_modules()
            if isinstance(
                m, nn.Linear | nn.Embedding | nn.QuantizedLinear | nn.QuantizedEmbedding
            )
        }
        assert built == report["layers"]


@pytest.mark.parametrize("group_size", [32, 64])
def test_report_is_consistent_with_the_folder(quantized, stories, group_size):
    """At g32 the report comes from the GPTQ run with evaluation."""
    if group_size == 32:
        folder, report = quantized("stories", data=True, bits=4, group_size=32)
    else:
        folder, report = quantized("stories", bits=4, group_size=64, **SIZES_ONLY)
    assert read_report(folder) == report
    assert report["size_bytes"] == sum(
        f.stat().st_size for f in folder.glob("*.safetensors")
    )

    float_model, _ = mlxbastion.load(stories)
    assert (
        set(report["layers"])
        == set(quantizable_layers(float_model))
        == {
            "model.embed_tokens",
            "lm_head",
            *(f"model.layers.{i}.{n}" for i in range(5) for n in PROJECTIONS),
        }
    )
    assert report["kept_float"] == STORIES_DOWN_PROJ
    assert {p for p, s in report["layers"].items() if s == "float"} == set(
        STORIES_DOWN_PROJ
    )
    quantized_specs = [s for s in report["layers"].values() if s != "float"]
    assert len(quantized_specs) == 32
    assert all(s == {"group_size": group_size, "bits": 4} for s in quantized_specs)

    # Bits per weight: every stored bit over the float model's weight count.
    n_weights = sum(v.size for _, v in tree_flatten(float_model.parameters()))
    stored_bits = sum(v.nbytes * 8 for v in tensors(folder).values())
    assert report["bits_per_weight"] == pytest.approx(stored_bits / n_weights)
    assert report["float_size_bytes"] == n_weights * 4
    # By hand: 237,056 quantized weights at 4 bits plus a float32 scale and
    # bias per group; 55,744 float32 weights (the five down_proj and norms).
    by_hand = (237_056 * (4 + 64 / group_size) + 55_744 * 32) / 292_800
    assert n_weights == 292_800
    assert report["bits_per_weight"] == pytest.approx(by_hand)
    assert report["bits_per_weight"] == pytest.approx(
        {32: 10.950, 64: 10.140}[group_size], abs=5e-4
    )
    assert report["method"] == ("gptq" if group_size == 32 else "rtn")
    assert report["recipe"] == "uniform-4" and report["budget"] is None
    # --bits and --group-size replaced the recipe's defaults: said so.
    assert report["recipe_overrides"] == {"bits": 4, "group_size": group_size}


def test_report_evaluation_fields(quantized, texts):
    _, report = quantized("stories", data=True, bits=4, group_size=32)
    evaluation = report["evaluation"]
    assert evaluation["data"] == str(texts["eval"])
    assert evaluation["tokens"] == 4096
    assert 3 < evaluation["float_perplexity"] < evaluation["perplexity"] < 6
    assert 0 < evaluation["float_perplexity_se"] < 0.5
    assert 0 < evaluation["perplexity_se"] < 0.5
    assert 0 < evaluation["mean_kl"] < evaluation["rtn_mean_kl"] < 0.5


# ---------------------------------------------------------------------------
# Tied embeddings


def test_tied_head_is_served_by_the_quantized_embedding(
    quantized, tied_stories, reference, prompt
):
    folder, report = quantized("tied", bits=8, group_size=64, **SIZES_ONLY)
    weights = tensors(folder)
    assert not [k for k in weights if k.startswith("lm_head")]
    assert weights["model.embed_tokens.weight"].dtype == mx.uint32
    assert weights["model.embed_tokens.scales"].shape == (512, 1)
    assert read_config(folder)["tie_word_embeddings"] is True
    assert "lm_head" not in report["layers"]

    model, _ = mlxbastion.load(folder)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert "lm_head" not in model
    float_model, _ = mlxbastion.load(tied_stories)
    ids = prompt + reference["greedy_30"]["new_ids"]
    # Logits span about +-22; 8 bits move them by up to ~0.3, which moves no
    # probability by more than ~0.016 (KL about 1e-4 per token).
    ours, exact = log_softmax(model, ids), log_softmax(float_model, ids)
    assert mx.abs(mx.exp(ours) - mx.exp(exact)).max().item() < 0.03
    assert (mx.exp(exact) * (exact - ours)).sum(-1).mean().item() < 1e-3
    assert greedy(model, prompt) == reference["greedy_30"]["new_ids"][:20]


# ---------------------------------------------------------------------------
# Constant and all-zero groups


def with_constant_groups(model: Model) -> None:
    """In every quantizable layer, groups of 32: row 0 all zero in its even
    groups and constant in its odd ones, row 1 a different constant in each
    group, row 2 constant only in its first group; one whole layer all zero.

    No row is zero throughout: a zero row of v_proj or up_proj would make an
    input of o_proj or down_proj always zero, and GPTQ (as in the paper) sets
    the weights of such dead inputs to zero.
    """
    for path, module in quantizable_layers(model).items():
        w = module.weight
        groups = w.shape[1] // 32
        row0 = [0.0 if g % 2 == 0 else 0.02 * (g + 1) for g in range(groups)]
        row1 = [(-1) ** g * 0.01 * (g + 1) for g in range(groups)]
        w[0] = mx.repeat(mx.array(row0), 32)
        w[1] = mx.repeat(mx.array(row1), 32)
        w[2, :32] = 0.25
        if path == "model.layers.0.self_attn.o_proj":
            w = mx.zeros_like(w)
        module.weight = w


@pytest.fixture(scope="module")
def constant_model_and_stats() -> tuple[dict, Calibration]:
    model = tiny_model(seed=1)
    with_constant_groups(model)
    tokenizer = load_tokenizer(require(STORIES_DIR / "hf"))
    text = read_texts(data_dir() / "data" / "calibration.txt", tokenizer)
    windows = make_windows(tokenizer, text, sequence_length=64, num_windows=8)
    stats = Calibration.collect(model, windows)
    return dict(tree_flatten(model.parameters())), stats


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits", [3, 8])
def test_constant_and_zero_groups_get_finite_scales_and_exact_values(
    constant_model_and_stats, bits, method, dtype
):
    weights, stats = constant_model_and_stats
    model = Model(tiny_args())
    model.update(tree_unflatten(list(weights.items())))
    original = {p: m.weight.astype(dtype) for p, m in quantizable_layers(model).items()}

    plan = dict.fromkeys(original, LayerSpec(bits, 32))
    quantize_layers(model, plan, method=method, stats=stats, dtype=dtype)

    for path, module in model.named_modules():
        if path not in original:
            continue
        assert isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
        if isinstance(module, nn.QuantizedLinear):
            # Every input is live, so GPTQ zeroes nothing.
            assert (mx.diag(stats.hessian(path)) > 0).all()
        assert mx.isfinite(module.scales).all() and mx.isfinite(module.biases).all()
        w = mx.dequantize(
            module.weight, module.scales, module.biases, group_size=32, bits=bits
        )
        expected = original[path]
        # Whole rows of constant groups leave GPTQ no error to spread, so both
        # methods must reproduce them exactly, zero and the float16 values.
        assert mx.array_equal(w[:2], expected[:2])
        if method == "rtn" or isinstance(module, nn.QuantizedEmbedding):
            assert mx.array_equal(w[2, :32], expected[2, :32])
        if path == "model.layers.0.self_attn.o_proj":
            assert not mx.any(w).item()
    assert mx.isfinite(model(mx.array([[1, 403, 407]]))).all()


# ---------------------------------------------------------------------------
# Budgets


@pytest.fixture(scope="module")
def calibration_windows() -> mx.array:
    tokenizer = load_tokenizer(require(STORIES_DIR / "hf"))
    text = read_texts(data_dir() / "data" / "calibration.txt", tokenizer)
    return make_windows(tokenizer, text, sequence_length=128, num_windows=4)


def budget_model(windows: mx.array, hot: str | None = None):
    """A 4-block random model and its calibration; ``hot`` inflates one layer:
    down_proj's weights (its rounding error grows 900-fold) or the final norm
    (the head's inputs, and so its error, grow likewise)."""
    model = tiny_model(seed=0, num_hidden_layers=4)
    if hot == "weights":
        layer = model.layers[1].mlp.down_proj
        layer.weight = layer.weight * 30
    elif hot == "inputs":
        model.model.norm.weight = model.model.norm.weight * 30
    return model, Calibration.collect(model, windows)


def uniform_bytes(model: Model, bits: int) -> int:
    plan = dict.fromkeys(quantizable_layers(model), LayerSpec(bits, 64))
    return planned_bytes(model, plan, 4)


def total_bits(model: Model, plan: dict) -> int:
    layers = quantizable_layers(model)
    return sum(layers[p].weight.size * s.bits for p, s in plan.items())


def test_budget_plans_fit_and_grow_with_the_budget(calibration_windows):
    model, stats = budget_model(calibration_windows)
    kv = kv_cache_bytes(model.args, 64)
    assert kv == 64 * 2 * 4 * 2 * 16 * 2  # tokens, k+v, blocks, kv heads, dim, fp16
    low, high = uniform_bytes(model, 2) + kv, uniform_bytes(model, 8) + kv

    previous = 0
    for step in range(0, 11, 2):
        budget = low + (high - low) * step // 10
        plan = plan_for_budget(model, budget, stats, float_bytes=4, reserved_bytes=kv)
        assert planned_bytes(model, plan, 4) + kv <= budget
        bits = total_bits(model, plan)
        assert bits >= previous
        previous = bits
        if step == 0:
            assert {s.bits for s in plan.values()} == {2}
        if step == 10:
            assert {s.bits for s in plan.values()} == {8}
        if 0 < step < 10:
            # Mixed bits that use the budget: what is left is less than the
            # dearest step of the cheapest layers (k_proj, v_proj: 32 x 64
            # weights, 256 bytes a bit, 512 from 6 to 8 bits).
            assert len({s.bits for s in plan.values()}) > 1
            assert budget - planned_bytes(model, plan, 4) - kv < 512


@pytest.mark.parametrize(
    ("hot", "layer"),
    [("weights", "model.layers.1.mlp.down_proj"), ("inputs", "lm_head")],
)
def test_budget_spends_bits_on_the_most_sensitive_layer_first(
    calibration_windows, hot, layer
):
    model, stats = budget_model(calibration_windows, hot)
    low, high = uniform_bytes(model, 2), uniform_bytes(model, 8)
    plan = plan_for_budget(model, low + (high - low) // 10, stats, float_bytes=4)
    others = [s.bits for p, s in plan.items() if p != layer]
    assert plan[layer].bits >= max(others) + 2

    # Without the inflation that layer is nothing special at this budget.
    plain_model, plain_stats = budget_model(calibration_windows)
    plain = plan_for_budget(
        plain_model, low + (high - low) // 10, plain_stats, float_bytes=4
    )
    assert plain[layer].bits <= max(s.bits for p, s in plain.items() if p != layer)


def test_budget_quantize_fits_weights_and_kv_cache(stories, tmp_path):
    report, result = quantize_cli(
        stories,
        tmp_path / "out",
        *("--budget", "500KB", "--context-length", 64, "--method", "rtn", "--no-eval"),
    )
    budget = report["budget"]
    assert budget["budget_bytes"] == 500_000 and budget["device"] is None
    assert budget["kv_cache_bytes"] == 64 * 2 * 5 * 4 * 8 * 2
    assert budget["total_bytes"] == budget["weights_bytes"] + budget["kv_cache_bytes"]
    assert budget["total_bytes"] <= 500_000
    # The plan's arithmetic is what was written.
    written = sum(v.nbytes for v in tensors(tmp_path / "out").values())
    assert written == budget["weights_bytes"]
    assert report["recipe"] is None
    assert len({str(s) for s in report["layers"].values()}) > 2
    assert f"of {format_bytes(500_000)} (weights" in result.stderr


def test_device_uses_its_profile(stories, tmp_path):
    devices = yaml.safe_load((data_dir() / "devices.yaml").read_text())
    report, result = quantize_cli(
        stories,
        tmp_path / "out",
        *("--device", "iphone-12", "--context-length", 64, "--method", "rtn"),
        "--no-eval",
    )
    budget = report["budget"]
    assert budget["device"] == "iphone-12"
    assert budget["budget_bytes"] == int(devices["iphone-12"]["usable_gb"] * 1e9)
    # 1.8 GB holds stories260K at 8 bits many times over.
    assert {s["bits"] for s in report["layers"].values() if s != "float"} == {8}
    assert "Budget: " in result.stderr and "of 1.800 GB" in result.stderr


# ---------------------------------------------------------------------------
# GPTQ against plain rounding, and 8 bits against float, on stories260K


@pytest.mark.parametrize(
    ("bits", "tokens"),
    # At 3 bits GPTQ's lead is about 30% in perplexity; half the text shows it.
    [(4, 4096), (3, 2048)],
)
def test_gptq_beats_plain_rounding(quantized, bits, tokens):
    _, report = quantized(
        "stories", data=True, bits=bits, group_size=32, eval_tokens=tokens
    )
    evaluation = report["evaluation"]
    assert evaluation["tokens"] == tokens
    assert evaluation["perplexity"] < evaluation["rtn_perplexity"]
    assert evaluation["mean_kl"] < evaluation["rtn_mean_kl"]
    assert evaluation["float_perplexity"] < evaluation["perplexity"]


def test_eight_bits_stay_within_one_percent_of_float(quantized):
    _, report = quantized(
        "stories", data=True, bits=8, group_size=32, method="rtn", eval_tokens=2048
    )
    evaluation = report["evaluation"]
    assert evaluation["tokens"] == 2048
    assert "rtn_perplexity" not in evaluation
    ratio = evaluation["perplexity"] / evaluation["float_perplexity"]
    assert abs(ratio - 1) < 0.01
    assert evaluation["mean_kl"] < 0.001


# ---------------------------------------------------------------------------
# Size on disk at a real size: SmolLM2-135M's shape, random float16 weights


SMOLLM2 = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in SmolLM2-135M's shape, saved in float16 (~270 MB)."""
    model = Model(tiny_args(**SMOLLM2))
    return save_model(model, tmp_path_factory.mktemp("smollm2") / "f16", "float16")


def smollm2_bytes(bits: int, group_size: int) -> int:
    """Codes plus a float16 scale and bias per group, for every linear layer
    and the (tied) embedding; the norms in float16."""
    h, i, v, kv, n = 576, 1536, 49152, 192, 30
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * n
    shapes.append((v, h))
    layers = sum(
        out * in_ * bits // 8 + 2 * out * (in_ // group_size) * 2 for out, in_ in shapes
    )
    return layers + (2 * n + 1) * h * 2


@pytest.mark.parametrize(("bits", "bpw"), [(4, 4.5), (8, 8.5)])
def test_smollm2_shaped_size_matches_the_arithmetic(
    smollm2_shaped, tmp_path, bits, bpw
):
    report, _ = quantize_cli(
        smollm2_shaped,
        tmp_path / "out",
        *("--bits", bits, "--group-size", 64, "--method", "rtn", "--no-eval"),
    )
    expected = smollm2_bytes(bits, 64)
    assert report["size_bytes"] == pytest.approx(expected, rel=0.02)
    # The safetensors header is the only difference: well under 0.2%.
    assert 0 < report["size_bytes"] - expected < expected * 0.002
    assert report["float_size_bytes"] == 134_515_008 * 2
    # 4 (or 8) bits plus 32 bits of scale and bias per 64 weights; the norms'
    # 35,136 float16 weights lift it a little.
    assert report["bits_per_weight"] == pytest.approx(expected * 8 / 134_515_008)
    assert report["bits_per_weight"] == pytest.approx(bpw, abs=0.005)
    assert report["kept_float"] == [] and report["evaluation"] is None
    assert not (tmp_path / "out" / "model-00001-of-00002.safetensors").exists()


# ---------------------------------------------------------------------------
# convert -q


def test_convert_q_quantizes_in_one_step(stories, tmp_path):
    hf = require(STORIES_DIR / "hf")
    options = ("--q-bits", 4, "--q-group-size", 32, "--eval-tokens", 512)
    result = invoke(
        "convert", "--hf-path", hf, "--mlx-path", tmp_path / "cq", "-q", *options
    )
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "cq"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        REPORT_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config, report = read_config(folder), read_report(folder)
    assert config["quantization"] == {
        "bits": 4,
        "group_size": 32,
        "mode": "affine",
        **dict.fromkeys(STORIES_DOWN_PROJ, False),
    }
    assert report["method"] == "gptq" and report["evaluation"]["tokens"] == 512

    lines = result.stderr.splitlines()
    assert lines[0] == f"Saved quantized model to {folder}"
    assert lines[1].startswith(f"Size: {report['size_bytes'] / 1e6:.2f} MB on disk")
    assert lines[1].endswith(f"{report['bits_per_weight']:.3f} bits per weight")
    assert lines[2] == "Layers: 4-bit g32; 5 kept in float"
    assert lines[3:8] == [f"  float: {p}" for p in STORIES_DOWN_PROJ]
    evaluation = report["evaluation"]
    assert lines[8].startswith("Perplexity on 512 tokens of bundled sample text: ")
    assert f"float {evaluation['float_perplexity']:.4f}" in lines[8]
    assert f"gptq {evaluation['perplexity']:.4f}" in lines[8]
    assert lines[9].startswith(
        f"Plain rounding for comparison: {evaluation['rtn_perplexity']:.4f}"
    )
    assert len(lines) == 10

    # The same as converting, then quantizing with the same options.
    quantize_cli(
        stories, tmp_path / "two", "--bits", 4, "--group-size", 32, "--no-eval"
    )
    one_step, two_steps = tensors(folder), tensors(tmp_path / "two")
    assert one_step.keys() == two_steps.keys()
    assert all(mx.array_equal(one_step[k], two_steps[k]) for k in one_step)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--q-bits", 4], "error: --q-bits and --q-group-size need -q"),
        (["--q-group-size", 32], "error: --q-bits and --q-group-size need -q"),
        (
            ["-q", "--eval-data", "missing.txt"],
            "error: --eval-data file missing.txt does not exist",
        ),
        (
            ["-q", "--budget", "1KB", "--method", "rtn", "--no-eval"],
            "error: nothing fits: at 2 bits the weights plus KV cache need "
            "1.623 MB but the budget is 1.000 KB;",
        ),
    ],
)
def test_convert_q_bad_input_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    hf = require(STORIES_DIR / "hf")
    result = invoke("convert", "--hf-path", hf, "--mlx-path", out, *args)
    assert one_line_error(result, out).startswith(message)


# ---------------------------------------------------------------------------
# Bad input through the CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--bits", 7],
            "error: Invalid value for '--bits': '7' is not one of '2', '3', '4', "
            "'5', '6', '8'.",
        ),
        (
            ["--group-size", 48],
            "error: Invalid value for '--group-size': '48' is not one of '32', "
            "'64', '128'.",
        ),
        (
            ["--budget", "1KB"],
            # 2-bit g64 weights (down_proj float) 311,872 bytes + float16 KV
            # cache of 2048 tokens 1,310,720 bytes.
            "error: nothing fits: at 2 bits the weights plus KV cache need "
            "1.623 MB but the budget is 1.000 KB; raise the budget, shorten "
            "--context-length or pick a smaller model",
        ),
        (
            ["--budget", "banana"],
            "error: cannot read the size 'banana'; write it like 1.5GB, 800MB or 2GiB",
        ),
        (["--device", "unknown"], "error: unknown device 'unknown'; use one of "),
        (
            ["--budget", "1GB", "--bits", 4],
            "error: --budget/--device choose the bits per layer; drop --bits and "
            "--recipe",
        ),
        (
            ["--device", "mac-8gb", "--recipe", "uniform-8"],
            "error: --budget/--device choose the bits per layer; drop --bits and "
            "--recipe",
        ),
        (
            ["--budget", "1GB", "--device", "mac-8gb"],
            "error: give either --budget or --device, not both",
        ),
        (
            ["--eval-data", "missing.txt"],
            "error: --eval-data file missing.txt does not exist",
        ),
        (
            ["--calibration-data", "missing.txt"],
            "error: --calibration-data file missing.txt does not exist",
        ),
        (
            ["--recipe", "nope"],
            "error: unknown recipe 'nope'; use a YAML file or one of "
            + ", ".join(RECIPES),
        ),
        (
            ["--group-size", 128, "--method", "rtn", "--no-eval"],
            "error: no layer can be quantized at this group size (every layer's "
            "input size must divide by it); pick a smaller --group-size",
        ),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(stories, tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke("quantize", "--model", stories, "--mlx-path", out, *args)
    line = one_line_error(result, out)
    assert line.startswith(message)
    if "Invalid value" in message:
        assert line.endswith("(see 'mlxbastion quantize --help')")
    if "unknown device" in message:
        devices = yaml.safe_load((data_dir() / "devices.yaml").read_text())
        assert line == message + ", ".join(sorted(devices))


def test_an_already_quantized_model_is_refused_unless_from_float(quantized, tmp_path):
    source, _ = quantized("stories", bits=4, group_size=32, **SIZES_ONLY)
    out = tmp_path / "out"
    refused = invoke("quantize", "--model", source, "--mlx-path", out)
    assert one_line_error(refused, out) == (
        f"error: {source} is already quantized (4-bit); quantizing it again "
        "compounds the error: quantize the original float model, or pass "
        "--from-float to dequantize it first"
    )

    report, result = quantize_cli(
        source,
        out,
        *("--from-float", "--bits", 8, "--method", "rtn", "--eval-tokens", 512),
    )
    assert read_config(out)["quantization"]["bits"] == 8
    assert result.stderr.startswith(f"Saved quantized model to {out}\n")
    # Against the dequantized 4-bit model, 8 bits lose next to nothing.
    assert report["evaluation"]["mean_kl"] < 0.005
    assert report["kept_float"] == STORIES_DOWN_PROJ


def test_a_non_empty_output_needs_force(stories, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("quantize", "--model", stories, "--mlx-path", out)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line == (
        f"error: {out} already exists and is not empty; pass --force to replace "
        "it or pick another --mlx-path"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    args = ("--force", "--method", "rtn", "--no-eval")
    quantize_cli(stories, out, *args)
    assert (out / REPORT_FILE).is_file() and not (out / "keep.txt").exists()


def test_eval_data_shorter_than_a_window_leaves_nothing(stories, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    out = tmp_path / "out"
    result = invoke(
        "quantize", "--model", stories, "--mlx-path", out, "--eval-data", short
    )
    line = one_line_error(result, out)
    assert "fewer than one window of 256" in line


def test_gptq_doing_worse_than_plain_rounding_is_said(monkeypatch, caplog):
    from mlxbastion import quantization
    from mlxbastion.perplexity import Comparison, PerplexityResult

    figures = PerplexityResult(5.0, 0.1, 1.6, 100, 1)
    monkeypatch.setattr(quantization, "_quantized_copy", lambda *a, **k: None)
    monkeypatch.setattr(
        quantization,
        "compare",
        lambda reference, models, windows, progress: [
            Comparison(figures, figures, 0.5),  # GPTQ
            Comparison(figures, figures, 0.2),  # plain rounding
        ],
    )
    options = quantization.QuantizeOptions(method="gptq")
    with caplog.at_level(logging.WARNING, logger="mlxbastion.quantization"):
        evaluation = quantization._evaluate(
            None, None, {}, options, mx.float32, None, None
        )
    assert evaluation["mean_kl"] == 0.5 and evaluation["rtn_mean_kl"] == 0.2
    assert caplog.messages == [
        "plain rounding came closer to the float model than GPTQ (KL 0.20000 "
        "against 0.50000); rerun with --method rtn, or give more "
        "--calibration-data like your use"
    ]
