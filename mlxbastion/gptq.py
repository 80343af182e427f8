"""GPTQ: calibration-based weight quantization into MLX's affine format.

This module owns the quantization arithmetic for one linear layer: the GPTQ
solver of Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022, https://arxiv.org/abs/2210.17323),
a round-to-nearest baseline, the running Hessian ``X^T X`` that GPTQ needs, and
the bit packing of MLX's group-quantized weights. Walking a model, collecting
calibration activations and saving checkpoints belong to the callers.

The output is MLX's affine format, the one ``mx.quantize`` writes: for a weight
of shape ``(out, in)``, a packed ``uint32`` array of shape
``(out, in * bits // 32)`` plus ``scales`` and ``biases`` of shape
``(out, in // group_size)`` in the weight's dtype, dequantized per group of
``group_size`` consecutive input columns as ``scales * q + biases`` with integer
codes ``q`` in ``[0, 2**bits - 1]``. A result therefore drops straight into
``nn.QuantizedLinear`` or ``nn.QuantizedEmbedding``, and so into mlx-lm and MLX
Swift.

GPTQ quantizes the columns of ``W`` in order and spreads each column's rounding
error over the columns not yet quantized, using the upper Cholesky factor of
the inverse Hessian (the paper's Section 3, "Cholesky reformulation"), with the
updates to far columns batched per block ("lazy batch-updates"). Columns keep
their order (no act-order), so every quantization group stays a contiguous run
of input columns as MLX requires.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

# mx.quantize floors the range-derived scale at this value, which is what keeps
# a constant group's scale finite (observed on mlx 0.32, all dtypes).
_MLX_SCALE_EPS = 1e-7
# Replacement for a scale that rounds to exactly zero in the weight's dtype:
# the smallest normal float16, so it is nonzero in float16, bfloat16 and float32.
_MIN_SCALE = 2.0**-14
# Damping is raised tenfold up to this many times when the Cholesky fails.
_MAX_DAMP_RETRIES = 4


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported; MLX's affine format accepts "
            f"{SUPPORTED_BITS}."
        )


def _check_layout(shape: tuple[int, ...], *, bits: int, group_size: int) -> None:
    _check_bits(bits)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported; MLX accepts "
            f"{SUPPORTED_GROUP_SIZES}."
        )
    if len(shape) != 2:
        raise ValueError(f"Expected a 2-D weight (out, in), got shape {shape}.")
    if shape[1] % group_size != 0:
        raise ValueError(
            f"in_features={shape[1]} is not a multiple of group_size={group_size}; "
            "pick a group size that divides the layer's input size."
        )


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes into MLX's ``uint32`` layout.

    Each row is one little-endian bit stream: code ``i`` occupies stream bits
    ``[i * bits, (i + 1) * bits)`` and word ``k`` holds bits ``[32k, 32k + 32)``,
    so 3-, 5- and 6-bit codes may straddle two words.

    Args:
        q: Codes of shape ``(out, in)``, integers in ``[0, 2**bits)``.
        bits: Bits per code, one of ``SUPPORTED_BITS``.

    Returns:
        A ``uint32`` array of shape ``(out, in * bits // 32)``.

    Raises:
        ValueError: If ``bits`` is unsupported, ``q`` is not 2-D, ``in * bits``
            is not a multiple of 32, or a code is out of range.
    """
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2 or (q.shape[1] * bits) % 32 != 0:
        raise ValueError(
            f"Expected codes of shape (out, in) with in * bits a multiple of 32, "
            f"got shape {q.shape} with bits={bits}."
        )
    if q.size and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(
            f"Codes must lie in [0, {2**bits}) for bits={bits}, got range "
            f"[{q.min()}, {q.max()}]."
        )
    out_features, in_features = q.shape
    n_words = in_features * bits // 32

    # 32 codes fill exactly `bits` words, so the bit offsets repeat every 32
    # codes; zero-padding to a multiple of 32 only adds words we then drop.
    n_chunks = -(-in_features // 32)
    codes = np.zeros((out_features, n_chunks * 32), dtype=np.uint32)
    codes[:, :in_features] = q
    # Code position within a 32-code chunk goes first so each slice is contiguous.
    codes = np.ascontiguousarray(codes.reshape(-1, 32).T)  # (32, out * n_chunks)
    words = np.zeros((bits, codes.shape[1]), dtype=np.uint32)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        # uint32 shifts drop the bits that spill past the word; they go next.
        words[word] |= codes[i] << np.uint32(shift)
        if shift + bits > 32:
            words[word + 1] |= codes[i] >> np.uint32(32 - shift)
    return words.T.reshape(out_features, -1)[:, :n_words]


def unpack_codes(wq: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Unpack MLX's ``uint32`` layout into integer codes; inverse of `pack_codes`.

    Args:
        wq: Packed weights of shape ``(out, in_features * bits // 32)``.
        bits: Bits per code, one of ``SUPPORTED_BITS``.
        in_features: Number of codes per row.

    Returns:
        A ``uint32`` array of codes of shape ``(out, in_features)``.

    Raises:
        ValueError: If ``bits`` is unsupported or ``wq`` has the wrong shape.
    """
    _check_bits(bits)
    wq = np.asarray(wq, dtype=np.uint32)
    n_words = in_features * bits // 32
    if wq.ndim != 2 or (in_features * bits) % 32 != 0 or wq.shape[1] != n_words:
        raise ValueError(
            f"Expected packed weights of shape (out, {in_features} * {bits} // 32)"
            f" = (out, {n_words}), got shape {wq.shape}."
        )
    out_features = wq.shape[0]
    n_chunks = -(-in_features // 32)
    words = np.zeros((out_features, n_chunks * bits), dtype=np.uint32)
    words[:, :n_words] = wq
    words = np.ascontiguousarray(words.reshape(-1, bits).T)  # (bits, out * n_chunks)

    mask = np.uint32(2**bits - 1)
    codes = np.empty((32, words.shape[1]), dtype=np.uint32)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        code = words[word] >> np.uint32(shift)
        if shift + bits > 32:
            code |= words[word + 1] << np.uint32(32 - shift)
        codes[i] = code & mask
    return codes.T.reshape(out_features, -1)[:, :in_features]


def rtn_quantize(
    w: mx.array, *, bits: int, group_size: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Round-to-nearest quantization, exactly as ``mx.quantize`` does it.

    This is the baseline GPTQ is measured against, with the same signature and
    return value as `gptq_quantize` minus the Hessian.

    Args:
        w: Weight of shape ``(out, in)``.
        bits: Bits per weight, one of ``SUPPORTED_BITS``.
        group_size: Input columns per group, one of ``SUPPORTED_GROUP_SIZES``.

    Returns:
        ``(wq, scales, biases)`` in MLX's affine format.

    Raises:
        ValueError: If the shape, ``bits`` or ``group_size`` is unsupported.
    """
    _check_layout(tuple(w.shape), bits=bits, group_size=group_size)
    return mx.quantize(w, group_size=group_size, bits=bits)


class HessianAccumulator:
    """Running ``X^T X`` over a layer's calibration inputs.

    Feed it every batch of inputs the layer sees during calibration; its
    `hessian` is then the GPTQ Hessian ``2 X^T X / n`` over all ``n`` rows.

    Args:
        in_features: The layer's input size (the last axis of its inputs).
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._xtx = mx.zeros((in_features, in_features), dtype=mx.float32)
        self._count = 0

    @property
    def count(self) -> int:
        """Number of input rows (tokens) added so far."""
        return self._count

    def add(self, x: mx.array) -> None:
        """Add a batch of layer inputs.

        Args:
            x: Inputs of shape ``(..., in_features)``, any float dtype; every
                leading position counts as one sample.

        Raises:
            ValueError: If the last axis is not ``in_features``.
        """
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Expected inputs of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}."
            )
        x = x.reshape(-1, self.in_features).astype(mx.float32)
        self._xtx = self._xtx + x.T @ x
        self._count += x.shape[0]
        # Evaluate now so the graph does not grow with every batch and the
        # caller's activations can be freed.
        mx.eval(self._xtx)

    @property
    def hessian(self) -> mx.array:
        """``2 X^T X / n`` in float32, shape ``(in_features, in_features)``.

        Raises:
            ValueError: If no inputs have been added.
        """
        if self._count == 0:
            raise ValueError("No calibration inputs were added; call add() first.")
        return self._xtx * (2.0 / self._count)


def _to_numpy(a: mx.array | np.ndarray, dtype: type = np.float32) -> np.ndarray:
    if isinstance(a, mx.array):
        # numpy cannot take bfloat16 directly.
        a = np.array(a.astype(mx.float32))
    return np.array(a, dtype=dtype)


def _round_to_dtype(a: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """Round float32 values to ``dtype`` and back, as they will be stored."""
    if dtype == mx.float32:
        return a
    return np.array(mx.array(a).astype(dtype).astype(mx.float32))


def _invert_lower(lower: np.ndarray) -> np.ndarray:
    """Invert a lower triangular matrix by 2x2 block recursion.

    numpy has no triangular inverse, and its general ``inv`` does about three
    times the work; this is the largest cost of GPTQ on wide layers.
    """
    n = lower.shape[0]
    if n <= 256:
        return np.tril(np.linalg.inv(lower))
    k = n // 2
    top_inv = _invert_lower(lower[:k, :k])
    bottom_inv = _invert_lower(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k] = top_inv
    out[k:, k:] = bottom_inv
    out[k:, :k] = -(bottom_inv @ lower[k:, :k]) @ top_inv
    return out


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """Dampen ``h`` and return ``U`` upper triangular with ``U^T U = h^-1``.

    Args:
        h: Symmetric Hessian in float64 with no zero diagonal entries.
        damp: Fraction of the mean diagonal added to the diagonal.

    Returns:
        ``U`` in float32.

    Raises:
        ValueError: If ``h`` is still not positive definite after raising the
            damping ``_MAX_DAMP_RETRIES`` times.
    """
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        damped = h + np.eye(h.shape[0]) * (damp * mean_diag)
        try:
            # With R the index reversal, chol(R H R) = L gives H^-1 = U^T U for
            # U = R L^-1 R, which is upper triangular: one factorization, and
            # H^-1 is never formed. float64 because real Hessians are badly
            # conditioned and float32 Cholesky fails on them.
            lower = np.linalg.cholesky(damped[::-1, ::-1])
            return _invert_lower(lower)[::-1, ::-1].astype(np.float32)
        except np.linalg.LinAlgError:
            if attempt == _MAX_DAMP_RETRIES:
                break
            new_damp = max(10.0 * damp, 1e-4)
            logger.warning(
                "Hessian not positive definite with damp=%g; retrying with %g.",
                damp,
                new_damp,
            )
            damp = new_damp
    raise ValueError(
        f"The Hessian is not positive definite even with damp={damp:g}; check "
        "the calibration inputs for NaN or a near-empty batch."
    )


def _affine_candidates(
    lo: np.ndarray, hi: np.ndarray, maxq: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two choices of per-row ``(scale, bias)`` for a group's range.

    The first spans ``[lo, hi]`` exactly (the paper's min-max grid). The second
    is the rule ``mx.quantize`` follows (matched against its output, scales and
    biases bit for bit): anchor the bias at the end of larger magnitude, with a
    negative scale when that end is ``hi``, and shrink or stretch the scale so
    that 0 is exactly on the grid, which may clip the other end. On Gaussian
    weights the second has about half the squared error at 2 bits, the two tie
    at 3 bits, and the first wins by 1-5% from 4 bits.
    """
    span = (hi - lo) / maxq
    min_max = (span, lo.copy())

    scale = np.maximum(span, _MLX_SCALE_EPS)
    low_is_edge = np.abs(lo) > np.abs(hi)
    scale = np.where(low_is_edge, scale, -scale)
    edge = np.where(low_is_edge, lo, hi)
    zero_code = np.rint(edge / scale)
    safe_code = np.where(zero_code != 0, zero_code, 1.0)
    zero_exact = (
        np.where(zero_code != 0, edge / safe_code, scale),
        np.where(zero_code != 0, edge, 0.0),
    )
    return [min_max, zero_exact]


def _group_params(
    wg: np.ndarray, *, maxq: int, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Choose one group's ``(scale, bias)`` per output row.

    Args:
        wg: The group's current (error-updated) weights, shape
            ``(group_size, out)`` (columns of ``W`` as rows).
        maxq: Largest code, ``2**bits - 1``.
        dtype: Storage dtype of the scales and biases.

    Returns:
        ``(scale, bias)``, each of shape ``(out,)`` in float32, already rounded
        to ``dtype`` so the propagated error is the error that gets stored.
    """
    options = []
    for scale, bias in _affine_candidates(wg.min(axis=0), wg.max(axis=0), maxq):
        scale = _round_to_dtype(scale.astype(np.float32), dtype)
        bias = _round_to_dtype(bias.astype(np.float32), dtype)
        # A constant group has zero span; any nonzero scale reproduces it
        # exactly through code 0, and a zero scale would divide by zero.
        scale = np.where(scale == 0, np.float32(_MIN_SCALE), scale)
        q = np.clip(np.rint((wg - bias) / scale), 0, maxq)
        err = np.sum((scale * q + bias - wg) ** 2, axis=0)
        options.append((err, scale, bias))

    (err_a, scale_a, bias_a), (err_b, scale_b, bias_b) = options
    use_b = err_b < err_a
    return np.where(use_b, scale_b, scale_a), np.where(use_b, bias_b, bias_a)


def _gptq_columns(
    wt: np.ndarray,
    u: np.ndarray,
    *,
    bits: int,
    group_size: int,
    block_size: int,
    dtype: mx.Dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the GPTQ column loop on ``wt = W^T`` (modified in place).

    Working on ``W^T`` makes each weight column a contiguous row.

    Returns:
        ``(codes, scales, biases)`` with codes of shape ``(in, out)`` and
        scales and biases of shape ``(in // group_size, out)``.
    """
    n_in, n_out = wt.shape
    maxq = 2**bits - 1
    codes = np.empty((n_in, n_out), dtype=np.uint8)
    scales = np.empty((n_in // group_size, n_out), dtype=np.float32)
    biases = np.empty_like(scales)

    for b0 in range(0, n_in, block_size):
        b1 = min(b0 + block_size, n_in)
        # Columns inside the block get every update immediately; later columns
        # only receive the block's errors in one matmul at the end (lazy batch).
        block = wt[b0:b1]
        errs = np.empty((b1 - b0, n_out), dtype=np.float32)
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                g = col // group_size
                scales[g], biases[g] = _group_params(
                    block[j : j + group_size], maxq=maxq, dtype=dtype
                )
            scale, bias = scales[col // group_size], biases[col // group_size]
            q = np.clip(np.rint((block[j] - bias) / scale), 0, maxq)
            codes[col] = q
            err = (block[j] - (scale * q + bias)) / u[col, col]
            block[j + 1 :] -= np.outer(u[col, col + 1 : b1], err)
            errs[j] = err
        wt[b1:] -= u[b0:b1, b1:].T @ errs
    return codes, scales, biases


def gptq_quantize(
    w: mx.array,
    hessian: mx.array,
    *,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize a linear layer's weight with GPTQ into MLX's affine format.

    Each group's scale and bias are fixed when the solver reaches the group's
    first column, from the group's error-updated weights: per row, whichever of
    the min-max grid and ``mx.quantize``'s zero-exact grid rounds those weights
    with less squared error. With an identity Hessian GPTQ reduces to
    round-to-nearest, and the result is then never worse than ``mx.quantize``.

    Args:
        w: Weight of shape ``(out, in)``, any float dtype.
        hessian: ``(in, in)`` Hessian of the layer's calibration inputs ``X``,
            ``2 X^T X / n`` as `HessianAccumulator` gives, or any positive
            multiple of it (damping is relative, so the scale does not matter).
        bits: Bits per weight, one of ``SUPPORTED_BITS``.
        group_size: Input columns per group, one of ``SUPPORTED_GROUP_SIZES``.
        damp: Fraction of the Hessian's mean diagonal added to its diagonal
            (the paper's "dampening", 1% by default).
        block_size: Columns per lazy batch update. Rounded up to a multiple of
            ``group_size`` so that no group straddles two blocks, because the
            columns past a block are not yet up to date when a group starts.

    Returns:
        ``(wq, scales, biases)``: ``uint32`` codes of shape
        ``(out, in * bits // 32)`` and scales and biases of shape
        ``(out, in // group_size)`` in ``w.dtype``, as ``mx.quantize`` returns.

    Raises:
        ValueError: If a shape, ``bits``, ``group_size``, ``damp`` or
            ``block_size`` is invalid, the Hessian is not finite, or it stays
            singular after damping.
    """
    _check_layout(tuple(w.shape), bits=bits, group_size=group_size)
    n_out, n_in = w.shape
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(
            f"Expected a Hessian of shape ({n_in}, {n_in}) for a weight of shape "
            f"{tuple(w.shape)}, got {tuple(hessian.shape)}."
        )
    if damp < 0 or block_size < 1:
        raise ValueError(
            f"Expected damp >= 0 and block_size >= 1, got damp={damp}, "
            f"block_size={block_size}."
        )
    start_s = time.perf_counter()

    h = _to_numpy(hessian, np.float64)
    if not np.all(np.isfinite(h)):
        raise ValueError("The Hessian contains NaN or inf; check the calibration.")
    wt = np.ascontiguousarray(_to_numpy(w).T)  # (in, out)

    # An input that is always zero gives no information; the paper's reference
    # sets its diagonal to 1 (keeping H invertible) and its weights to 0.
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    u = _upper_cholesky_of_inverse(h, damp)

    block_size = -(-block_size // group_size) * group_size
    codes, scales, biases = _gptq_columns(
        wt, u, bits=bits, group_size=group_size, block_size=block_size, dtype=w.dtype
    )
    logger.debug(
        "GPTQ (%d, %d) bits=%d group_size=%d: %d dead inputs, %.2f s",
        n_out,
        n_in,
        bits,
        group_size,
        int(dead.sum()),
        time.perf_counter() - start_s,
    )
    return (
        mx.array(pack_codes(codes.T, bits)),
        mx.array(np.ascontiguousarray(scales.T)).astype(w.dtype),
        mx.array(np.ascontiguousarray(biases.T)).astype(w.dtype),
    )
