"""Bad inputs and hostile conditions: each gives one clear line, never a traceback
or a half-written folder.

Covers the destination rules of convert (never delete the source or data that
is not an earlier output), hub fallbacks for mistyped paths, corrupt weight
files and shard indexes, malformed config.json values, a full disk, SIGTERM,
tokenizer and chat-template problems, and sampler settings.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import STORIES_DIR, require
from mlx.utils import tree_flatten

from mlxbastion.checkpoint import (
    atomic_output_dir,
    load,
    load_model,
    load_weights,
    resolve_model_path,
)
from mlxbastion.cli import main
from mlxbastion.config import ModelArgs
from mlxbastion.convert import convert
from mlxbastion.model import Model
from mlxbastion.sample import make_logits_processors, make_sampler
from mlxbastion.tokenizer import ChatTemplateError, load_tokenizer
from mlxbastion.torch_bin import load_torch_bin

# The package re-exports the function ``convert``, which shadows the module.
convert_module = importlib.import_module("mlxbastion.convert")

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BROKEN_TEMPLATE = "{% for m in messages %}{{ m['content'] }"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random llama in the Hugging Face layout, stories260K's tokenizer."""
    tokenizer_dir = require(STORIES_DIR / "hf" / "tokenizer.json").parent
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    folder.mkdir()
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(CONFIG))
    mx.save_safetensors(
        str(folder / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    _write_json(folder / "config.json", CONFIG)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture
def src(tmp_path, tiny_folder) -> Path:
    """A private, writable copy of the tiny source."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "src"))


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content))


def _edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    _write_json(path, content)


def _leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name
    )


def _no_reading(*args, **kwargs):
    raise AssertionError("the source was read")


def _cli(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.splitlines()


# ---------------------------------------------------------------------------
# 1. Where convert may write


def test_force_never_replaces_a_folder_holding_the_source(tmp_path, tiny_folder):
    nest = tmp_path / "nest"
    source = Path(shutil.copytree(tiny_folder, nest / "hf"))
    (nest / "config.json").write_text("{}")  # even one that looks like a model

    code, lines = _cli("convert", "--hf-path", source, "--mlx-path", nest, "--force")

    assert code == 1
    assert lines == [
        f"error: --mlx-path {nest} contains the source checkpoint {source}; "
        "writing there would replace the source. Pick a folder outside it"
    ]
    assert (source / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_a_gguf_source_inside_the_destination_is_refused(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    gguf = folder / "m.gguf"
    gguf.write_bytes(b"GGUF")

    with pytest.raises(ValueError, match=r"contains the source checkpoint .*m\.gguf"):
        convert(gguf, folder, force=True)
    assert gguf.read_bytes() == b"GGUF"


def test_a_destination_inside_the_source_is_refused(src):
    with pytest.raises(ValueError, match=r"is inside the source checkpoint"):
        convert(src, src / "mlx")
    assert not (src / "mlx").exists()
    assert _leftovers(src) == []


def test_force_refuses_a_folder_that_is_not_a_model(tmp_path, src):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "cat.jpg").write_bytes(b"meow")

    with pytest.raises(FileExistsError) as info:
        convert(src, dst, force=True)

    assert str(info.value) == (
        f"{dst} is not empty and holds no config.json, so it is not a model "
        "folder written earlier; --force only replaces those. Empty or remove it "
        "yourself, or pick another --mlx-path"
    )
    assert [p.name for p in dst.iterdir()] == ["cat.jpg"]


@pytest.mark.parametrize("mlx_path", ["", ".", "cwd", "..", "/"])
def test_current_directory_or_empty_destination_refused_before_any_work(
    tmp_path, src, monkeypatch, mlx_path
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(convert_module, "resolve_model_path", _no_reading)
    mlx_path = str(work) if mlx_path == "cwd" else mlx_path

    with pytest.raises(ValueError) as info:
        convert(src, mlx_path, force=True)

    if mlx_path == "":
        assert str(info.value) == (
            "--mlx-path is empty; give the name of the folder to write"
        )
    else:
        assert str(info.value) == (
            f"--mlx-path {mlx_path!r} is the current directory or contains it; "
            "give the name of a new folder, such as 'my-model-mlx'"
        )
    assert os.listdir(work) == []


def test_destination_under_a_file_is_one_clear_line(tmp_path, src):
    (tmp_path / "exf").write_text("a file")

    code, lines = _cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "exf/sub")

    assert code == 1
    assert lines == [
        f"error: {tmp_path / 'exf'} is a file, so {tmp_path / 'exf/sub'} cannot "
        "be created inside it; pick another --mlx-path"
    ]


# ---------------------------------------------------------------------------
# 2. Local paths and hub repo ids


class _FakeHub:
    """Stands in for huggingface_hub.snapshot_download, recording each call."""

    def __init__(self, folder: Path, files: list[str], error: Exception | None = None):
        self.folder, self.files, self.error = folder, files, error
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, repo_id: str, *, allow_patterns: list[str]) -> str:
        self.calls.append((repo_id, allow_patterns))
        if self.error is not None:
            raise self.error
        self.folder.mkdir(exist_ok=True)
        for name in self.files:
            (self.folder / name).write_text("x")
        return str(self.folder)


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_models").mkdir()
    hub = _FakeHub(tmp_path / "snapshot", [])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)

    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("demo_models/typo")

    assert str(info.value) == (
        "model path 'demo_models/typo' does not exist; give a model folder, a "
        ".gguf file or a Hugging Face repo id like 'org/name'"
    )
    assert hub.calls == []


def test_unknown_repo_id_says_it_was_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _FakeHub(tmp_path / "snapshot", [], error=OSError("404\nnot found"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)

    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("nobody/nothing")

    assert str(info.value) == (
        "model path 'nobody/nothing' does not exist locally, and as a Hugging "
        "Face repo id it could not be downloaded (OSError); check the path, or "
        "the repo id and your connection"
    )


def test_hub_fetches_model_safetensors_not_consolidated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _FakeHub(tmp_path / "snapshot", ["model.safetensors", "config.json"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)

    assert resolve_model_path("org/name") == tmp_path / "snapshot"

    ((repo_id, patterns),) = hub.calls
    assert repo_id == "org/name"
    assert "model*.safetensors" in patterns
    assert "*.json" in patterns  # model.safetensors.index.json
    assert not any(p in patterns for p in ("*.safetensors", "*.bin"))


def test_hub_falls_back_to_pytorch_bin_without_safetensors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = _FakeHub(tmp_path / "snapshot", ["config.json"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)

    resolve_model_path("org/old-model")

    assert [patterns for _, patterns in hub.calls][1] == ["pytorch_model*.bin"]


def test_local_consolidated_safetensors_is_ignored_beside_model(src):
    # consolidated.safetensors repeats the weights under Mistral's own names.
    mx.save_safetensors(
        str(src / "consolidated.safetensors"), {"layers.0.attention.wq": mx.ones(2)}
    )

    weights = load_weights(src)

    assert "layers.0.attention.wq" not in weights
    assert set(weights) == set(mx.load(str(src / "model.safetensors")))


# ---------------------------------------------------------------------------
# 3. Corrupt pytorch_model.bin


def _op_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _op_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _write_bin(path: Path, storage: np.ndarray, offset, size, stride) -> Path:
    """A zip-format torch checkpoint with one float32 tensor "w", built by hand
    (no torch), with whatever layout the test asks for."""
    storage_id = _op_tuple(
        [
            _op_str("storage"),
            pickle.GLOBAL + b"torch\nFloatStorage\n",
            _op_str("0"),
            _op_str("cpu"),
            _op_int(storage.size),
        ]
    )
    args = (
        pickle.MARK
        + storage_id
        + pickle.BINPERSID
        + _op_int(offset)
        + _op_tuple([_op_int(n) for n in size])
        + _op_tuple([_op_int(s) for s in stride])
        + pickle.NEWFALSE
        + pickle.GLOBAL
        + b"collections\nOrderedDict\n"
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + pickle.TUPLE
    )
    data = (
        pickle.PROTO
        + b"\x02"
        + pickle.EMPTY_DICT
        + _op_str("w")
        + pickle.GLOBAL
        + b"torch._utils\n_rebuild_tensor_v2\n"
        + args
        + pickle.REDUCE
        + pickle.SETITEM
        + pickle.STOP
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/data/0", storage.astype(np.float32).tobytes())
    return path


def test_handmade_bin_reads_a_valid_view(tmp_path):
    path = _write_bin(tmp_path / "ok.bin", np.arange(12), 2, (2, 3), (1, 2))

    w = load_torch_bin(path)["w"]

    np.testing.assert_array_equal(np.array(w), [[2, 4, 6], [3, 5, 7]])


@pytest.mark.parametrize(
    ("offset", "size", "stride", "message"),
    [
        (
            0,
            (4, 4),
            (4, 1),
            r"a tensor of size \(4, 4\) and stride \(4, 1\) at offset 0 reads past "
            r"its storage of 12 elements; the file is corrupt",
        ),
        (
            11,
            (2,),
            (1,),
            r"a tensor of size \(2,\) and stride \(1,\) at offset 11 reads past",
        ),
        (0, (3, 4), (-4, 1), r"negative offset, size or stride"),
        (-1, (2,), (1,), r"negative offset, size or stride \(offset -1"),
        (0, (-2,), (1,), r"negative offset, size or stride"),
        (0, (3, 4), (4,), r"malformed layout"),
        (13, (0,), (1,), r"reads past its storage"),
    ],
)
def test_out_of_bounds_tensor_layout_is_refused(
    tmp_path, offset, size, stride, message
):
    path = _write_bin(
        tmp_path / "pytorch_model.bin", np.arange(12), offset, size, stride
    )

    with pytest.raises(ValueError, match=message) as info:
        load_torch_bin(path)

    assert str(info.value).startswith(f"cannot read {path}: ")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# 4. Wrong types and values in config.json


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"hidden_size": "64"},
            "config.json: hidden_size must be a positive integer, got '64'; "
            "fix config.json",
        ),
        (
            {"num_attention_heads": 0},
            "config.json: num_attention_heads must be a positive integer, got 0; "
            "fix config.json",
        ),
        (
            {"num_key_value_heads": 0},
            "config.json: num_key_value_heads must be a positive integer, got 0; "
            "fix config.json",
        ),
        (
            {"num_hidden_layers": 2.0},
            "config.json: num_hidden_layers must be a positive integer, got 2.0; "
            "fix config.json",
        ),
        (
            {"rms_norm_eps": None},
            "config.json: rms_norm_eps must be a positive number, got None; "
            "fix config.json",
        ),
        (
            {"rope_theta": None},
            "config.json: rope_theta must be a positive number, got None; "
            "fix config.json",
        ),
        (
            {"rope_theta": -1.0},
            "config.json: rope_theta must be a positive number, got -1.0; "
            "fix config.json",
        ),
        (
            {"rope_scaling": "linear"},
            'config.json: rope_scaling must be an object such as {"rope_type": '
            '"linear", "factor": 2.0} or null, got \'linear\'; fix config.json',
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 0}},
            "config.json: rope_scaling.factor must be a positive number, got 0; "
            "fix config.json",
        ),
        (
            {"quantization": "x"},
            'config.json: quantization must be an object like {"group_size": 64, '
            "\"bits\": 4}, got 'x'; fix config.json",
        ),
        (
            {"quantization": {"group_size": 64, "bits": "4"}},
            "config.json: quantization.bits must be a positive integer, got '4'; "
            "fix config.json",
        ),
        (
            {"tie_word_embeddings": "false"},
            "config.json: tie_word_embeddings must be true or false, got 'false'; "
            "fix config.json",
        ),
        (
            {"hidden_size": 66},
            "hidden_size (66) is not a multiple of num_attention_heads (4) and "
            "config.json sets no head_dim; fix config.json",
        ),
    ],
)
def test_config_values_of_the_wrong_type_or_range(change, message):
    with pytest.raises(ValueError) as info:
        ModelArgs.from_dict({**CONFIG, **change})
    assert str(info.value) == message


def test_bad_config_is_refused_at_convert_not_at_generate(tmp_path, src, monkeypatch):
    _edit_json(src / "config.json", rope_theta=None)
    monkeypatch.setattr(convert_module, "load_weights", _no_reading)

    code, lines = _cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "out")

    assert code == 1
    assert lines == [
        "error: config.json: rope_theta must be a positive number, got None; "
        "fix config.json"
    ]
    assert not (tmp_path / "out").exists()


def test_quantization_config_that_is_not_an_object(src):
    _edit_json(src / "config.json", quantization_config="x")
    with pytest.raises(ValueError) as info:
        load_model(src)
    assert str(info.value) == (
        f"{src / 'config.json'}: quantization_config must be an object, got 'x'; "
        "fix config.json"
    )


@pytest.mark.parametrize("value", ["2", [2, "3"], 2.0, True])
@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_eos_token_id_must_be_ints(tmp_path, src, monkeypatch, value, where):
    path = src / where
    if not path.exists():
        _write_json(path, {})
    _edit_json(path, eos_token_id=value)
    monkeypatch.setattr(convert_module, "load_weights", _no_reading)
    expected = (
        f"{path}: eos_token_id must be an integer or a list of integers, got "
        f"{value!r}; fix the file"
    )

    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out")
    assert str(info.value) == expected

    with pytest.raises(ValueError) as info:
        load(src) if where == "config.json" else load_tokenizer(src)
    assert str(info.value) == expected


# ---------------------------------------------------------------------------
# 5. Malformed shard index


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ({"weight_map": ["model.safetensors"]}, "it needs a 'weight_map' object"),
        ([], "it needs a 'weight_map' object"),
        ({"metadata": {}}, "it needs a 'weight_map' object"),
        ({"weight_map": {"lm_head.weight": 3}}, "'weight_map' names 3, not a shard"),
        (
            {"weight_map": {"lm_head.weight": "../secret.safetensors"}},
            "'weight_map' names '../secret.safetensors', not a shard",
        ),
    ],
)
def test_malformed_shard_index_is_one_line_naming_it(tmp_path, src, index, problem):
    path = src / "model.safetensors.index.json"
    _write_json(path, index)

    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out")

    message = str(info.value)
    assert message.startswith(f"{path} is not a valid shard index: {problem}")
    assert message.endswith("; re-download it")
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# 6. Disk full


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "forced"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, src, monkeypatch, existing):
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "config.json").write_text("old")

    def full(path: str, arrays, metadata=None) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("[write] Unable to write 131072 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)

    with pytest.raises(ValueError) as info:
        convert(src, dst, force=existing)

    assert str(info.value) == (
        f"could not write {dst}: disk full? ([write] Unable to write 131072 bytes "
        "to file.); free some space or pick another --mlx-path, then run again"
    )
    assert _leftovers(tmp_path) == []
    if existing:
        assert [p.name for p in dst.iterdir()] == ["config.json"]
    else:
        assert not dst.exists()


def test_no_space_for_a_json_file_is_one_line(tmp_path, src, monkeypatch):
    def full(folder: Path, config: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert_module, "save_config", full)
    dst = tmp_path / "out"

    with pytest.raises(ValueError) as info:
        convert(src, dst)

    assert str(info.value) == (
        f"could not write {dst}: disk full? (No space left on device); free some "
        "space or pick another --mlx-path, then run again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_real_file_size_limit_through_the_cli(tmp_path, src):
    # RLIMIT_FSIZE makes writes past 20 kB fail as a full disk would.
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    dst = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mlxbastion", "convert", "--hf-path", src]
        + ["--mlx-path", dst],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )

    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: could not write {dst}: disk full? ([write] ")
    assert _leftovers(tmp_path) == []
    assert not dst.exists()


# ---------------------------------------------------------------------------
# 7. SIGTERM and what killed runs leave behind

SIGTERM_CHILD = """
import sys, time
from pathlib import Path
from mlxbastion.checkpoint import atomic_output_dir

with atomic_output_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    print("ready", flush=True)
    time.sleep(120)
"""


def test_sigterm_cleans_up_the_temporary_folder(tmp_path):
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(dst)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        assert len(_leftovers(tmp_path)) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.stdout.close()
    assert _leftovers(tmp_path) == []
    assert not dst.exists()


def test_sigterm_handler_is_restored(tmp_path):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert callable(signal.getsignal(signal.SIGTERM))
        (tmp / "x").write_text("x")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (tmp_path / "out" / "x").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folders_of_dead_runs_are_removed(tmp_path, src, caplog):
    stale = tmp_path / f".out.partial-{_dead_pid()}-0badf00d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.partial-{os.getpid()}-12345678"
    alive.mkdir()
    other = tmp_path / f".other.partial-{_dead_pid()}-0badf00d"
    other.mkdir()

    with caplog.at_level(logging.WARNING, logger="mlxbastion"):
        convert(src, tmp_path / "out")

    assert not stale.exists()
    assert alive.exists() and other.exists()
    assert f"removed {stale}, left behind by an earlier run" in caplog.text


# ---------------------------------------------------------------------------
# 8. Tokenizer problems fail at convert time, naming the file


def test_invalid_tokenizer_json_is_named_before_weights_are_read(
    tmp_path, src, monkeypatch
):
    (src / "tokenizer.json").write_text('{"model":')
    monkeypatch.setattr(convert_module, "load_weights", _no_reading)

    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out")

    assert str(info.value) == (
        f"tokenizer.json in {src} is not valid JSON (Expecting value: line 1 "
        "column 10 (char 9)); fix or re-download it"
    )


def test_missing_tokenizer_is_refused(tmp_path, src, monkeypatch):
    (src / "tokenizer.json").unlink()
    monkeypatch.setattr(convert_module, "load_weights", _no_reading)

    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out")

    assert str(info.value) == (
        f"{src} has no tokenizer files (tokenizer.json or tokenizer.model); add "
        "them from the original model"
    )


def test_tokenizer_that_does_not_load_fails_at_convert(tmp_path, src):
    (src / "tokenizer.json").write_text("{}")

    with pytest.raises(ValueError) as info:
        convert(src, tmp_path / "out")

    assert str(info.value) == (
        f"tokenizer.json in {src} does not load as a tokenizer (KeyError: "
        "'added_tokens'); fix or re-download it"
    )
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_multi_line_tokenizer_error_becomes_one_line(tmp_path, src):
    (src / "tokenizer.json").unlink()

    with pytest.raises(ValueError) as info:
        load_tokenizer(src)

    assert str(info.value) == (
        f"cannot load the tokenizer in {src} (no usable tokenizer.json, and no "
        "slow tokenizer (tokenizer.model) that could be converted to one); fix "
        "or re-download its tokenizer files"
    )


def test_broken_chat_template_is_left_out_with_a_warning(tmp_path, src, caplog):
    _edit_json(src / "tokenizer_config.json", chat_template=BROKEN_TEMPLATE)

    with caplog.at_level(logging.WARNING, logger="mlxbastion"):
        out = convert(src, tmp_path / "out")

    assert (
        f"the chat template of {src} has a syntax error (unexpected '}}' "
        "(line 1)) and was left out"
    ) in caplog.text
    assert "chat_template" not in json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    tokenizer = load_tokenizer(out)
    assert not tokenizer.has_chat_template
    assert tokenizer.encode_prompt("Hello")


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (BROKEN_TEMPLATE, "unexpected '}' (line 1)"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError: can only concatenate"),
    ],
)
def test_template_failing_at_generate_is_one_line(tmp_path, src, template, reason):
    out = convert(src, tmp_path / "out")
    _edit_json(out / "tokenizer_config.json", chat_template=template)
    tokenizer = load_tokenizer(out)

    with pytest.raises(ChatTemplateError) as info:
        tokenizer.encode_prompt("Hello", system="Be brief.")
    assert reason in str(info.value)
    assert "--ignore-chat-template" in str(info.value)

    code, lines = _cli(
        "generate", "--model", out, "--prompt", "Hello", "--max-tokens", 2
    )
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(
        "error: the model's chat template fails to render ("
    )

    ok = _cli(
        "generate",
        "--model",
        out,
        "--prompt",
        "Hello",
        "--max-tokens",
        2,
        "--ignore-chat-template",
    )
    assert ok[0] == 0


# ---------------------------------------------------------------------------
# 9. Sampling settings


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_temperature_is_refused(value):
    with pytest.raises(ValueError) as info:
        make_sampler(temp=value)
    assert str(info.value) == (
        f"temp must be >= 0 and finite (0 means greedy), got {value}"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_repetition_penalty_is_refused(value):
    with pytest.raises(ValueError) as info:
        make_logits_processors(repetition_penalty=value)
    assert str(info.value) == (
        f"repetition_penalty must be > 0 and finite, got {value}"
    )


# ---------------------------------------------------------------------------
# 11. Compute dtype on load


def test_load_float16_keeps_an_overflowing_tensor_in_float32(tmp_path, src, caplog):
    big = "model.layers.0.mlp.down_proj.weight"
    weights = dict(mx.load(str(src / "model.safetensors")))
    weights[big] = weights[big] * 0 + 1e5
    mx.save_safetensors(str(src / "model.safetensors"), weights)

    with caplog.at_level(logging.WARNING, logger="mlxbastion"):
        model, _, _ = load_model(src, dtype="float16")

    params = dict(tree_flatten(model.parameters()))
    assert params[big].dtype == mx.float32
    assert params["model.layers.0.mlp.up_proj.weight"].dtype == mx.float16
    assert f"{big} holds values up to 1e+05, beyond float16's range" in caplog.text
    assert not np.isnan(np.array(params[big])).any()


@pytest.mark.parametrize(
    ("dtype", "warned"),
    [
        ("float16", True),
        ("bfloat16", True),
        ("float32", False),
        ("auto", False),
        (None, False),  # the caller keeps the stored dtype on purpose
    ],
)
def test_half_precision_on_cpu_warns_that_it_is_slow(src, caplog, dtype, warned):
    assert mx.default_device() == mx.cpu
    path = str(src / "model.safetensors")
    half = {k: v.astype(mx.float16) for k, v in mx.load(path).items()}
    mx.save_safetensors(path, half)

    with caplog.at_level(logging.WARNING, logger="mlxbastion"):
        load_model(src, dtype=dtype)
    expected = (
        f"computing in {dtype} on the CPU backend, which is much slower than "
        "float32 (30-60x for quantized layers); use --dtype auto"
    )
    if warned:
        assert expected in caplog.text
    else:
        assert "CPU backend" not in caplog.text


def test_unknown_load_dtype_is_refused(src):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(src, dtype="float8")
