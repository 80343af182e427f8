"""Low-rank adapters: LoRA, QLoRA and DoRA layers, adapter files, and fusing.

- LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
  arXiv 2106.09685) freezes a linear layer ``W`` and learns a low-rank update:
  ``y = x W^T + scale * dropout(x) A B`` with ``A`` of shape ``(in, rank)``
  and ``B`` of shape ``(rank, out)``, so the fused weight is
  ``W + scale * B^T A^T``.
- QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
  LLMs", arXiv 2305.14314) is the same update on a frozen quantized base; here
  the base stays an MLX ``nn.QuantizedLinear`` and only ``A`` and ``B`` are
  float.
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
  arXiv 2402.09353) splits the adapted weight into a learned magnitude ``m``
  (one number per output row) and a direction:
  ``W' = m * (W + scale * B^T A^T) / ||W + scale * B^T A^T||``, the norm taken
  over each output row.

Adapter folders use mlx-lm's format, so that ``mlx_lm.load(path,
adapter_path=...)`` and ``mlx_lm.generate --adapter-path`` read ours and
``load_adapters`` reads theirs: ``adapters.safetensors`` holds only the
adapter tensors, named ``<layer path>.lora_a``, ``.lora_b`` and, for DoRA,
``.m``; ``adapter_config.json`` holds ``fine_tune_type``, ``num_layers`` and
``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys``). ``scale``
multiplies the update directly: it is not PEFT's ``alpha`` (PEFT's
``alpha / rank`` is the equivalent number).

Fusing folds the update into a plain layer. On a quantized base the sum
``dequantize(W) + scale * B^T A^T`` is formed in float32 and then kept in
float or quantized again. Re-quantizing at the base's 4 bits, as mlx-lm's
fuse does, loses the adapter: a fine-tune's update is far below one
quantization step, and MLX's rounding is not idempotent (re-quantizing
dequantized weights moves 1-3 % of them by a step), which adds noise larger
than the update. So ``fuse_model`` can keep fused layers in float or
re-quantize them at more bits; 8 keeps nearly all of the update.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

FINE_TUNE_TYPES = ("lora", "dora", "full")

# File names mlx-lm reads and writes in an adapter folder.
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# The leaf names of adapter tensors (mlx-lm's names, kept for interchange).
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)

# Bits to re-quantize fused layers of a 4-bit base at. On SmolLM2-135M (4-bit
# g32, adapters of 1-5 % of ||W||) 8 bits misses the adapter's effect on the
# logits by 8-51 % of its size, while the base's 4 bits adds noise 1.3-8 times
# larger than the effect itself; fewer bits draw a warning.
RECOMMENDED_REQUANTIZE_BITS = 8

# Floor for squared row norms in DoRA, far below any real weight row's.
_TINY = 1e-30

# Keys of adapter_config.json that save_adapters owns.
_CORE_KEYS = ("fine_tune_type", "num_layers", "lora_parameters")


@dataclass
class LoRAConfig:
    """What to adapt and how; the fields and defaults are mlx-lm's."""

    fine_tune_type: str = field(
        default="lora", metadata={"help": "lora, dora, or full (no adapters)."}
    )
    num_layers: int = field(
        default=16,
        metadata={
            "help": "Adapt the last N transformer blocks; -1 (or 0, as in "
            "mlx-lm) adapts all of them."
        },
    )
    rank: int = field(default=8, metadata={"help": "Rank of the update."})
    scale: float = field(
        default=20.0,
        metadata={"help": "Multiplier of the update (not alpha: alpha / rank)."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the adapter's input."}
    )
    keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module paths inside a block (self_attn.q_proj) or in the "
            "model (lm_head) to adapt; None adapts every linear layer of the "
            "chosen blocks, as mlx-lm does."
        },
    )

    def __post_init__(self) -> None:
        """Refuse values mlx-lm would misread, naming the field."""
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(
                f"unknown fine_tune_type {self.fine_tune_type!r}; use one of "
                f"{', '.join(FINE_TUNE_TYPES)}"
            )
        if not _is_int(self.num_layers) or self.num_layers < -1:
            raise ValueError(
                f"num_layers must be an integer >= -1, got {self.num_layers!r}"
            )
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.scale):
            raise ValueError(f"scale must be a number, got {self.scale!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.keys is not None:
            if not isinstance(self.keys, (list, tuple)) or not all(
                isinstance(k, str) for k in self.keys
            ):
                raise ValueError(
                    f"keys must be a list of module paths, got {self.keys!r}"
                )
            if not self.keys:
                raise ValueError("keys is empty; give None to adapt every linear layer")
            self.keys = list(self.keys)

    @classmethod
    def from_adapter_config(cls, raw: Any) -> LoRAConfig:
        """Read the parsed ``adapter_config.json`` of mlxbastion or mlx-lm.

        Older mlx-lm folders name ``num_layers`` ``lora_layers`` and mark DoRA
        with ``use_dora``; both are understood.

        Raises:
            ValueError: a missing or ill-typed entry, naming it.
        """
        if not isinstance(raw, dict):
            raise ValueError("must hold a JSON object")
        kind = raw.get("fine_tune_type") or ("dora" if raw.get("use_dora") else "lora")
        num_layers = raw.get("num_layers", raw.get("lora_layers"))
        if num_layers is None:
            raise ValueError("has no num_layers entry")
        params = raw.get("lora_parameters")
        if kind == "full" and params is None:
            # mlx-lm writes null here for full fine-tunes.
            return cls(fine_tune_type=kind, num_layers=num_layers)
        if not isinstance(params, dict):
            raise ValueError("has no lora_parameters object")
        if "scale" not in params:
            hint = " (found alpha; mlx-lm's format takes scale)"
            hint = hint if "alpha" in params else ""
            raise ValueError(f"lora_parameters has no scale{hint}")
        if "rank" not in params:
            raise ValueError("lora_parameters has no rank")
        return cls(
            fine_tune_type=kind,
            num_layers=num_layers,
            rank=params["rank"],
            scale=params["scale"],
            dropout=params.get("dropout", 0.0),
            keys=params.get("keys"),
        )

    def to_adapter_config(self, keys: list[str] | None = None) -> dict[str, Any]:
        """The mlx-lm entries of ``adapter_config.json``.

        Args:
            keys: the resolved module paths to record instead of ``self.keys``.

        Returns:
            ``fine_tune_type``, ``num_layers`` and ``lora_parameters`` (null for
            a full fine-tune, as mlx-lm writes it).
        """
        if self.fine_tune_type == "full":
            params = None
        else:
            params = {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": keys if keys is not None else self.keys,
            }
        return {
            "fine_tune_type": self.fine_tune_type,
            "num_layers": self.num_layers,
            "lora_parameters": params,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Base layers, float or quantized


def _linear_dims(linear: nn.Module) -> tuple[int, int]:
    """``(output_dims, input_dims)`` of an ``nn.Linear`` or ``nn.QuantizedLinear``."""
    output_dims, stored = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        # Each uint32 of the packed weight holds 32 / bits numbers.
        return output_dims, stored * 32 // linear.bits
    return output_dims, stored


def _float_dtype(linear: nn.Module) -> mx.Dtype:
    """The dtype the layer computes in (its scales' for a quantized layer)."""
    if isinstance(linear, nn.QuantizedLinear):
        return linear.scales.dtype
    return linear.weight.dtype


def _float_weight(linear: nn.Module) -> mx.array:
    """The layer's weight ``(out, in)`` in float32, dequantized if need be."""
    if isinstance(linear, nn.QuantizedLinear):
        weight = mx.dequantize(
            linear.weight,
            linear.scales,
            getattr(linear, "biases", None),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
        return weight.astype(mx.float32)
    return linear.weight.astype(mx.float32)


def _matmul_no_bias(linear: nn.Module, x: mx.array) -> mx.array:
    """``x W^T`` without the layer's bias; a quantized ``W`` stays packed."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.quantized_matmul(
            x,
            linear.weight,
            linear.scales,
            getattr(linear, "biases", None),
            transpose=True,
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
    return x @ linear.weight.T


def _rebuild(
    base: nn.Module,
    weight: mx.array,
    *,
    dequantize: bool,
    requantize_bits: int | None,
) -> nn.Module:
    """A plain layer holding ``weight`` (float32) and the base's bias.

    A float base gives an ``nn.Linear`` in the base's dtype. A quantized base
    gives an ``nn.Linear`` in its scales' dtype when ``dequantize``, otherwise
    an ``nn.QuantizedLinear`` at ``requantize_bits`` (default: the base's bits)
    with the base's group size and mode.
    """
    output_dims, input_dims = weight.shape
    has_bias = "bias" in base
    layer = nn.Linear(input_dims, output_dims, bias=has_bias)
    layer.weight = weight.astype(_float_dtype(base))
    if has_bias:
        layer.bias = base.bias
    if isinstance(base, nn.QuantizedLinear) and not dequantize:
        layer = nn.QuantizedLinear.from_linear(
            layer,
            group_size=base.group_size,
            bits=requantize_bits or base.bits,
            mode=base.mode,
        )
    layer.freeze()
    return layer


def _check_base(linear: nn.Module, what: str) -> None:
    if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
        raise NotImplementedError(
            f"{what} is a {type(linear).__name__}; adapters wrap only "
            "nn.Linear and nn.QuantizedLinear layers"
        )


# ---------------------------------------------------------------------------
# Adapter layers


class _LowRank(nn.Module):
    """What LoRA and DoRA share: the frozen base and the factors ``A``, ``B``."""

    def __init__(
        self,
        linear: nn.Module,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_base(linear, "the base layer")
        output_dims, input_dims = _linear_dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        # Hu et al. start B at zero so training begins from the base model;
        # A's bound is mlx-lm's, which keeps x A of order one per rank.
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    @classmethod
    def from_base(
        cls,
        linear: nn.Module,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
    ) -> _LowRank:
        """Wrap ``linear`` (float or quantized); see the class for the args."""
        return cls(linear, rank=rank, scale=scale, dropout=dropout)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def delta(self) -> mx.array:
        """The update ``scale * B^T A^T`` as an ``(out, in)`` float32 matrix."""
        return (self.scale * (self.lora_b.T @ self.lora_a.T)).astype(mx.float32)

    def _update(self, x: mx.array, dtype: mx.Dtype) -> mx.array:
        """``scale * dropout(x) A B``: dropout touches only the adapter's input."""
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return (self.scale * z).astype(dtype)

    def fused_weight(self) -> mx.array:
        """The ``(out, in)`` float32 weight of the equivalent plain layer."""
        raise NotImplementedError

    def fuse(
        self, dequantize: bool = False, requantize_bits: int | None = None
    ) -> nn.Module:
        """A plain layer computing what this one computes (without dropout).

        Args:
            dequantize: on a quantized base, return a float ``nn.Linear``.
            requantize_bits: on a quantized base (without ``dequantize``),
                quantize the fused weight at these bits; None keeps the
                base's bits, as mlx-lm does (see the module docstring).

        Returns:
            ``nn.Linear`` for a float base or with ``dequantize``, otherwise
            ``nn.QuantizedLinear`` with the base's group size.
        """
        return _rebuild(
            self.linear,
            self.fused_weight(),
            dequantize=dequantize,
            requantize_bits=requantize_bits,
        )


class LoRALinear(_LowRank):
    """A frozen linear layer plus a trainable low-rank update.

    ``y = base(x) + scale * dropout(x) @ lora_a @ lora_b``, with ``lora_a``
    ``(in, rank)`` drawn uniformly from ``±1/sqrt(in)`` and ``lora_b``
    ``(rank, out)`` zero, so a fresh adapter changes nothing.

    Args:
        linear: the base, an ``nn.Linear`` or ``nn.QuantizedLinear`` (QLoRA).
        rank: rank of the update.
        scale: multiplier of the update.
        dropout: dropout probability on the update's input.
    """

    def __call__(self, x: mx.array) -> mx.array:
        """``base(x) + scale * dropout(x) A B``."""
        y = self.linear(x)
        return y + self._update(x, y.dtype)

    def fused_weight(self) -> mx.array:
        """``W + scale B^T A^T`` in float32, ``W`` dequantized if need be."""
        return _float_weight(self.linear) + self.delta()


class DoRALinear(_LowRank):
    """LoRA's update with the adapted weight's row norms replaced by ``m``.

    ``y = m / ||W + scale B^T A^T|| * (x W^T + scale * dropout(x) A B) + bias``,
    norms over each output row. ``m`` starts at the base's row norms, so a
    fresh adapter changes nothing. As in the paper (section 4.3), the norm is
    treated as a constant when differentiating, which saves memory.

    Args:
        linear: the base, an ``nn.Linear`` or ``nn.QuantizedLinear``.
        rank: rank of the update.
        scale: multiplier of the update.
        dropout: dropout probability on the update's input.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
    ):
        """Wrap ``linear`` and set ``m`` to its row norms; see the class."""
        super().__init__(linear, rank, scale, dropout)
        # ||W_o||^2 per output row, computed once (the base is frozen); the
        # leading underscore keeps it out of the parameters.
        self._weight_sq = mx.sum(mx.square(_float_weight(linear)), axis=1)
        self.m = mx.sqrt(self._weight_sq)

    def adapted_norm(self) -> mx.array:
        """``||W + scale B^T A^T||`` per output row, without forming the sum.

        Expanding the square gives ``||W_o||^2 + 2 scale <W_o, dW_o> +
        scale^2 ||dW_o||^2`` with ``dW = B^T A^T``: the cross term needs only
        ``A^T W^T`` (a product with the packed weight, as for ``rank`` extra
        tokens) and the last term only ``A^T A``. Neither builds an
        ``(out, in)`` matrix, which matters on a quantized base.
        """
        a = self.lora_a.astype(mx.float32)
        b = self.lora_b.astype(mx.float32)
        # (rank, out); a float32 A promotes the product to float32.
        a_w = _matmul_no_bias(self.linear, a.T).astype(mx.float32)
        cross = mx.sum(b * a_w, axis=0)
        delta_sq = mx.sum(b * ((a.T @ a) @ b), axis=0)
        norm_sq = self._weight_sq + 2 * self.scale * cross
        norm_sq = norm_sq + self.scale**2 * delta_sq
        # The floor keeps an all-zero row (m = 0) at zero instead of 0 / 0.
        return mx.sqrt(mx.maximum(norm_sq, _TINY))

    def __call__(self, x: mx.array) -> mx.array:
        """The LoRA output without bias, rescaled row by row, plus the bias."""
        y = _matmul_no_bias(self.linear, x)
        y = y + self._update(x, y.dtype)

        gain = self.m / mx.stop_gradient(self.adapted_norm())
        y = gain.astype(y.dtype) * y
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y

    def fused_weight(self) -> mx.array:
        """``m * (W + scale B^T A^T) / ||W + scale B^T A^T||`` in float32."""
        weight = _float_weight(self.linear) + self.delta()
        norms = mx.sqrt(mx.maximum(mx.sum(mx.square(weight), axis=1), _TINY))
        return (self.m.astype(mx.float32) / norms)[:, None] * weight


ADAPTER_TYPES = (LoRALinear, DoRALinear)


# ---------------------------------------------------------------------------
# Adapting a model


def _chosen_blocks(model: nn.Module, num_layers: int) -> list[nn.Module]:
    blocks = list(model.layers)
    if num_layers > len(blocks):
        # mlx-lm's adapter loading reads a larger number as every block (its
        # trainer refuses it); the default of 16 then fits small models too.
        logger.warning(
            "--num-layers %d is more than the model's %d blocks; adapting all %d",
            num_layers,
            len(blocks),
            len(blocks),
        )
    # mlx-lm slices layers[-max(n, 0):], so 0 and -1 both mean every block.
    return blocks[-max(num_layers, 0) :]


def default_keys(model: nn.Module) -> list[str]:
    """Paths of every linear layer inside the blocks, as mlx-lm picks them."""
    keys = set()
    for block in model.layers:
        for path, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                keys.add(path)
    return sorted(keys)


def _check_keys(model: nn.Module, keys: list[str]) -> None:
    known = {p for block in model.layers for p, _ in block.named_modules()}
    known |= {p for p, _ in model.named_modules()}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(
            f"adapter key {unknown[0]!r} names no module; use paths inside a "
            f"block such as {', '.join(default_keys(model)[:3])}, or model paths "
            "such as lm_head"
        )


def _adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def apply_adapters(model: nn.Module, config: LoRAConfig) -> None:
    """Freeze ``model`` and make the part ``config`` names trainable.

    For lora and dora, each module named by ``config.keys`` in the last
    ``num_layers`` blocks (and each model-level path among the keys, such as
    ``lm_head``) is wrapped in a ``LoRALinear``/``DoRALinear``; quantized bases
    stay quantized and frozen (QLoRA). For full, the last ``num_layers``
    blocks are unfrozen instead, except packed quantized weights.

    Args:
        model: a model with a ``layers`` list of blocks, such as ``Model``.
        config: what to adapt; see ``LoRAConfig``.

    Raises:
        ValueError: the model already has adapters, ``num_layers`` exceeds the
            blocks, or a key names no module.
        NotImplementedError: a key names a layer that is not linear.
    """
    if _adapter_layers(model):
        raise ValueError(
            "the model already has adapters; fuse_model or remove_adapters first"
        )
    blocks = _chosen_blocks(model, config.num_layers)
    model.freeze()
    if config.fine_tune_type == "full":
        for block in blocks:
            block.unfreeze()
            _freeze_packed(block)
        logger.info("training %d blocks in full", len(blocks))
        return

    keys = config.keys if config.keys is not None else default_keys(model)
    _check_keys(model, keys)
    adapter = DoRALinear if config.fine_tune_type == "dora" else LoRALinear

    def wrap(root: nn.Module, prefix: str) -> None:
        wrapped = []
        for path, module in root.named_modules():
            if path in keys:
                _check_base(module, prefix + path)
                layer = adapter(module, config.rank, config.scale, config.dropout)
                # New modules start in training mode; follow the model's.
                layer.train(model.training)
                wrapped.append((path, layer))
        if wrapped:
            root.update_modules(tree_unflatten(wrapped))

    for block in blocks:
        wrap(block, "a block's ")
    wrap(model, "")
    logger.info(
        "%s on %d layers: %d trainable parameters",
        config.fine_tune_type,
        len(_adapter_layers(model)),
        trainable_parameters(model),
    )


def _freeze_packed(root: nn.Module) -> None:
    # Packed integer codes cannot take gradients; a quantized layer's float
    # bias may still train.
    for _, module in root.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            module.freeze(recurse=False, keys=["weight", "scales", "biases"])


def remove_adapters(model: nn.Module) -> list[str]:
    """Put the base layers back in place of the adapter layers.

    Returns:
        The paths of the layers unwrapped.
    """
    layers = _adapter_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(p, m.linear) for p, m in layers]))
    return [p for p, _ in layers]


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers an optimizer would update."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------------------
# Adapter folders


def adapter_weights(model: nn.Module, config: LoRAConfig) -> dict[str, mx.array]:
    """The tensors an adapter folder stores, under mlx-lm's names.

    For lora and dora: ``lora_a``, ``lora_b`` (and ``m``) of every adapter
    layer, trainable or not, so that a strict load finds them all. For full:
    every trainable parameter.
    """
    if config.fine_tune_type == "full":
        return dict(tree_flatten(model.trainable_parameters()))
    weights = {}
    for path, layer in _adapter_layers(model):
        for leaf in ADAPTER_LEAVES:
            if leaf in layer:
                weights[f"{path}.{leaf}"] = layer[leaf]
    return weights


def _adapted_keys(model: nn.Module) -> list[str]:
    """The keys that reproduce the model's adapter layers.

    Paths inside the blocks, and model paths for adapters outside them.
    """
    keys, in_blocks = set(), set()
    for block in model.layers:
        for path, module in block.named_modules():
            if isinstance(module, ADAPTER_TYPES):
                keys.add(path)
                in_blocks.add(id(module))
    keys |= {p for p, m in _adapter_layers(model) if id(m) not in in_blocks}
    return sorted(keys)


def _check_model_matches(model: nn.Module, config: LoRAConfig) -> None:
    layers = _adapter_layers(model)
    if config.fine_tune_type == "full":
        if layers:
            raise ValueError("fine_tune_type is full but the model has adapters")
        return
    if not layers:
        raise ValueError("the model has no adapters; call apply_adapters first")
    wanted = DoRALinear if config.fine_tune_type == "dora" else LoRALinear
    for path, layer in layers:
        if not isinstance(layer, wanted) or layer.rank != config.rank:
            raise ValueError(
                f"{path} is a rank-{layer.rank} {type(layer).__name__} but the "
                f"config says {config.fine_tune_type} with rank {config.rank}"
            )


def save_adapters(
    model: nn.Module,
    config: LoRAConfig,
    path: str | Path,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` to ``path``.

    Args:
        model: a model prepared by ``apply_adapters`` (or ``load_adapters``).
        config: the config it was prepared with.
        path: the adapter folder; created if missing, files replaced.
        extra_config: more entries for adapter_config.json, such as the
            training arguments (mlx-lm stores all of them there).

    Raises:
        ValueError: the model's adapters do not match ``config``, or
            ``extra_config`` sets one of the entries this function writes.
    """
    _check_model_matches(model, config)
    extra = dict(extra_config or {})
    clash = [k for k in _CORE_KEYS if k in extra]
    if clash:
        raise ValueError(f"extra_config must not set {clash[0]}; it comes from config")

    keys = None if config.fine_tune_type == "full" else _adapted_keys(model)
    entries = {**extra, **config.to_adapter_config(keys)}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, config)
    mx.save_safetensors(
        str(folder / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"}
    )
    text = json.dumps(dict(sorted(entries.items())), indent=4)
    (folder / ADAPTER_CONFIG).write_text(text + "\n")
    logger.info("saved %d adapter tensors to %s", len(weights), folder)


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` of an adapter folder (ours or mlx-lm's).

    Raises:
        FileNotFoundError: the folder or its adapter_config.json is missing.
        ValueError: adapter_config.json is not valid JSON or lacks an entry.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"adapter folder {folder} does not exist; give the folder that "
            f"holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {ADAPTER_CONFIG}; it is not an adapter folder"
        )
    try:
        raw = json.loads(config_file.read_text())
        return LoRAConfig.from_adapter_config(raw)
    except (json.JSONDecodeError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise ValueError(f"{config_file} is malformed: {reason}") from e


def _check_adapter_tensors(
    model: nn.Module,
    config: LoRAConfig,
    weights: dict[str, mx.array],
    source: Path,
) -> None:
    expected = {k: tuple(v.shape) for k, v in adapter_weights(model, config).items()}
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"tensor {missing[0]} is missing from {source}{more}; the adapters "
            f"do not match {ADAPTER_CONFIG} or this model"
        )
    # A full fine-tune may also carry frozen parameters (mlx-lm saves packed
    # quantized weights when it unfreezes them); they must exist in the model.
    full = config.fine_tune_type == "full"
    if full:
        params = tree_flatten(model.parameters())
        expected = {k: tuple(v.shape) for k, v in params}
    for name, tensor in sorted(weights.items()):
        if name not in expected:
            what = "parameter" if full else "adapter"
            raise ValueError(
                f"unexpected tensor {name} in {source}; the model has no such {what}"
            )
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)} in {source} but "
                f"the model with {_describe(config)} expects {expected[name]}"
            )


def _describe(config: LoRAConfig) -> str:
    if config.fine_tune_type == "full":
        return "a full fine-tune"
    return f"{config.fine_tune_type} rank {config.rank}"


def load_adapters(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Apply the adapters in folder ``path`` (ours or mlx-lm's) to ``model``.

    The tensors must match the adapted model exactly: none missing, none
    extra, every shape right. On a mismatch the model is left unwrapped.

    Returns:
        The folder's config.

    Raises:
        FileNotFoundError: the folder, adapter_config.json or
            adapters.safetensors is missing.
        ValueError: a malformed file, or a tensor that does not fit the model
            (named, with both shapes).
    """
    config = read_adapter_config(path)
    weights_file = Path(path) / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{Path(path)} has no {ADAPTER_WEIGHTS}")
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:
        raise ValueError(
            f"cannot read {weights_file}: it is truncated or not safetensors ({e})"
        ) from e

    apply_adapters(model, config)
    try:
        _check_adapter_tensors(model, config, weights, weights_file)
    except ValueError:
        remove_adapters(model)
        raise
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


# ---------------------------------------------------------------------------
# Fusing


def fuse_model(
    model: nn.Module,
    *,
    dequantize: bool = False,
    requantize_bits: int | dict[str, int] | None = None,
) -> list[str]:
    """Replace every adapter layer by a plain layer with the update folded in.

    A float base becomes ``nn.Linear`` with ``W + scale B^T A^T`` (DoRA:
    rescaled to the magnitudes ``m``). On a quantized base the sum is formed
    in float32 from the dequantized weight, then kept in float
    (``dequantize``) or quantized again with the base's group size.

    Re-quantizing at the base's bits (the default, as in mlx-lm) keeps the
    size but not the adapter: see the module docstring;
    ``requantize_bits=RECOMMENDED_REQUANTIZE_BITS`` (8) keeps nearly all of
    the update. The config.json ``quantization`` entry of the result
    needs per-layer entries for the changed bits; ``quant.quantization_config
    (quant.plan_from_config(model, ...))`` builds it from the model.

    Args:
        model: a model with adapter layers.
        dequantize: keep fused layers of quantized bases in float.
        requantize_bits: bits for the re-quantized layers: one number for all,
            or a mapping from layer path to bits. None, or a layer missing
            from the mapping, keeps the base's bits.

    Returns:
        The paths of the fused layers.

    Raises:
        ValueError: unsupported bits, or a mapping that names a layer with no
            adapter.
    """
    layers = _adapter_layers(model)
    bits_for = _bits_chooser(requantize_bits, {p for p, _ in layers})
    fused, few_bits = [], 0
    for path, layer in layers:
        bits = bits_for(path)
        base = layer.linear
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            few_bits += (bits or base.bits) < RECOMMENDED_REQUANTIZE_BITS
        new = layer.fuse(dequantize=dequantize, requantize_bits=bits)
        new.train(layer.training)
        fused.append((path, new))
    if fused:
        model.update_modules(tree_unflatten(fused))
        mx.eval(model.parameters())
    if few_bits:
        logger.warning(
            "re-quantized %d fused layers at fewer than %d bits: a fine-tune's "
            "update is mostly rounded away and re-rounding adds noise that can "
            "exceed it; requantize_bits=%d or dequantize=True keeps it",
            few_bits,
            RECOMMENDED_REQUANTIZE_BITS,
            RECOMMENDED_REQUANTIZE_BITS,
        )
    return [p for p, _ in fused]


def _bits_chooser(
    requantize_bits: int | dict[str, int] | None, paths: set[str]
) -> Callable[[str], int | None]:
    if isinstance(requantize_bits, dict):
        unknown = sorted(set(requantize_bits) - paths)
        if unknown:
            raise ValueError(
                f"requantize_bits names {unknown[0]}, which has no adapter"
            )
        choices = list(requantize_bits.values())
    else:
        choices = [requantize_bits]
    for bits in choices:
        if bits is not None and bits not in SUPPORTED_BITS:
            raise ValueError(
                f"requantize_bits {bits!r} is not supported; use one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
    if isinstance(requantize_bits, dict):
        return requantize_bits.get
    return lambda path: requantize_bits


def verify_fuse(
    adapted: nn.Module,
    fused: nn.Module,
    token_batches: Iterable[mx.array | Sequence[int]],
) -> float:
    """The largest absolute logit difference between two models.

    Both run in eval mode (no dropout) and are left in their former mode.

    Args:
        adapted: the model with adapter layers.
        fused: the same model after ``fuse_model``.
        token_batches: token ids, each ``(L,)`` or ``(B, L)``.

    Raises:
        ValueError: no token batches.
    """
    modes = adapted.training, fused.training
    adapted.eval()
    fused.eval()
    worst, seen = 0.0, 0
    try:
        for tokens in token_batches:
            tokens = mx.array(tokens)
            if tokens.ndim == 1:
                tokens = tokens[None]
            diff = adapted(tokens).astype(mx.float32) - fused(tokens).astype(mx.float32)
            worst = max(worst, mx.abs(diff).max().item())
            seen += 1
    finally:
        adapted.train(modes[0])
        fused.train(modes[1])
    if not seen:
        raise ValueError("verify_fuse needs at least one batch of tokens")
    return worst
