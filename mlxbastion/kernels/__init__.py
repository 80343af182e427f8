"""A vectorized quantized matrix-vector product for x86-64 CPUs.

MLX's CPU backend multiplies by quantized weights one element at a time, so
decoding with quantized weights there is slower than with float32 weights.
``quantized_matvec.cpp`` is an MLX extension (a custom primitive) that
unpacks eight weights at a time into AVX2 registers. It is compiled once per
machine and mlx version, on first use or by ``python -m mlxbastion.kernels``,
into ``~/.cache/mlxbastion/kernels`` (``MLXBASTION_KERNEL_CACHE`` moves it),
and is used only where it applies: the CPU device, an x86-64 CPU with AVX2
and FMA, 2- to 8-bit affine weights in groups of 32, 64 or 128. Anywhere
else, or when the build fails (the reason is logged once), MLX's own kernel
runs. ``MLXBASTION_KERNELS=off`` turns it off.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
SOURCES = ("quantized_matvec.cpp", "CMakeLists.txt")
MODULE = "mlxbastion_kernels"
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def unsupported_reason() -> str | None:
    """Why the kernel cannot run on this machine, or None if it can."""
    if os.environ.get("MLXBASTION_KERNELS", "").lower() in ("off", "0", "false"):
        return "turned off by MLXBASTION_KERNELS"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        where = f"{sys.platform} {platform.machine()}"
        return f"it is written for x86-64 Linux, not {where}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "/proc/cpuinfo is unreadable, so AVX2 support is unknown"
    lines = cpuinfo.splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "")
    missing = [f for f in ("avx2", "fma") if f not in flags.split()]
    if missing:
        return f"this CPU lacks {' and '.join(missing)}"
    return None


def cache_dir() -> Path:
    """Where the compiled module lives: one folder per source, mlx and Python."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(mx.__version__.encode())
    digest.update(sysconfig.get_config_var("EXT_SUFFIX").encode())
    root = os.environ.get("MLXBASTION_KERNEL_CACHE")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(cache, "mlxbastion", "kernels")
    return Path(root) / digest.hexdigest()[:16]


def _cmake() -> str:
    # The `cmake` wheel (a dependency) puts its binary beside this interpreter.
    beside = Path(sys.executable).parent / "cmake"
    found = str(beside) if beside.exists() else shutil.which("cmake")
    if not found:
        raise RuntimeError("cmake is not installed (pip install cmake)")
    return found


def build() -> Path:
    """Compile the extension into ``cache_dir()`` unless it is there; returns
    the module's path. Safe to call from several processes at once."""
    target = cache_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module = target / (MODULE + suffix)
    if module.exists():
        return module
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if module.exists():  # another process built it while we waited
            return module
        logger.info("compiling the CPU quantized kernel (once, 10-20 s): %s", target)
        with tempfile.TemporaryDirectory(dir=target) as work:
            cmake = _cmake()
            steps = [
                [
                    cmake,
                    "-S",
                    str(SOURCE_DIR),
                    "-B",
                    work,
                    f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release",
                ],
                [cmake, "--build", work, "-j", str(os.cpu_count() or 1)],
            ]
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode != 0:
                    lines = (done.stderr or done.stdout).strip().splitlines()
                    tail = lines[-1] if lines else f"exit status {done.returncode}"
                    raise RuntimeError(f"{Path(step[0]).name} failed: {tail}")
            built = next(Path(work).glob(f"{MODULE}*{suffix}"))
            os.replace(built, module)  # atomic: readers see all or nothing
    return module


@functools.cache
def load():
    """The compiled module, building it if needed; None where it cannot run."""
    reason = unsupported_reason()
    if reason is None:
        try:
            path = build()
            # OpenMP's threads spin while they wait by default, which starves
            # other work when the cores are shared (decoding fell from 40 to
            # 21 tokens/s beside one busy process); this is read when the
            # OpenMP runtime loads with the module, and a user's choice wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            spec = importlib.util.spec_from_file_location(MODULE, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _self_check(module)
            return module
        except Exception as error:  # any failure means: use MLX's kernel
            text = str(error).strip()
            reason = text.splitlines()[0] if text else repr(error)
            logger.warning(
                "the fast CPU quantized kernel is unavailable (%s); using MLX's, "
                "which decodes quantized models several times slower",
                reason,
            )
            return None
    logger.debug("CPU quantized kernel not used: %s", reason)
    return None


def _self_check(module) -> None:
    """Compare with MLX's kernel on a small case: catches an ABI mismatch
    between this build and the installed mlx, or a miscompiled kernel."""
    key = mx.random.key(0)
    weight = mx.random.normal((24, 64), key=key)
    x = mx.random.normal((3, 64), key=mx.random.key(1))
    for bits in BITS:
        packed = mx.quantize(weight, group_size=32, bits=bits)
        expected = mx.quantized_matmul(x, *packed, group_size=32, bits=bits)
        got = module.quantized_matvec(x, *packed, group_size=32, bits=bits)
        if not mx.allclose(got, expected, rtol=1e-4, atol=1e-4).item():
            raise RuntimeError(f"self-check failed at {bits} bits")


def max_rows(bits: int) -> int:
    """Below this many rows the kernel beats dequantizing the layer for one
    BLAS product; from it on, callers take the float path. Measured on a
    2-core x86-64 with OpenBLAS, SmolLM2-135M's shapes: at 4 bits the kernel
    is 2-10x faster at 4-16 rows and about even at 64-128; MLX dequantizes
    3-, 5- and 6-bit weights 3-6x slower than 4-bit ones, which moves the
    break-even to 128-256 rows."""
    return 128 if bits in (3, 5, 6) else 32


def applies(layer) -> bool:
    """Whether ``quantized_matvec`` can multiply by this quantized layer."""
    return (
        layer.bits in BITS
        and layer.group_size in GROUP_SIZES
        and getattr(layer, "mode", "affine") == "affine"
        and "biases" in layer
        and mx.default_device() == mx.cpu
        and load() is not None
    )


def quantized_matvec(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer's weight W, in ``x``'s dtype."""
    y = load().quantized_matvec(
        x,
        layer.weight,
        layer.scales,
        layer["biases"],
        group_size=layer.group_size,
        bits=layer.bits,
    )
    return y if x.dtype == mx.float32 else y.astype(x.dtype)
