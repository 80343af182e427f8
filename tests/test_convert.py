"""Checkpoint conversion: sources, output layout, mlx-lm interop, dtypes, safety.

A tiny random Llama (hidden 64, 2 layers, vocab 512) is built once with
transformers and saved three ways; stories260K, a real 260K-parameter Llama,
checks greedy tokens against its recorded reference and against mlx-lm.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import STORIES_DIR, require
from mlx.utils import tree_flatten

from mlxbastion import checkpoint
from mlxbastion.checkpoint import load_model
from mlxbastion.convert import convert
from mlxbastion.torch_bin import load_torch_bin

# The package re-exports the function ``convert``, which shadows the module.
convert_module = importlib.import_module("mlxbastion.convert")

STORIES = STORIES_DIR
PROMPT_IDS = [1, 403, 407, 261, 378]
# Token ids fed to the tiny model when comparing logits with transformers.
TINY_IDS = [1, 403, 407, 261, 378, 5, 9, 500]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}</s>{% endfor %}"
)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@dataclass
class TinyHF:
    """The tiny model saved in each source layout, and what transformers says."""

    folders: dict[str, Path]
    state: dict[str, np.ndarray]
    logits: np.ndarray


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> TinyHF:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TINY_IDS])).logits[0].numpy()
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    root = tmp_path_factory.mktemp("tiny_hf")
    folders = {kind: root / kind for kind in ("single", "sharded", "bin")}
    model.save_pretrained(folders["single"])
    model.save_pretrained(folders["sharded"], max_shard_size="100KB")
    # transformers 5 only writes safetensors; a .bin is what torch.save writes.
    folders["bin"].mkdir()
    torch.save(model.state_dict(), folders["bin"] / "pytorch_model.bin")
    shutil.copyfile(folders["single"] / "config.json", folders["bin"] / "config.json")
    for folder in folders.values():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(_stories_hf() / name, folder / name)
    return TinyHF(folders=folders, state=state, logits=logits)


@pytest.fixture
def src(tmp_path, tiny_hf) -> Path:
    """A private, writable copy of the single-file tiny source."""
    return Path(shutil.copytree(tiny_hf.folders["single"], tmp_path / "src"))


def _stories_hf() -> Path:
    return require(STORIES / "hf" / "model.safetensors").parent


def _reference_tokens(n: int = 20) -> list[int]:
    reference = json.loads((STORIES / "reference.json").read_text())
    assert reference["greedy_30"]["prompt_ids"] == PROMPT_IDS
    return reference["greedy_30"]["new_ids"][:n]


def _greedy(model, cache: list, n: int = 20) -> list[int]:
    """Argmax decoding from PROMPT_IDS, through the KV cache."""
    inputs, tokens = mx.array([PROMPT_IDS]), []
    for _ in range(n):
        token = mx.argmax(model(inputs, cache=cache)[0, -1]).item()
        tokens.append(token)
        inputs = mx.array([[token]])
    return tokens


def _ours_greedy(folder: Path) -> list[int]:
    model, _, _ = load_model(folder)
    return _greedy(model, model.make_cache())


def _mlx_lm_greedy(folder: Path) -> list[int]:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm.load(str(folder))
    return _greedy(model, make_prompt_cache(model))


def _logits(folder: Path) -> np.ndarray:
    model, _, _ = load_model(folder)
    return np.array(model(mx.array([TINY_IDS]))[0].astype(mx.float32))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit`` to the weights dict of a single-file folder, in place."""
    path = folder / "model.safetensors"
    weights = dict(mx.load(str(path)))
    edit(weights)
    mx.save_safetensors(str(path), weights)


def _bf16_source(src: Path) -> Path:
    def to_bf16(weights: dict) -> None:
        weights.update({k: v.astype(mx.bfloat16) for k, v in weights.items()})

    _rewrite_weights(src, to_bf16)
    config = _config(src)
    config["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    return src


def _leftovers(parent: Path) -> list[str]:
    names = [p.name for p in parent.iterdir()]
    return [name for name in names if ".partial-" in name or ".old-" in name]


# ---------------------------------------------------------------------------
# 1. Sources


@pytest.mark.parametrize("kind", ["single", "sharded", "bin"])
def test_each_source_layout_gives_the_same_weights_and_logits(tmp_path, tiny_hf, kind):
    source = tiny_hf.folders[kind]
    if kind == "sharded":
        assert len(list(source.glob("model-*.safetensors"))) > 1
        assert (source / "model.safetensors.index.json").is_file()

    out = convert(source, tmp_path / "out")

    written = mx.load(str(out / "model.safetensors"))
    assert set(written) == set(tiny_hf.state)
    for name, expected in tiny_hf.state.items():
        np.testing.assert_array_equal(np.array(written[name]), expected, err_msg=name)
    np.testing.assert_allclose(_logits(out), tiny_hf.logits, atol=1e-4, rtol=1e-4)


def test_torch_bin_reads_views_and_dtypes_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "offset_view": base[1:],
        "transposed": base.t(),
        "bf16": torch.tensor([1.5, -2.25, 1e5], dtype=torch.bfloat16),
        "half": torch.tensor([0.5, 65504.0], dtype=torch.float16),
        "long": torch.tensor([3, -7], dtype=torch.int64),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)

    loaded = load_torch_bin(path)

    assert set(loaded) == set(state)
    assert loaded["bf16"].dtype == mx.bfloat16
    assert loaded["half"].dtype == mx.float16
    assert loaded["long"].dtype == mx.int64
    for name, tensor in state.items():
        np.testing.assert_array_equal(
            np.array(loaded[name].astype(mx.float32)),
            tensor.float().numpy(),
            err_msg=name,
        )


class _Evil:
    marker: Path

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_malicious_bin_is_refused_without_running_it(tmp_path, tiny_hf, fmt):
    torch = pytest.importorskip("torch")
    source = Path(shutil.copytree(tiny_hf.folders["bin"], tmp_path / "src"))
    marker = tmp_path / "pwned"
    payload = {Q_PROJ: torch.zeros(2), "x": _Evil(marker)}
    path = source / "pytorch_model.bin"
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")

    with pytest.raises(ValueError, match="pytorch_model.bin") as info:
        convert(source, tmp_path / "out")

    message = str(info.value)
    assert "\n" not in message
    if fmt == "zip":
        assert "refusing to load posix.system" in message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# 2. Output layout


def test_stories_output_layout(tmp_path):
    source = _stories_hf()
    assert "rope_theta" not in _config(source)  # transformers 5 layout
    calls = []

    out = convert(source, tmp_path / "out", progress=lambda *a: calls.append(a))

    config = _config(out)
    assert config["rope_theta"] == 10000.0
    assert "rope_parameters" not in config
    assert config["torch_dtype"] == "float32"
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 5
    weights = mx.load(str(out / "model.safetensors"))
    assert len(weights) == 2 + 9 * 5 + 1
    assert weights["model.layers.4.mlp.down_proj.weight"].shape == (64, 172)
    assert all(w.dtype == mx.float32 for w in weights.values())
    assert calls[-1] == (len(weights), len(weights))
    assert (out / "tokenizer.json").read_bytes() == (
        source / "tokenizer.json"
    ).read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == "</s>"
    assert "chat_template" not in tok_config
    # The source files are read-only; the written folder must still be ours.
    for path in [out, *out.iterdir()]:
        assert path.stat().st_mode & stat.S_IWUSR, path.name
    assert out.stat().st_mode & 0o777 == _plain_mkdir_mode(tmp_path)


def _plain_mkdir_mode(tmp_path: Path) -> int:
    probe = tmp_path / "probe"
    probe.mkdir()
    return probe.stat().st_mode & 0o777


def test_chat_template_file_is_inlined(tmp_path, src):
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    out = convert(src, tmp_path / "out")

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert text == "<|user|>hi</s>"


@pytest.mark.parametrize(
    ("rope_parameters", "theta", "scaling"),
    [
        ({"rope_theta": 5e5, "rope_type": "default"}, 5e5, None),
        (
            {
                "rope_theta": 5e5,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            5e5,
            "llama3",
        ),
    ],
)
def test_rope_parameters_become_top_level_keys(
    tmp_path, src, rope_parameters, theta, scaling
):
    config = _config(src)
    config["rope_parameters"] = rope_parameters
    (src / "config.json").write_text(json.dumps(config))

    out = convert(src, tmp_path / "out")

    written = _config(out)
    assert written["rope_theta"] == theta
    assert "rope_parameters" not in written
    if scaling is None:
        assert "rope_scaling" not in written
    else:
        assert written["rope_scaling"]["rope_type"] == scaling
        assert written["rope_scaling"]["factor"] == 8.0
    import mlx_lm

    model, _ = mlx_lm.load(str(out))
    ours, _, _ = load_model(out)
    inputs = mx.array([TINY_IDS])
    np.testing.assert_allclose(
        np.array(model(inputs)), np.array(ours(inputs)), atol=1e-4, rtol=1e-4
    )


def test_sharded_output(tmp_path, tiny_hf, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 150_000)

    out = convert(tiny_hf.folders["single"], tmp_path / "out")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        for i in range(1, len(shards) + 1)
    ]
    assert len(shards) > 2
    assert set(index["weight_map"]) == set(tiny_hf.state)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in tiny_hf.state.values()
    )
    for shard in shards:
        tensors = mx.load(str(shard))
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 150_000
    np.testing.assert_allclose(_logits(out), tiny_hf.logits, atol=1e-4, rtol=1e-4)
    assert _mlx_lm_greedy(out) == _ours_greedy(out)


# ---------------------------------------------------------------------------
# 3. mlx-lm interop


def test_mlx_lm_loads_our_output(tmp_path):
    import mlx_lm

    out = convert(_stories_hf(), tmp_path / "out")

    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("Once upon a time") == PROMPT_IDS
    assert _mlx_lm_greedy(out) == _ours_greedy(out) == _reference_tokens()


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q4g32"])
def test_we_load_mlx_lm_output(tmp_path, quantize):
    import mlx_lm

    out = tmp_path / "mlx_lm"
    options = {"quantize": True, "q_bits": 4, "q_group_size": 32} if quantize else {}
    mlx_lm.convert(str(_stories_hf()), str(out), **options)

    model, config, _ = load_model(out)

    theirs = _mlx_lm_greedy(out)
    assert _greedy(model, model.make_cache()) == theirs
    layer = model.layers[0]
    if quantize:
        assert config["quantization"]["bits"] == 4
        assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
        assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (
            4,
            32,
        )
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
        # 172 input features do not split into groups of 32: kept in float.
        assert type(layer.mlp.down_proj) is nn.Linear
        assert layer.mlp.down_proj.weight.dtype == mx.float32
        # Near the float model: the first few greedy tokens agree.
        assert theirs[:3] == _reference_tokens(3)
    else:
        assert type(layer.self_attn.q_proj) is nn.Linear
        assert theirs == _reference_tokens()


# ---------------------------------------------------------------------------
# 4. dtype


@pytest.mark.parametrize(
    ("source_dtype", "dtype", "expected"),
    [
        ("float32", None, "float32"),
        ("bfloat16", None, "bfloat16"),
        ("float32", "float16", "float16"),
        ("float32", "bfloat16", "bfloat16"),
        ("bfloat16", "float32", "float32"),
        ("bfloat16", "float16", "float16"),
    ],
)
def test_dtype_casts_every_float_tensor(tmp_path, src, source_dtype, dtype, expected):
    if source_dtype == "bfloat16":
        _bf16_source(src)

    out = convert(src, tmp_path / "out", dtype=dtype)

    weights = mx.load(str(out / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {f"mlx.core.{expected}"}
    config = _config(out)
    assert config["torch_dtype"] == expected
    assert config.get("dtype", expected) == expected
    source = mx.load(str(src / "model.safetensors"))
    tolerance = 0 if dtype is None else 1e-2
    for name, w in weights.items():
        np.testing.assert_allclose(
            np.array(w.astype(mx.float32)),
            np.array(source[name].astype(mx.float32)),
            atol=tolerance,
            rtol=tolerance,
            err_msg=name,
        )


def test_unknown_dtype_is_refused(tmp_path, src):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*float16"):
        convert(src, tmp_path / "out", dtype="fp8")
    assert not (tmp_path / "out").exists()


def test_float16_overflow_is_kept_in_float32_with_a_warning(tmp_path, src, caplog):
    _bf16_source(src)

    def plant(weights: dict) -> None:
        norm = weights["model.norm.weight"]
        weights["model.norm.weight"] = mx.where(mx.arange(64) == 3, 1e5, norm).astype(
            mx.bfloat16
        )

    _rewrite_weights(src, plant)

    with caplog.at_level(logging.WARNING, logger="mlxbastion"):
        out = convert(src, tmp_path / "out", dtype="float16")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "model.norm.weight" in warnings[0]
    assert "float32" in warnings[0]
    weights = mx.load(str(out / "model.safetensors"))
    norm = weights["model.norm.weight"]
    assert norm.dtype == mx.float32
    assert norm[3].item() == mx.array(1e5).astype(mx.bfloat16).item()
    assert mx.isfinite(norm).all().item()
    others = {str(w.dtype) for k, w in weights.items() if k != "model.norm.weight"}
    assert others == {"mlx.core.float16"}


# ---------------------------------------------------------------------------
# 5. Safety


def test_non_empty_destination_needs_force(tmp_path, src):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    (dst / "config.json").write_text("{}")  # an earlier output

    with pytest.raises(FileExistsError, match="--force"):
        convert(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "keep.txt"]

    convert(src, dst, force=True)
    assert not (dst / "keep.txt").exists()
    assert (dst / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_empty_destination_is_used_without_force(tmp_path, src):
    dst = tmp_path / "out"
    dst.mkdir()

    convert(src, dst)

    assert (dst / "config.json").is_file()
    assert _leftovers(tmp_path) == []


def test_source_as_destination_is_refused(src):
    with pytest.raises(ValueError, match="must differ"):
        convert(src, src, force=True)
    assert (src / "model.safetensors").is_file()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "forced"])
def test_failure_midway_leaves_destination_as_it_was(
    tmp_path, src, monkeypatch, error, existing
):
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "config.json").write_text("mine")

    def fail(folder: Path, weights: dict, progress=None) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise error("disk full")

    monkeypatch.setattr(convert_module, "save_weights", fail)

    with pytest.raises(error, match="disk full"):
        convert(src, dst, force=existing)

    if existing:
        assert [p.name for p in dst.iterdir()] == ["config.json"]
        assert (dst / "config.json").read_text() == "mine"
    else:
        assert not dst.exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# 6. Bad input


def _no_config(src: Path) -> None:
    (src / "config.json").unlink()


def _bad_json(src: Path) -> None:
    (src / "config.json").write_text('{"model_type": "llama",')


def _edit_config(**changes):
    def edit(src: Path) -> None:
        config = _config(src)
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))

    return edit


def _drop_config_key(key: str):
    def edit(src: Path) -> None:
        config = _config(src)
        del config[key]
        (src / "config.json").write_text(json.dumps(config))

    return edit


def _config_only(model_type: str):
    def edit(src: Path) -> None:
        _edit_config(model_type=model_type)(src)
        (src / "model.safetensors").unlink()

    return edit


def _drop_shard(src: Path) -> None:
    shutil.rmtree(src)
    shutil.copytree(src.parent / "sharded", src)
    (src / "model-00002-of-00006.safetensors").unlink()


def _drop_tensor(src: Path) -> None:
    _rewrite_weights(src, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))


def _extra_tensor(src: Path) -> None:
    _rewrite_weights(src, lambda w: w.update({"model.extra.weight": mx.zeros(3)}))


def _wrong_shape(src: Path) -> None:
    _rewrite_weights(src, lambda w: w.update({Q_PROJ: mx.zeros((32, 64))}))


def _truncate(name: str):
    def edit(src: Path) -> None:
        if name == "pytorch_model.bin":
            shutil.rmtree(src)
            shutil.copytree(src.parent / "bin", src)
        data = (src / name).read_bytes()
        (src / name).write_bytes(data[: len(data) // 2])

    return edit


def _no_weights(src: Path) -> None:
    (src / "model.safetensors").unlink()


def _gone(src: Path) -> None:
    shutil.rmtree(src)


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}


BAD_INPUTS = [
    ("missing_config", _no_config, FileNotFoundError, r"has no config\.json"),
    ("invalid_json", _bad_json, ValueError, r"config\.json is not valid JSON"),
    (
        "unsupported_model_type",
        _config_only("gpt2"),
        ValueError,
        r"unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3",
    ),
    (
        "null_model_type",
        _edit_config(model_type=None),
        ValueError,
        "unsupported model_type None",
    ),
    (
        "missing_config_key",
        _drop_config_key("hidden_size"),
        ValueError,
        "missing hidden_size",
    ),
    (
        "missing_shard",
        _drop_shard,
        FileNotFoundError,
        r"shard model-00002-of-00006\.safetensors",
    ),
    (
        "missing_tensor",
        _drop_tensor,
        ValueError,
        r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing",
    ),
    (
        "unexpected_tensor",
        _extra_tensor,
        ValueError,
        r"unexpected tensor model\.extra\.weight",
    ),
    (
        "wrong_shape",
        _wrong_shape,
        ValueError,
        r"q_proj\.weight has shape \(32, 64\) but the config implies \(64, 64\)",
    ),
    (
        "truncated_safetensors",
        _truncate("model.safetensors"),
        ValueError,
        r"model\.safetensors: it is truncated",
    ),
    (
        "truncated_bin",
        _truncate("pytorch_model.bin"),
        ValueError,
        r"pytorch_model\.bin: .*truncated",
    ),
    ("no_weights", _no_weights, FileNotFoundError, r"no weights in .*safetensors"),
    ("nonexistent_path", _gone, FileNotFoundError, r"src' does not exist"),
    (
        "pre_quantized_gptq",
        _edit_config(quantization_config=GPTQ),
        ValueError,
        r"pre-quantized \(gptq\)",
    ),
]


@pytest.mark.parametrize(
    ("breaks", "error", "pattern"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input_is_a_one_line_error(tmp_path, tiny_hf, src, breaks, error, pattern):
    # Sibling layouts are reachable from ``src`` for the cases that need them.
    for kind in ("sharded", "bin"):
        shutil.copytree(tiny_hf.folders[kind], tmp_path / kind)
    breaks(src)

    with pytest.raises(error, match=pattern) as info:
        convert(src, tmp_path / "out")

    assert "\n" not in str(info.value)
    assert "Traceback" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_unsupported_model_type_is_refused_before_weights_are_read(src, monkeypatch):
    _config_only("gpt2")(src)

    def no_reading(path):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoint, "load_weights", no_reading)
    monkeypatch.setattr(convert_module, "load_weights", no_reading)

    for load in (lambda: load_model(src), lambda: convert(src, src.parent / "out")):
        with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
            load()


# ---------------------------------------------------------------------------
# 7. Compute dtype on load


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", mx.float32), (None, mx.bfloat16), ("float16", mx.float16)],
)
def test_load_model_dtype(tmp_path, src, dtype, expected):
    assert mx.default_device() == mx.cpu
    out = convert(_bf16_source(src), tmp_path / "out")

    model, config, folder = load_model(out, dtype=dtype)

    assert folder == out
    assert config["torch_dtype"] == "bfloat16"
    params = dict(tree_flatten(model.parameters()))
    assert len(params) == len(mx.load(str(out / "model.safetensors")))
    assert {name: p.dtype for name, p in params.items()} == dict.fromkeys(
        params, expected
    )


def test_load_model_dtype_keeps_quantized_weights_packed(tmp_path):
    import mlx_lm

    out = tmp_path / "q"
    mlx_lm.convert(
        str(_stories_hf()), str(out), quantize=True, q_bits=4, q_group_size=32
    )

    model, _, _ = load_model(out, dtype="auto")

    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == mx.uint32
    assert q_proj.scales.dtype == mx.float32
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.float32
