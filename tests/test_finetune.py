"""The finetune command end to end on stories260K: resume after a kill,
two processes against one, settings precedence, divergence and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from helpers import SHARED_DIR, STORIES_DIR, require

from mlxbastion.cli import main
from mlxbastion.convert import convert

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return convert(require(STORIES_DIR / "hf"), tmp_path_factory.mktemp("ft") / "m")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    source = require(SHARED_DIR / "data" / "wikisql")
    folder = tmp_path_factory.mktemp("wikisql")
    for split, n in (("train", 48), ("valid", 8)):
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(model), "--data", str(data),
        "--adapter-path", str(out), "--batch-size", "4", "--num-layers", "2",
        "--learning-rate", "1e-3", "--steps-per-report", "2",
        "--steps-per-eval", "100", "--val-batches", "2", *extra,
    ]  # fmt: skip


def losses(stderr: str) -> list[float]:
    return [float(x) for x in re.findall(r"Iter \d+: train loss ([0-9.]+)", stderr)]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlxbastion"), *argv], capture_output=True, text=True, timeout=600
    )


def test_resume_after_kill_matches_an_uninterrupted_run(model, data, tmp_path):
    full = tmp_path / "full"
    done = run_cli(*args(model, data, full, "--iters", "12", "--save-every", "4"))
    assert done.returncode == 0, done.stderr

    # Kill -9 once the step-4 checkpoint exists, then resume.
    cut = tmp_path / "cut"
    argv = args(model, data, cut, "--iters", "12", "--save-every", "4")
    process = subprocess.Popen([str(BIN / "mlxbastion"), *argv], stderr=subprocess.PIPE)
    checkpoint = cut / "checkpoints" / "step_0000004" / "state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "checkpoints" / "step_0000012").exists()

    resumed = run_cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(resumed.stderr)[-1] == losses(done.stderr)[-1]
    a = mx.load(str(full / "adapters.safetensors"))
    b = mx.load(str(cut / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert mx.allclose(a[key], b[key], atol=1e-6).item(), key


def test_two_processes_match_one_with_the_same_total_batch(model, data, tmp_path):
    one = run_cli(*args(model, data, tmp_path / "one", "--iters", "6"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    two = subprocess.run(
        [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--",
         str(BIN / "mlxbastion"), *args(model, data, tmp_path / "two", "--iters", "6")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr + two.stdout
    output = two.stderr + two.stdout
    # Only rank 0 reports; the losses agree with the single process.
    assert losses(output) == pytest.approx(losses(one.stderr), abs=2e-3)
    assert len(losses(output)) == len(losses(one.stderr)) == 3


def test_flags_override_the_config_file_which_overrides_defaults(model, data, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text(
        "iters: 2\nlearning_rate: 0.5\nlora_parameters:\n  rank: 4\n  scale: 2.0\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, args(model, data, out, "--config", str(config), "--learning-rate", "1e-4")
    )
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["rank"] == 4  # from the file
    assert saved["lora_parameters"]["scale"] == 2.0
    assert saved["learning_rate"] == 1e-4  # the flag wins
    assert saved["iters"] == 2
    assert saved["batch_size"] == 4


def test_divergence_stops_and_keeps_the_saved_adapter(model, data, tmp_path):
    out = tmp_path / "out"
    good = CliRunner().invoke(main, args(model, data, out, "--iters", "2"))
    assert good.exit_code == 0, good.stderr
    before = (out / "adapters.safetensors").read_bytes()

    bad = CliRunner().invoke(
        main,
        args(model, data, out, "--iters", "6", "--learning-rate", "1e9", "--resume"),
    )
    assert bad.exit_code == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the training loss became")
    assert "Traceback" not in bad.stderr
    assert (out / "adapters.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-train", "train.jsonl"),
        ("not-json", "train.jsonl:2"),
        ("small-valid", "valid"),
        ("resume-nothing", "no checkpoint"),
        ("existing", "--resume"),
        ("unknown-key", "unknown setting 'lora_rank'"),
        ("bad-lr", "--learning-rate must be positive"),
    ],
)
def test_bad_input_is_one_line(model, data, tmp_path, case, message):
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    out = tmp_path / "out"
    extra = ["--iters", "2"]
    if case == "no-train":
        (folder / "train.jsonl").unlink()
    elif case == "not-json":
        lines = (folder / "train.jsonl").read_text().splitlines()
        lines[1] = "{not json"
        (folder / "train.jsonl").write_text("\n".join(lines))
    elif case == "small-valid":
        lines = (folder / "valid.jsonl").read_text().splitlines()[:2]
        (folder / "valid.jsonl").write_text("\n".join(lines))
    elif case == "resume-nothing":
        extra.append("--resume")
    elif case == "existing":
        (out / "checkpoints").mkdir(parents=True)
    elif case == "unknown-key":
        (tmp_path / "c.yaml").write_text("lora_rank: 4\n")
        extra += ["--config", str(tmp_path / "c.yaml")]
    elif case == "bad-lr":
        extra += ["--learning-rate", "-1"]

    result = CliRunner().invoke(main, args(model, folder, out, *extra))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr
