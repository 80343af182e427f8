"""Model configuration: one dataclass read from a Hugging Face ``config.json``.

Field names are the checkpoint's own, so a ``config.json`` written by
transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) or 5.x
(``rope_parameters``, ``dtype``) loads without a key map. Unknown keys are
kept in ``extra`` and written back unchanged when a model is saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Architectures the one transformer in model.py covers. SmolLM, SmolLM2 and
# TinyLlama are published as "llama".
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# RoPE variants we implement; anything else is refused by name rather than
# silently run as plain RoPE.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder-only transformer, as config.json names them."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; mlxbastion supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; only silu is supported"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.model_type in ("qwen2", "qwen3") and self.extra.get(
            "use_sliding_window"
        ):
            # Limitation: transformers windows only the layers from
            # max_window_layers on; we would window all of them, so we refuse.
            raise ValueError(
                f"{self.model_type} with use_sliding_window=true is not supported; "
                "no published checkpoint sets it"
            )

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases; the others say so in attention_bias."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def attention_window(self) -> int | None:
        """How many past tokens a query may attend to, or None for all.

        Qwen checkpoints carry a ``sliding_window`` that they leave unused
        (``use_sliding_window`` false); Mistral uses it whenever it is set.
        """
        if self.model_type in ("qwen2", "qwen3"):
            return None
        return self.sliding_window

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises queries and keys per head before RoPE."""
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a raw config.json dict, in either transformers layout.

        Raises:
            ValueError: a required key is missing, or a value is unsupported.
        """
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("config.json has no 'model_type'; is it a causal LM?")
        _normalise_rope(config)

        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in known
        ]
        # Refuse an unknown architecture before complaining about its keys.
        if config["model_type"] not in SUPPORTED_MODEL_TYPES:
            known = {**known, **dict.fromkeys(missing, 0)}
        elif missing:
            raise ValueError(f"config.json is missing {', '.join(missing)}")
        extra = {k: v for k, v in config.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict, in the transformers 4.x layout that mlx-lm reads."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("rope_scaling", "quantization"):
                continue
            out[f.name] = value
        if self.quantization is not None:
            out["quantization_config"] = self.quantization
        return dict(sorted(out.items()))


def _normalise_rope(config: dict[str, Any]) -> None:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta``/``rope_scaling``.

    mlx-lm and MLX Swift read only the 4.x keys, so saved folders carry those.
    """
    params = config.pop("rope_parameters", None)
    if params:
        if "rope_theta" in params:
            config.setdefault("rope_theta", params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            config.setdefault("rope_scaling", scaling)
    scaling = config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            config["rope_scaling"] = None
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {kind!r}; mlxbastion implements "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    needed = {
        "linear": ["factor"],
        "llama3": [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
    }
    absent = [key for key in needed.get(kind, []) if key not in scaling]
    if absent:
        raise ValueError(f"rope_scaling of type {kind!r} is missing {absent}")
