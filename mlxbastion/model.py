"""The decoder-only transformer: Llama, Mistral, Qwen2/2.5, Qwen3 and kin.

One config-driven model covers these families; they differ only in a few
switches read from ``ModelArgs``:

- Qwen2 adds biases to the q/k/v projections (``qkv_bias``);
- Qwen3 applies an RMSNorm to each query and key head before RoPE
  (``qk_norm``);
- Llama 3.1+ rescales RoPE frequencies (``rope_scaling`` of type llama3);
- Mistral v0.1 attends over a sliding window (``sliding_window``).

Attention runs on the fused ``mx.fast.scaled_dot_product_attention``, or, when
the cache stores keys and values quantized, on ``quantized_attention``, which
reads them through ``mx.quantized_matmul`` without dequantizing the cache.

Module names follow the Hugging Face checkpoints (``model.layers.N.self_attn
.q_proj`` and so on), so loading weights needs no key map. Shapes use
``B`` batch, ``L`` new tokens, ``S`` cached plus new tokens, ``D`` hidden size.
"""

from __future__ import annotations

import logging
import math

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cache import KVCache, RotatingKVCache, kv_group_size_for
from .config import ModelArgs

logger = logging.getLogger(__name__)


class RoPE(nn.Module):
    """Rotary position embedding, with linear or Llama-3 frequency scaling."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        self.base = args.rope_theta
        self.scale = 1.0
        self._freqs = None
        scaling = args.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            # Positions are divided by the factor (transformers' "linear").
            self.scale = 1.0 / scaling["factor"]
        elif kind == "llama3":
            self._freqs = llama3_rope_freqs(self.dims, self.base, scaling)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None if self._freqs is not None else self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )


def llama3_rope_freqs(dims: int, base: float, scaling: dict) -> mx.array:
    """Llama 3.1's RoPE periods: long wavelengths stretched by ``factor``.

    Wavelengths shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept, those longer than ``... / low_freq_factor``
    are divided by ``factor``, and the band between is interpolated. Returns the
    per-pair periods that ``mx.fast.rope`` takes as ``freqs``.
    """
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]

    inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq

    inv_freq = mx.where(wavelen > context / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= context / low) & (wavelen >= context / high)
    inv_freq = mx.where(in_band, blended, inv_freq)
    return 1.0 / inv_freq


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5

        D, bias = args.hidden_size, args.qkv_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(
            self.n_heads * self.head_dim, D, bias=args.attention_bias
        )
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(args)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None,
        cache: KVCache | RotatingKVCache | None,
    ) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = queries.transpose(0, 2, 1, 3)  # (B, n_heads, L, head_dim)
        keys = keys.transpose(0, 2, 1, 3)  # (B, n_kv_heads, L, head_dim)
        values = values.transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset)
        keys = self.rope(keys, offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        bits = getattr(cache, "bits", None)
        if bits is not None:
            out = quantized_attention(
                queries,
                keys,
                values,
                scale=self.scale,
                mask=mask,
                group_size=cache.group_size,
                bits=bits,
            )
        else:
            # The fused kernel serves grouped-query heads without repeating keys.
            out = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask
            )
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, hidden_dim, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(D, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(D, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, D, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(
        self,
        h: mx.array,
        mask: mx.array | str | None,
        cache: KVCache | RotatingKVCache | None,
    ) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TransformerModel(nn.Module):
    """Embedding, the stack of blocks and the final norm (HF's ``model.``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.window = args.attention_window

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = attention_mask(inputs.shape[1], cache[0], self.window)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """A causal LM: token ids ``(B, L)`` in, next-token logits ``(B, L, V)`` out."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = TransformerModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, *, last_only: bool = False
    ) -> mx.array:
        """Logits for every position, or with ``last_only`` for the last one
        (shape ``(B, 1, V)``): prompt processing needs no more, and the output
        head is a fifth or more of the work for vocabularies of 50k and up."""
        h = self.model(inputs, cache)
        if last_only:
            h = h[:, -1:]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(
        self,
        max_kv_size: int | None = None,
        *,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> list:
        """One cache per layer.

        Args:
            max_kv_size: bound each cache to this many tokens (the first 4
                plus a window of the newest).
            kv_bits: store keys and values quantized to 4 or 8 bits.
            kv_group_size: numbers along head_dim sharing a scale and a bias
                (32, 64 or 128). When it does not divide head_dim, the largest
                smaller one that does is used, with a warning.

        Raises:
            ValueError: bad ``kv_bits`` or ``kv_group_size``, or ``kv_bits``
                with a head_dim that is not a multiple of 32.
        """
        group_size = kv_group_size
        if kv_bits is not None:
            group_size = kv_group_size_for(self.args.head_dim, kv_group_size)
            if group_size != kv_group_size:
                logger.warning(
                    "head_dim %d is not a multiple of kv_group_size %d; "
                    "quantizing the KV cache in groups of %d",
                    self.args.head_dim,
                    kv_group_size,
                    group_size,
                )
        quant = dict(bits=kv_bits, group_size=group_size)
        if max_kv_size is not None:
            return [RotatingKVCache(max_kv_size, **quant) for _ in self.layers]
        return [KVCache(**quant) for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint tensors that the model recomputes or shares."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights


def _float_weight(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """A quantized layer's weight, dequantized to ``dtype``."""
    weight = mx.dequantize(
        layer.weight,
        layer.scales,
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )
    return weight.astype(dtype)


class DequantizingLinear(nn.QuantizedLinear):
    """A quantized linear layer that multiplies many rows at once in float.

    MLX's CPU backend has no vectorized quantized matmul: it costs about as
    much per row as a float matrix-vector product, while a float matmul over
    many rows runs on BLAS. For inputs of at least ``min_rows`` rows (prompt
    chunks, training batches) the weight is dequantized for the one product
    and dropped after. Fewer rows (decoding) stay quantized, reading 4-16x
    fewer bytes: through our vectorized kernel (``mlxbastion.kernels``,
    below ``kernels.max_rows`` rows) for 2- to 8-bit weights on x86-64,
    through MLX's otherwise. Memory stays that of the quantized model plus
    one layer's float weight at a time.
    Weights, names and the file format are those of ``nn.QuantizedLinear``.
    """

    min_rows = 32

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_product(self, x)
        return y + self.bias if "bias" in self else y


class DequantizingEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose use as a tied output head multiplies many
    rows at once in float, as ``DequantizingLinear`` does. Training runs
    every position through the head, the largest product of a small model."""

    min_rows = 32

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_product(self, x)


def _quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer's weight ``W`` (no bias), by the
    fastest path for the number of rows in ``x``."""
    rows = x.size // x.shape[-1]
    if rows < kernels.max_rows(layer.bits) and kernels.applies(layer):
        return kernels.quantized_matvec(layer, x)
    if rows < layer.min_rows:
        # Limitation: MLX's CPU kernel unpacks one weight at a time, so
        # where ours does not apply (a CPU without AVX2, not x86-64, a
        # group size other than 32, 64 or 128) quantized models decode
        # slower than the same model in float32.
        return mx.quantized_matmul(
            x,
            layer.weight,
            layer.scales,
            layer.get("biases"),
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    # Limitation: in training, the backward pass keeps each layer's
    # dequantized weight until its gradient is taken, so QLoRA's peak
    # memory on the CPU comes close to that of LoRA on the float model.
    return x @ _float_weight(layer, x.dtype).T


def dequantize_for_many_rows(model: nn.Module, min_rows: int) -> int:
    """Make every ``nn.QuantizedLinear`` of ``model`` a ``DequantizingLinear``
    and every ``nn.QuantizedEmbedding`` a ``DequantizingEmbedding`` with that
    threshold; returns how many layers changed.

    The layers keep their arrays: only their class changes, so nothing is
    copied and LoRA, saving and fusing see the same quantized layers. The
    few-row kernel (``mlxbastion.kernels``) is built or loaded here, before
    any traced step can need it.
    """
    swaps = {
        nn.QuantizedLinear: DequantizingLinear,
        nn.QuantizedEmbedding: DequantizingEmbedding,
    }
    count = 0
    for _, module in model.named_modules():
        if type(module) in swaps or isinstance(module, tuple(swaps.values())):
            # Same attributes, one method more: switching the class in place
            # avoids quantizing a dummy weight to build a new layer.
            module.__class__ = swaps.get(type(module), type(module))
            module.min_rows = min_rows
            count += 1
    if count:
        kernels.load()  # build or load it now, not inside a traced step
    return count


def attention_mask(
    L: int,
    cache: KVCache | RotatingKVCache | None,
    window: int | None = None,
) -> mx.array | str | None:
    """The mask for ``L`` new tokens after what ``cache`` already holds.

    A single decode step attends to everything cached, so it needs no mask.
    Otherwise the fused kernel's "causal" mask (aligned to the last key) is
    enough unless a window or a rotating cache hides some keys.
    """
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(L, window)
    offset = cache.offset if cache is not None else 0
    if window is None or offset + L <= window:
        return "causal" if L > 1 else None
    return causal_mask(L, offset, window)


def quantized_attention(
    queries: mx.array,
    keys: tuple[mx.array, ...],
    values: tuple[mx.array, ...],
    *,
    scale: float,
    mask: mx.array | str | None,
    group_size: int,
    bits: int,
) -> mx.array:
    """Attention over keys and values stored as ``mx.quantize`` triples.

    ``mx.quantized_matmul`` dequantizes group by group inside the product, so
    the cache is never expanded to full precision. Each key/value head serves
    its ``n_heads // n_kv_heads`` query heads through a broadcast axis rather
    than being repeated.

    Args:
        queries: ``(B, n_heads, L, head_dim)``.
        keys: ``(codes, scales, biases)``, each ``(B, n_kv_heads, S, ...)``.
        values: the same for the values.
        scale: multiplies the scores (``head_dim ** -0.5``).
        mask: None, "causal" (the last query sees the last key), a boolean
            mask (True attends) or an additive one, broadcastable to
            ``(B, n_heads, L, S)``, as ``mx.fast.scaled_dot_product_attention``
            takes them.
        group_size: the quantization group size of keys and values.
        bits: their bits per number.

    Returns:
        ``(B, n_heads, L, head_dim)``, in the queries' dtype.
    """
    B, n_heads, L, head_dim = queries.shape
    n_kv_heads = keys[0].shape[1]
    n_repeats = n_heads // n_kv_heads
    quant = dict(group_size=group_size, bits=bits)

    queries = (queries * scale).reshape(B, n_kv_heads, n_repeats, L, head_dim)
    keys = tuple(mx.expand_dims(a, 2) for a in keys)  # (B, n_kv_heads, 1, S, ...)
    values = tuple(mx.expand_dims(a, 2) for a in values)

    # scores: (B, n_kv_heads, n_repeats, L, S); the softmax sums in float32.
    scores = mx.quantized_matmul(queries, *keys, transpose=True, **quant)
    if mask is not None:
        scores = _apply_mask(scores, mask)
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(probs, *values, transpose=False, **quant)
    return out.reshape(B, n_heads, L, head_dim)


def _apply_mask(scores: mx.array, mask: mx.array | str) -> mx.array:
    """``scores`` (B, n_kv_heads, n_repeats, L, S) with ``mask`` applied."""
    n_kv_heads, n_repeats, L, S = scores.shape[1:]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}; expected 'causal'")
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask.ndim >= 3:
        # Split the mask's head axis the way the queries' was split.
        lead = mask.shape[:-3]
        mask = mx.broadcast_to(mask, (*lead, n_kv_heads * n_repeats, L, S))
        mask = mask.reshape(*lead, n_kv_heads, n_repeats, L, S)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask.astype(scores.dtype)


def causal_mask(L: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean ``(L, offset + L)`` mask: query i sees keys up to its position,
    and no more than ``window`` of them when a window is given."""
    q_pos = mx.arange(offset, offset + L)[:, None]
    k_pos = mx.arange(offset + L)[None]
    mask = q_pos >= k_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    return mask
