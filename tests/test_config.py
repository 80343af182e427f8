"""ModelArgs: reading config.json in the transformers 4.x and 5.x layouts."""

from __future__ import annotations

import pytest

from mlxbastion.config import ModelArgs

BASE = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "intermediate_size": 96,
    "vocab_size": 128,
}


def test_derived_fields_and_defaults():
    args = ModelArgs.from_dict(BASE)
    assert args.num_key_value_heads == 8
    assert args.head_dim == 8
    assert args.rope_theta == 10000.0
    assert args.tie_word_embeddings is False
    assert not args.qkv_bias and not args.qk_norm


def test_transformers_5_layout_is_read_and_written_as_4x():
    config = {
        **BASE,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "dtype": "bfloat16",
        "some_future_key": [1, 2],
    }
    args = ModelArgs.from_dict(config)
    assert args.rope_theta == 500000.0
    assert args.rope_scaling["rope_type"] == "llama3"
    assert args.rope_scaling["factor"] == 8.0

    out = args.to_dict()
    assert "rope_parameters" not in out
    assert out["rope_theta"] == 500000.0
    assert out["torch_dtype"] == "bfloat16"
    assert out["some_future_key"] == [1, 2]
    assert ModelArgs.from_dict(out) == args


def test_default_rope_type_means_no_scaling():
    config = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    args = ModelArgs.from_dict(config)
    assert args.rope_theta == 1e6
    assert args.rope_scaling is None


def test_family_switches():
    assert ModelArgs.from_dict({**BASE, "model_type": "qwen2"}).qkv_bias
    assert ModelArgs.from_dict({**BASE, "model_type": "qwen3"}).qk_norm
    mistral = ModelArgs.from_dict(
        {**BASE, "model_type": "mistral", "sliding_window": 32}
    )
    assert mistral.attention_window == 32
    qwen = ModelArgs.from_dict(
        {
            **BASE,
            "model_type": "qwen2",
            "sliding_window": 32,
            "use_sliding_window": False,
        }
    )
    assert qwen.attention_window is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'.*llama, mistral"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope scaling type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8}}, "missing"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        (
            {"model_type": "qwen2", "use_sliding_window": True},
            "use_sliding_window=true is not supported",
        ),
    ],
)
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_dict({**BASE, **change})


def test_missing_keys_are_named():
    config = dict(BASE)
    del config["hidden_size"]
    with pytest.raises(ValueError, match="missing hidden_size"):
        ModelArgs.from_dict(config)
    with pytest.raises(ValueError, match="no 'model_type'"):
        ModelArgs.from_dict({"hidden_size": 64})
