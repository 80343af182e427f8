"""Which BLAS serves MLX's float matmuls on the CPU, and getting a fast one.

MLX's Linux wheels link the reference BLAS, a plain loop that multiplies
float32 matrices at a few GFLOP/s. Prompt processing and fine-tuning on the
CPU spend most of their time there. OpenBLAS exports the same symbols and is
10-20x faster; loaded first (``LD_PRELOAD``), it serves those calls instead.
The ``mlxbastion`` command does that by itself: when the CPU backend runs on
the reference BLAS and an OpenBLAS is installed, it starts itself again with
OpenBLAS preloaded. ``MLXBASTION_BLAS=reference`` turns that off.

Getting OpenBLAS: ``apt-get install libopenblas0-pthread`` on Debian and
Ubuntu, ``dnf install openblas-threads`` on Fedora. Using the library from
Python, preload it yourself::

    LD_PRELOAD=libopenblas.so.0 python my_script.py
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import re
import sys
from pathlib import Path

import mlx.core as mx

logger = logging.getLogger(__name__)

# Libraries that provide an optimized BLAS, as they appear in a process's
# memory map.
_FAST_BLAS = re.compile(r"lib(openblas|mkl_rt|blis|flexiblas)[^/]*\.so")
_REEXEC_MARK = "MLXBASTION_BLAS_REEXEC"


def cpu_backend() -> bool:
    """True when MLX computes on the CPU (no Metal or CUDA device)."""
    return mx.default_device() == mx.cpu or not (
        mx.metal.is_available() or mx.cuda.is_available()
    )


def loaded_blas() -> str | None:
    """The file name of the optimized BLAS mapped into this process, or None
    (the reference BLAS, or a system that has no ``/proc/self/maps``)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    match = _FAST_BLAS.search(maps)
    return match.group(0) if match else None


def find_openblas() -> str | None:
    """The name of an installed OpenBLAS (``libopenblas.so.0``), which the
    dynamic loader finds on its own search path, or None."""
    return ctypes.util.find_library("openblas")


def fast_matmul() -> bool:
    """True when float matmuls run on an optimized BLAS or an accelerator."""
    return not cpu_backend() or loaded_blas() is not None


def reexec_with_openblas() -> None:
    """Start this process again with OpenBLAS preloaded, when that helps.

    Does nothing off Linux, off the CPU backend, when an optimized BLAS is
    already loaded, when none is installed, after one restart, or when
    ``MLXBASTION_BLAS=reference``. Only the command-line entry point calls
    it: a library must not replace its caller's process.
    """
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("MLXBASTION_BLAS", "").lower() == "reference"
        or os.environ.get(_REEXEC_MARK)
        or not cpu_backend()
        or loaded_blas() is not None
    ):
        return
    openblas = find_openblas()
    if openblas is None:
        return
    env = dict(os.environ, **{_REEXEC_MARK: "1"})
    env["LD_PRELOAD"] = " ".join(filter(None, [openblas, env.get("LD_PRELOAD")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def warn_if_reference_blas() -> None:
    """Log how to get fast matmuls when the reference BLAS serves them,
    unless ``MLXBASTION_BLAS=reference`` says that is what the user wants."""
    if fast_matmul() or os.environ.get("MLXBASTION_BLAS", "").lower() == "reference":
        return
    if find_openblas() is None:
        how = (
            "install OpenBLAS (apt-get install libopenblas0-pthread) and the "
            "mlxbastion command preloads it"
        )
    else:
        how = "run the mlxbastion command, or preload LD_PRELOAD=libopenblas.so.0"
    logger.warning(
        "float matmuls run on the reference BLAS, so prompts and training are "
        "slow; %s (MLXBASTION_BLAS=reference hides this)",
        how,
    )
