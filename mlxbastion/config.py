"""Model configuration: one dataclass read from a Hugging Face ``config.json``.

Field names are the checkpoint's own, so a ``config.json`` written by
transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) or 5.x
(``rope_parameters``, ``dtype``) loads without a key map. Unknown keys are
kept in ``extra`` and written back unchanged when a model is saved.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Architectures the one transformer in model.py covers. SmolLM, SmolLM2 and
# TinyLlama are published as "llama".
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# RoPE variants we implement; anything else is refused by name rather than
# silently run as plain RoPE.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Integer fields that must be >= 1; those in _OPTIONAL may also be null.
_POSITIVE_INTS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
)
_OPTIONAL = ("num_key_value_heads", "head_dim", "sliding_window")


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
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of "
                    f"num_attention_heads ({self.num_attention_heads}) and config.json "
                    "sets no head_dim; fix config.json"
                )
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

    def _check_types(self) -> None:
        """Refuse values of the wrong type or range, naming the key."""
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"config.json: {name} must be a positive integer, got "
                    f"{value!r}; fix config.json"
                )
        for name in ("rms_norm_eps", "rope_theta"):
            _check_positive_number(name, getattr(self, name))
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"config.json: {name} must be true or false, got {value!r}; "
                    "fix config.json"
                )
        if self.quantization is not None:
            _check_quantization(self.quantization)

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
    if params is not None and not isinstance(params, dict):
        raise ValueError(
            f"config.json: rope_parameters must be an object, got {params!r}; "
            "fix config.json"
        )
    if params:
        if "rope_theta" in params:
            config.setdefault("rope_theta", params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            config.setdefault("rope_scaling", scaling)
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(
            f"config.json: rope_scaling must be an object such as "
            f'{{"rope_type": "linear", "factor": 2.0}} or null, got {scaling!r}; '
            "fix config.json"
        )
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
    for key in needed.get(kind, []):
        _check_positive_number(f"rope_scaling.{key}", scaling[key])
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        # model.llama3_rope_freqs divides by their difference.
        raise ValueError(
            "config.json: rope_scaling.low_freq_factor and high_freq_factor must "
            f"differ, both are {scaling['low_freq_factor']!r}; fix config.json"
        )


def _check_positive_number(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(
            f"config.json: {name} must be a positive number, got {value!r}; "
            "fix config.json"
        )


def _check_quantization(quantization: Any) -> None:
    """The mlx-lm ``quantization`` entry: defaults plus optional per-layer ones."""
    if not isinstance(quantization, dict):
        raise ValueError(
            "config.json: quantization must be an object like "
            f'{{"group_size": 64, "bits": 4}}, got {quantization!r}; fix config.json'
        )
    entries = {"quantization": quantization}
    entries.update(
        (f"quantization.{k}", v) for k, v in quantization.items() if isinstance(v, dict)
    )
    for where, entry in entries.items():
        for key in ("group_size", "bits"):
            value = entry.get(key)
            if value is None and where == "quantization":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"config.json: {where}.{key} must be a positive integer, got "
                    f"{value!r}; fix config.json"
                )
