"""The scripts in examples/ run and print what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import STORIES_DIR, find_smollm2_gguf, require

from mlxbastion.convert import convert

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_text_streams_the_reference_story(tmp_path):
    out = convert(require(STORIES_DIR / "hf"), tmp_path / "mlx")
    reference = json.loads((STORIES_DIR / "reference.json").read_text())
    text = run("generate_text.py", str(out), "Once upon a time")
    assert text.startswith(reference["greedy_30"]["continuation"])


@pytest.mark.slow
def test_multi_turn_chat_answers_both_questions(tmp_path):
    out = convert(find_smollm2_gguf(), tmp_path / "mlx")
    text = run("multi_turn_chat.py", str(out))
    assert "The capital of France is Paris." in text
    assert "The capital of Italy is Rome." in text
