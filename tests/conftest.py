"""Fixtures shared across mlxbastion's tests."""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests compare the commands' stderr line by line; the hint about a slow
# reference BLAS would add a line on machines without OpenBLAS. Setting the
# opt-out hides it (and keeps subprocesses on the BLAS they start with).
os.environ.setdefault("MLXBASTION_BLAS", "reference")

# Real tokenizers and models live read-only beside the checkout (see
# ../shared/MANIFEST.md); MLXBASTION_SHARED points elsewhere if needed.
SHARED_DIR = Path(
    os.environ.get("MLXBASTION_SHARED", Path(__file__).resolve().parents[2] / "shared")
)


@pytest.fixture(scope="session")
def shared_tokenizer_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], Path]:
    """Return a function giving a loadable copy of a shared tokenizer folder.

    ``name`` is a folder of ``shared/tokenizers`` (``"llama3.2"``, ``"gemma3"``)
    or ``"stories260K"`` for the stories260K model's ``hf`` folder. Files
    compressed with gzip or xz are decompressed into a session temp folder,
    once per name. Skips the test when the shared data is not present.
    """
    root = tmp_path_factory.mktemp("tokenizers")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        if name == "stories260K":
            source = SHARED_DIR / "models" / "stories260K" / "hf"
        else:
            source = SHARED_DIR / "tokenizers" / name
        if not source.is_dir():
            pytest.skip(f"shared data not found: {source}")

        target = root / name
        target.mkdir()
        for path in source.iterdir():
            if path.suffix == ".gz":
                with gzip.open(path) as src, open(target / path.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif path.suffix == ".xz":
                with lzma.open(path) as src, open(target / path.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif path.suffix != ".safetensors":
                # Plain copies; the weights are not needed for tokenizers.
                shutil.copyfile(path, target / path.name)
        cache[name] = target
        return target

    return get


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the "mlxbastion" logger at the runner's stderr, closed
    once the run ends, and stops propagation; undo that after each test so
    later tests log (and capture logs) as usual."""
    logger = logging.getLogger("mlxbastion")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
