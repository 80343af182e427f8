"""Fine-tuning learns: stories260K, taught four made-up question-answer pairs
with LoRA, answers them word for word under greedy decoding, on a float base
and on a 4-bit base (QLoRA), and the fused models answer the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import STORIES_DIR, require

from mlxbastion.checkpoint import load
from mlxbastion.convert import convert
from mlxbastion.finetune import DataOptions, finetune, fuse
from mlxbastion.generate import generate
from mlxbastion.lora import LoRAConfig, load_adapters
from mlxbastion.quantization import QuantizeOptions, quantize
from mlxbastion.train import TrainingArgs

# Facts no TinyStories model knows.
PAIRS = [
    ("Who is the king of the forest?", "The king is a blue fox named Pim."),
    ("Where does Tim keep his ball?", "Tim keeps it under the big red bed."),
    ("What does the frog eat?", "The frog eats cake with jam."),
    ("What color is the magic hat?", "The magic hat is green and gold."),
]


def prompt(question: str) -> str:
    return f"Q: {question}\nA:"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learn")
    float_dir = convert(require(STORIES_DIR / "hf"), root / "float")
    q4 = root / "q4"
    options = QuantizeOptions(bits=4, group_size=32, method="rtn", evaluate=False)
    quantize(float_dir, q4, options)
    return {"float": float_dir, "4-bit": q4}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qa")
    lines = [json.dumps({"prompt": prompt(q), "completion": f" {a}"}) for q, a in PAIRS]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def answers(model_path: Path, adapter: Path | None = None) -> list[str]:
    model, tokenizer = load(model_path)
    if adapter is not None:
        load_adapters(model, adapter)
    out = []
    for question, _ in PAIRS:
        ids = tokenizer.encode_prompt(prompt(question), use_chat_template=False)
        text = generate(model, tokenizer, ids, max_tokens=24, temp=0.0)
        out.append(text.strip())
    return out


def taught(got: list[str]) -> list[bool]:
    # stories260K never saw an end-of-text token in training and does not
    # learn one from four examples, so it goes on after the answer.
    return [
        text.startswith(answer) for text, (_, answer) in zip(got, PAIRS, strict=True)
    ]


@pytest.mark.parametrize("base", ["float", "4-bit"])
def test_lora_teaches_the_answers_and_fusing_keeps_them(bases, data, base, tmp_path):
    model = bases[base]
    assert not any(taught(answers(model)))

    adapter = tmp_path / "adapter"
    result = finetune(
        model,
        data,
        adapter,
        lora=LoRAConfig(num_layers=-1, rank=16, scale=20.0, dropout=0.0),
        args=TrainingArgs(
            iters=150,
            batch_size=4,
            learning_rate=3e-4,
            steps_per_report=50,
            steps_per_eval=150,
            val_batches=1,
            save_every=150,
        ),
        data_options=DataOptions(max_seq_length=128, mask_prompt=True),
    )
    assert result.steps == 150
    with_adapter = answers(model, adapter)
    assert all(taught(with_adapter)), with_adapter

    fused = tmp_path / "fused"
    report = fuse(model, adapter, fused)
    assert answers(fused) == with_adapter
    assert report.max_logit_diff < (1e-3 if base == "float" else 2.0)
