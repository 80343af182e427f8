"""Tests for mlxbastion.data: record checks, tokenization, masks and batches.

Exact ids come from the real tokenizers in ../shared (stories260K's 512-token
SentencePiece vocabulary; SmolLM2, Qwen2.5, Qwen3 and Llama 3.2 with their
chat templates), and the real data sets are checked against MANIFEST.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import SHARED_DIR, require

from mlxbastion.data import (
    Dataset,
    Example,
    batch_order,
    check_record,
    iterate_batches,
    load_dataset,
    loop_batches,
    make_batch,
    render_example,
    summarize,
)
from mlxbastion.tokenizer import Tokenizer, load_tokenizer

DATA_DIR = SHARED_DIR / "data"


def write_jsonl(folder: Path, name: str, lines: list[Any]) -> Path:
    """Write records (dicts) or raw strings as one line each."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def make_folder(root: Path, train: list[Any], valid: list[Any] | None = None) -> Path:
    write_jsonl(root, "train", train)
    write_jsonl(root, "valid", train if valid is None else valid)
    return root


def target_texts(example: Example, tokenizer: Tokenizer) -> list[str]:
    """The decoded runs of target tokens after position 0."""
    runs, start = [], None
    flags = example.targets()
    for i, flag in enumerate([*flags, False]):
        if flag and i > 0 and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(tokenizer.decode(example.tokens[start:i]))
            start = None
    return runs


@pytest.fixture(scope="module")
def tokenizers(
    shared_tokenizer_dir: Callable[[str], Path],
) -> Callable[[str], Tokenizer]:
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = load_tokenizer(shared_tokenizer_dir(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def stories(tokenizers: Callable[[str], Tokenizer]) -> Tokenizer:
    return tokenizers("stories260K")


@pytest.fixture(scope="module")
def smollm2(tokenizers: Callable[[str], Tokenizer]) -> Tokenizer:
    return tokenizers("smollm2")


# ---------------------------------------------------------------------------
# Tokenization of each record type

PROMPT = {"prompt": "Q: Who ran?\nA:", "completion": " Lily ran."}
# <s> ▁ Q : ▁ W h o ▁r an ? \n A : | ▁Lily ▁r an . </s>
PROMPT_IDS = [1, 410, 473, 467, 410, 448, 415, 414, 352, 303, 450, 13, 447, 467]
COMPLETION_IDS = [317, 352, 303, 426, 2]

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Smol."},
    ]
}
CHAT_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nName?<|im_end|>\n"
    "<|im_start|>assistant\nSmol.<|im_end|>\n"
)
# fmt: off
CHAT_IDS = [
    1, 9690, 198, 6077, 5453, 30, 2, 198,
    1, 4093, 198, 26843, 17, 2, 198,
    1, 520, 9531, 198, 19556, 30, 2, 198,
    1, 4093, 198, 5820, 47, 2, 198,
    1, 520, 9531, 198, 9207, 308, 30, 2, 198,
]
# fmt: on


def test_text_tokens_exact(stories: Tokenizer, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [{"text": "Once upon a time"}])
    data = load_dataset(folder, stories, splits=("train",))
    # BOS from the tokenizer, EOS appended so the model learns to stop.
    assert data["train"][0].tokens == [1, 403, 407, 261, 378, 2]
    assert data["train"][0].targets() == [True] * 6
    assert data["train"][0].num_targets == 5
    assert render_example({"text": "Once upon a time"}, stories) == (
        "<s> Once upon a time</s>"
    )


def test_text_ending_in_eos_gets_no_second_one(stories: Tokenizer) -> None:
    assert render_example({"text": "Lily ran.</s>"}, stories) == "<s> Lily ran.</s>"


def test_text_with_mask_prompt_is_refused(stories: Tokenizer, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [{"text": "Once upon a time"}])
    with pytest.raises(ValueError, match="text records, which have no prompt"):
        load_dataset(folder, stories, mask_prompt=True)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_completion_without_template_exact(
    stories: Tokenizer, tmp_path: Path, mask_prompt: bool
) -> None:
    folder = make_folder(tmp_path, [PROMPT])
    example = load_dataset(folder, stories, mask_prompt=mask_prompt)["train"][0]

    assert example.tokens == PROMPT_IDS + COMPLETION_IDS
    assert example.mask is None
    if mask_prompt:
        assert example.target_start == len(PROMPT_IDS)
        assert example.num_targets == len(COMPLETION_IDS)
        # (SentencePiece drops the leading space when decoding from "▁Lily".)
        assert target_texts(example, stories) == ["Lily ran.</s>"]
    else:
        assert example.target_start == 0
        assert example.num_targets == len(example.tokens) - 1


def test_chat_smollm2_exact(smollm2: Tokenizer, tmp_path: Path) -> None:
    assert render_example(CHAT, smollm2) == CHAT_TEXT

    folder = make_folder(tmp_path, [CHAT])
    plain = load_dataset(folder, smollm2)["train"][0]
    masked = load_dataset(folder, smollm2, mask_prompt=True)["train"][0]

    # The template writes <|im_start|> (SmolLM2's BOS) itself: no second one.
    assert plain.tokens == CHAT_IDS
    assert masked.tokens == CHAT_IDS
    assert plain.mask is None and plain.target_start == 0
    # Exactly "Hello.<|im_end|>" and "Smol.<|im_end|>": no role header, no
    # newline after the end-of-turn token.
    expected = [False] * len(CHAT_IDS)
    expected[19:22] = [True] * 3
    expected[34:38] = [True] * 4
    assert masked.mask == expected
    assert masked.target_start == 19
    assert target_texts(masked, smollm2) == ["Hello.<|im_end|>", "Smol.<|im_end|>"]


def test_completion_with_template_masks_the_completion(
    smollm2: Tokenizer, tmp_path: Path
) -> None:
    record = {"prompt": "2+2?", "completion": "4"}
    assert render_example(record, smollm2) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
        "by Hugging Face<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    folder = make_folder(tmp_path, [record])
    example = load_dataset(folder, smollm2, mask_prompt=True)["train"][0]
    assert target_texts(example, smollm2) == ["4<|im_end|>"]
    assert example.num_targets == 2


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": TOOLS,
}
QWEN_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>"
)


@pytest.mark.parametrize(
    ("name", "record", "expected"),
    [
        ("smollm2", CHAT, ["Hello.<|im_end|>", "Smol.<|im_end|>"]),
        (
            "qwen2.5",
            TOOL_CHAT,
            ["Hello.<|im_end|>", QWEN_CALL, "It is 21 degrees.<|im_end|>"],
        ),
        (
            # Qwen3 renders an empty think block in the last turn only.
            "qwen3",
            TOOL_CHAT,
            [
                "Hello.<|im_end|>",
                QWEN_CALL,
                "<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>",
            ],
        ),
        (
            "llama3.2",
            TOOL_CHAT,
            [
                "Hello.<|eot_id|>",
                '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                "It is 21 degrees.<|eot_id|>",
            ],
        ),
    ],
)
def test_chat_mask_covers_every_assistant_turn(
    tokenizers: Callable[[str], Tokenizer],
    tmp_path: Path,
    name: str,
    record: dict[str, Any],
    expected: list[str],
) -> None:
    tokenizer = tokenizers(name)
    folder = make_folder(tmp_path, [record])
    plain = load_dataset(folder, tokenizer)["train"][0]
    masked = load_dataset(folder, tokenizer, mask_prompt=True)["train"][0]

    assert masked.tokens == plain.tokens
    assert target_texts(masked, tokenizer) == expected
    # Each run is exactly the tokens of its text, nothing around it.
    assert masked.num_targets == sum(
        len(tokenizer.encode(t, add_special_tokens=False)) for t in expected
    )


def test_chat_mask_without_offsets_matches(
    tokenizers: Callable[[str], Tokenizer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = tokenizers("qwen2.5")
    folder = make_folder(tmp_path, [TOOL_CHAT])
    expected = load_dataset(folder, tokenizer, mask_prompt=True)["train"][0]

    calls = []

    def no_offsets(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise NotImplementedError("offsets need a fast tokenizer")

    # A tokenizer that cannot report offsets falls back to prefix matching.
    monkeypatch.setattr(type(tokenizer.hf), "__call__", no_offsets)
    fallback = load_dataset(folder, tokenizer, mask_prompt=True)["train"][0]
    assert calls and fallback == expected


def test_tool_call_arguments_as_json_string_are_parsed() -> None:
    record = json.loads(json.dumps(TOOL_CHAT))
    record["messages"][3]["tool_calls"][0]["function"]["arguments"] = (
        '{"city": "Paris"}'
    )
    record["messages"][3]["content"] = None
    kind, data = check_record(record)
    assert kind == "chat"
    call = data["messages"][3]
    assert call["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert call["content"] == ""


def test_template_that_ignores_tools_is_refused(
    smollm2: Tokenizer, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path, [CHAT, TOOL_CHAT])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: .*ignores 'tools'"):
        load_dataset(folder, smollm2)


def test_template_that_ignores_tool_calls_is_refused(
    smollm2: Tokenizer, tmp_path: Path
) -> None:
    record = {k: v for k, v in TOOL_CHAT.items() if k != "tools"}
    folder = make_folder(tmp_path, [record])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: .*ignores assistant"):
        load_dataset(folder, smollm2)


def test_chat_without_template_is_refused(stories: Tokenizer, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [CHAT])
    with pytest.raises(ValueError, match="no chat template"):
        load_dataset(folder, stories)


# ---------------------------------------------------------------------------
# Truncation, dropping and the report


def test_truncation_is_counted_and_reported(stories: Tokenizer, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [{"text": "Once upon a time"}, {"text": "a"}])
    data = load_dataset(folder, stories, max_seq_length=4)

    assert data["train"][0].tokens == [1, 403, 407, 261]
    assert data["train"].truncated == 1
    report = summarize(data, stories)
    assert report.splits["train"].truncated == 1
    assert report.warnings == [
        "1 of 2 training examples were longer than max_seq_length=4 and were truncated",
        "1 of 2 validation examples were longer than max_seq_length=4 and were "
        "truncated",
    ]


def test_examples_without_targets_are_dropped(
    stories: Tokenizer, tmp_path: Path
) -> None:
    short = {"prompt": "Hi", "completion": " yes"}
    folder = make_folder(tmp_path, [short, PROMPT, short], valid=[short])
    # The 14-token prompt fills all 8 positions: no completion token is left.
    data = load_dataset(folder, stories, max_seq_length=8, mask_prompt=True)

    train = data["train"]
    assert (len(train), train.records, train.dropped_lines) == (2, 3, [2])
    assert [e.line for e in train] == [1, 3]
    report = summarize(data, stories)
    assert report.splits["train"].dropped == 1
    assert report.warnings == [
        "1 of 3 training examples had no target tokens within max_seq_length=8 "
        f"and were dropped (first: {folder / 'train.jsonl'}:2)"
    ]


def test_all_training_examples_dropped_is_an_error(
    stories: Tokenizer, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path, [PROMPT])
    with pytest.raises(ValueError, match="none of its 1 examples has a target"):
        load_dataset(folder, stories, max_seq_length=8, mask_prompt=True)


def test_report_shows_first_example_and_targets(
    smollm2: Tokenizer, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path, [CHAT])
    report = summarize(load_dataset(folder, smollm2, mask_prompt=True), smollm2)
    assert report.example == CHAT_TEXT
    assert report.example_targets == ["Hello.<|im_end|>", "Smol.<|im_end|>"]
    train = report.splits["train"]
    assert (train.records, train.examples, train.tokens, train.target_tokens) == (
        1,
        1,
        len(CHAT_IDS),
        7,
    )


# ---------------------------------------------------------------------------
# Batches


def small_dataset() -> Dataset:
    examples = [
        Example([5, 6, 7]),
        Example([5, 6, 7, 8, 9], target_start=2),
        Example([1, 2, 3, 4], target_start=2, mask=[False, False, True, True]),
    ]
    return Dataset(examples, max_seq_length=16, pad_id=0)


def test_batch_padding_and_loss_mask() -> None:
    batch = make_batch(small_dataset(), [0, 1, 2], pad_multiple=1)

    assert batch.tokens.dtype.size == 4 and batch.tokens.shape == (3, 5)
    assert batch.tokens.tolist() == [
        [5, 6, 7, 0, 0],
        [5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0],
    ]
    # Row j scores the prediction of token j + 1: padding and prompt are out.
    assert batch.loss_mask.shape == (3, 4)
    assert batch.loss_mask.tolist() == [
        [True, True, False, False],
        [False, True, True, True],
        [False, True, True, False],
    ]
    assert batch.lengths.tolist() == [3, 5, 4]
    assert batch.indices == [0, 1, 2]


def test_batch_width_rounds_up_but_not_past_max_seq_length() -> None:
    data = small_dataset()
    assert make_batch(data, [0, 1], pad_multiple=8).tokens.shape == (2, 9)
    data.max_seq_length = 6
    assert make_batch(data, [0, 1], pad_multiple=8).tokens.shape == (2, 6)


def varied_dataset(n: int = 256) -> Dataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=n)
    return Dataset([Example(list(range(int(k)))) for k in lengths], pad_id=0)


def mean_spread(data: Dataset, order: list[list[int]]) -> float:
    lengths = data.lengths
    return float(np.mean([np.ptp([lengths[i] for i in b]) for b in order]))


def test_length_grouping_narrows_batches() -> None:
    data = varied_dataset()
    grouped = batch_order(data, 8, seed=1, epoch=0)
    shuffled = batch_order(data, 8, seed=1, epoch=0, length_grouped=False)

    for order in (grouped, shuffled):
        flat = [i for b in order for i in b]
        assert len(order) == 32 and len(set(flat)) == 256
    assert mean_spread(data, grouped) < mean_spread(data, shuffled) / 10


def test_batch_order_is_deterministic() -> None:
    data = varied_dataset(100)
    order = batch_order(data, 4, seed=3, epoch=2)
    assert order == batch_order(data, 4, seed=3, epoch=2)
    assert order != batch_order(data, 4, seed=4, epoch=2)
    assert order != batch_order(data, 4, seed=3, epoch=3)
    # 100 % 8 examples left out; with drop_last off they form a short batch.
    assert len(batch_order(data, 8, seed=3)) == 12
    last = batch_order(data, 8, seed=3, drop_last=False)
    assert sorted(len(b) for b in last)[0] == 4


def test_resume_yields_the_remaining_batches() -> None:
    data = varied_dataset(40)
    full = [b.tokens.tolist() for b in iterate_batches(data, 4, seed=7, epoch=1)]
    resumed = iterate_batches(data, 4, seed=7, epoch=1, start=6)
    assert [b.tokens.tolist() for b in resumed] == full[6:]

    stored = batch_order(data, 4, seed=7, epoch=1)
    replayed = iterate_batches(data, 4, seed=0, order=stored, start=6)
    assert [b.tokens.tolist() for b in replayed] == full[6:]


def test_loop_batches_resumes_across_epochs() -> None:
    data = varied_dataset(40)  # 10 batches per epoch
    stream = loop_batches(data, 4, seed=7)
    first = [next(stream).indices for _ in range(25)]
    assert first[10:20] == batch_order(data, 4, seed=7, epoch=1)

    resumed = loop_batches(data, 4, seed=7, step=8)
    assert [next(resumed).indices for _ in range(17)] == first[8:]


def test_dataset_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="has 3 examples, fewer than one batch"):
        batch_order(small_dataset(), 4, seed=0)


# ---------------------------------------------------------------------------
# Bad inputs: each fails at once with one line naming the file and line

GOOD = {"text": "Once upon a time"}
BAD_LINES = {
    "not_json": ('{"text": "a"', r"train\.jsonl:2: not valid JSON"),
    "not_object": ('["a"]', r"train\.jsonl:2: expected a JSON object, got array"),
    "unknown_key": (
        {"text": "a", "label": 1},
        r"train\.jsonl:2: unknown key 'label' in a text record",
    ),
    "wrong_type": ({"text": 5}, r"train\.jsonl:2: 'text' must be a string, got number"),
    "empty_text": ({"text": "  "}, r"train\.jsonl:2: 'text' is empty"),
    "no_known_key": ({"body": "a"}, r"train\.jsonl:2: expected a 'text'"),
    "mixed_formats": (
        {"prompt": "a", "completion": "b"},
        r"train\.jsonl:2: a completions record, but line 1 is a text record",
    ),
}
BAD_CHAT = {
    "completion_without_prompt": (
        {"completion": "b"},
        r"has 'completion' but no 'prompt'",
    ),
    "messages_not_array": ({"messages": "hi"}, r"'messages' must be a non-empty"),
    "bad_role": (
        {"messages": [{"role": "bot", "content": "hi"}]},
        r"messages\[0\] has role 'bot'; expected one of system, user",
    ),
    "missing_content": (
        {"messages": [{"role": "user"}]},
        r"messages\[0\] \(user\) has no 'content'",
    ),
    "content_not_string": (
        {"messages": [{"role": "user", "content": ["hi"]}]},
        r"messages\[0\]\.content must be a string, got array",
    ),
    "unknown_message_key": (
        {"messages": [{"role": "user", "content": "hi", "weight": 0}]},
        r"messages\[0\] has unknown key 'weight'",
    ),
    "tool_calls_on_user": (
        {"messages": [{"role": "user", "content": "", "tool_calls": []}]},
        r"messages\[0\] has 'tool_calls' but role 'user'",
    ),
    "bad_arguments": (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ]
        },
        r"messages\[0\]\.tool_calls\[0\]\.function\.arguments must be an object",
    ),
    "tools_not_array": (
        {"messages": [{"role": "user", "content": "hi"}], "tools": {}},
        r"'tools' must be an array, got object",
    ),
    "tools_with_text": (
        {"text": "hi", "tools": []},
        r"unknown key 'tools' in a text record",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(
    stories: Tokenizer, tmp_path: Path, case: str
) -> None:
    line, message = BAD_LINES[case]
    folder = make_folder(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(folder, stories)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_record_is_reported(stories: Tokenizer, tmp_path: Path, case: str) -> None:
    record, message = BAD_CHAT[case]
    folder = make_folder(tmp_path, [record])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: " + message) as info:
        load_dataset(folder, stories)
    assert "\n" not in str(info.value)


def test_bad_line_in_valid_fails_before_tokenizing(
    stories: Tokenizer, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path, [GOOD], valid=[GOOD, GOOD, "{oops"])
    with pytest.raises(ValueError, match=r"valid\.jsonl:3: not valid JSON"):
        load_dataset(folder, stories)


def test_missing_train_file(stories: Tokenizer, tmp_path: Path) -> None:
    write_jsonl(tmp_path, "valid", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"has no train\.jsonl.*valid\.jsonl"):
        load_dataset(tmp_path, stories)


def test_missing_folder(stories: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", stories)


def test_missing_valid_file(stories: Tokenizer, tmp_path: Path) -> None:
    write_jsonl(tmp_path, "train", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"has no valid\.jsonl"):
        load_dataset(tmp_path, stories)
    # With validation off, training data alone is enough.
    assert list(load_dataset(tmp_path, stories, splits=("train",))) == ["train"]


def test_empty_file(stories: Tokenizer, tmp_path: Path) -> None:
    write_jsonl(tmp_path, "train", [GOOD])
    (tmp_path / "valid.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid\.jsonl is empty"):
        load_dataset(tmp_path, stories)


def test_valid_smaller_than_one_batch(stories: Tokenizer, tmp_path: Path) -> None:
    folder = make_folder(tmp_path, [GOOD] * 8, valid=[GOOD] * 3)
    with pytest.raises(
        ValueError,
        match=r"validation set .* has 3 examples, fewer than one batch of "
        "batch_size=4",
    ):
        load_dataset(folder, stories, batch_size=4)
    assert len(load_dataset(folder, stories, batch_size=3)["valid"]) == 3


# ---------------------------------------------------------------------------
# The real data sets in ../shared/data (counts from MANIFEST.md)


def test_wikisql_with_stories260k(stories: Tokenizer) -> None:
    folder = require(DATA_DIR / "wikisql")
    data = load_dataset(folder, stories)
    report = summarize(data, stories)

    counts = {name: (s.records, s.examples) for name, s in report.splits.items()}
    assert counts == {"train": (1000, 1000), "valid": (100, 100), "test": (100, 100)}
    assert [report.splits[n].tokens for n in ("train", "valid", "test")] == [
        200621,
        20756,
        20249,
    ]
    assert report.warnings == []
    assert report.example.startswith("<s> table: 1-1000181-1\ncolumns:")
    assert report.example.endswith("</s>")

    short = load_dataset(folder, stories, max_seq_length=512, splits=("train",))
    assert summarize(short, stories).warnings == [
        "2 of 1000 training examples were longer than max_seq_length=512 and "
        "were truncated"
    ]


def test_wwdc25_completions_with_smollm2(smollm2: Tokenizer) -> None:
    folder = require(DATA_DIR / "wwdc25_completions")
    data = load_dataset(folder, smollm2, mask_prompt=True)
    report = summarize(data, smollm2)

    assert {n: s.examples for n, s in report.splits.items()} == {
        "train": 1800,
        "valid": 144,
    }
    assert report.splits["train"].tokens == 229709
    assert report.splits["train"].target_tokens == 151886
    assert report.example_targets[0].endswith("<|im_end|>")


def test_chat_identity_with_smollm2(smollm2: Tokenizer) -> None:
    folder = require(DATA_DIR / "chat_identity")
    report = summarize(load_dataset(folder, smollm2, mask_prompt=True), smollm2)

    assert {n: s.examples for n, s in report.splits.items()} == {
        "train": 80,
        "valid": 11,
    }
    assert (report.splits["train"].tokens, report.splits["train"].target_tokens) == (
        8771,
        5223,
    )
    assert report.example_targets == [
        "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I "
        "assist you today?<|im_end|>"
    ]


def test_chat_toolcall_with_qwen25(tokenizers: Callable[[str], Tokenizer]) -> None:
    folder = require(DATA_DIR / "chat_toolcall")
    qwen = tokenizers("qwen2.5")
    data = load_dataset(folder, qwen, mask_prompt=True)
    report = summarize(data, qwen)

    train = report.splits["train"]
    assert (train.records, report.splits["valid"].records) == (280, 20)
    # Line 244's user turn alone is longer than 2048 tokens.
    assert (train.examples, train.dropped, train.first_dropped) == (
        279,
        1,
        f"{folder / 'train.jsonl'}:244",
    )
    assert (train.tokens, train.target_tokens) == (155134, 82740)

    # Every tool call is a target, from <tool_call> to the end-of-turn token.
    calls = [
        run
        for example in data["valid"]
        for run in target_texts(example, qwen)
        if "<tool_call>" in run
    ]
    assert len(calls) == 25
    assert all(
        c.startswith("<tool_call>\n{") and c.endswith("</tool_call><|im_end|>")
        for c in calls
    )


def test_chat_toolcall_with_smollm2_is_refused(smollm2: Tokenizer) -> None:
    folder = require(DATA_DIR / "chat_toolcall")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: .*ignores 'tools'"):
        load_dataset(folder, smollm2)
