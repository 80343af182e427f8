"""Tests for mlxbastion.tokenizer on real tokenizers of popular model families.

The tokenizers come from ``../shared`` (see the ``shared_tokenizer_dir``
fixture in conftest.py); each loads once per session.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mlxbastion.tokenizer import (
    StopMatcher,
    Tokenizer,
    WindowDetokenizer,
    byte_level_token_bytes,
    load_tokenizer,
    sentencepiece_token_bytes,
)

ALL_TOKENIZERS = [
    "gpt2",
    "llama3.2",
    "qwen2.5",
    "qwen3",
    "gemma3",
    "mistral",
    "smollm2",
    "stories260K",
]

TEXTS = [
    "Héllo wörld, café naïve façade",
    "日本語のテキストと中文",
    "emoji 🎉🦙 and a family 👩‍👩‍👧 done",
    "multiple   spaces  here",
    "line1\nline2\n\n  indented\n",
    "\ttabs\r\nand CRLF",
    " leading space",
    "  two leading spaces",
    "a ,b  , c . d",
    "trailing space ",
    "Ünïcödé ñ ß ø å Ω ∑ 😀",
]

SYSTEM = "You are terse."
PROMPT = "Hi there!"
LLAMA_DATE = {"date_string": "26 Jul 2024"}

# Rendered system + user + generation prompt, written out by hand.
EXPECTED_CHAT = {
    "llama3.2": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen2.5": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "qwen3": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    # Gemma has no system role: its template folds the system prompt into the
    # first user turn.
    "gemma3": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there!<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "smollm2": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}

# The original Mistral-7B-Instruct-v0.1 template logic: a system message breaks
# the user/assistant alternation and raises.
RAISING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# A template that silently skips anything but user turns.
DROPPING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "USER: {{ message['content'] }}\n{% endif %}{% endfor %}ASSISTANT:"
)


@pytest.fixture(scope="session")
def load(shared_tokenizer_dir: Callable[[str], Path]) -> Callable[[str], Tokenizer]:
    """Load a shared tokenizer by folder name, once per session."""
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = load_tokenizer(shared_tokenizer_dir(name))
        return cache[name]

    return get


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Feed ids one at a time; return every piece, the final flush last."""
    detokenizer = tokenizer.new_detokenizer()
    return [detokenizer.add_token(i) for i in ids] + [detokenizer.finalize()]


def copy_with_config(source: Path, target: Path, **tokenizer_config: object) -> Path:
    """Copy a tokenizer folder, overriding entries of tokenizer_config.json."""
    shutil.copytree(source, target)
    path = target / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_config)
    path.write_text(json.dumps(config))
    return target


# Streaming detokenization


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_stream_equals_decode(load, name):
    tokenizer = load(name)
    texts = [*TEXTS, "".join(TEXTS)]
    for text, special in itertools.product(texts, [False, True]):
        ids = tokenizer.encode(text, add_special_tokens=special)
        if special:
            ids.append(min(tokenizer.eos_token_ids))
        pieces = stream(tokenizer, ids)

        assert "".join(pieces) == tokenizer.decode(ids), (text, special)
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "mistral", "stories260K"])
def test_window_fallback_equals_decode(load, name):
    tokenizer = load(name)
    ids = tokenizer.encode("".join(TEXTS))
    detokenizer = WindowDetokenizer(tokenizer.decode)
    pieces = [detokenizer.add_token(i) for i in ids] + [detokenizer.finalize()]

    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize(
    "name, kind, strips",
    [
        ("gpt2", "byte_level", False),
        ("llama3.2", "byte_level", False),
        ("qwen2.5", "byte_level", False),
        ("qwen3", "byte_level", False),
        ("smollm2", "byte_level", False),
        ("gemma3", "sentencepiece", False),
        ("mistral", "sentencepiece", True),
        ("stories260K", "sentencepiece", True),
    ],
)
def test_detokenizer_choice_follows_decoder(load, name, kind, strips):
    tokenizer = load(name)
    assert tokenizer.detokenizer_kind == kind
    assert tokenizer.new_detokenizer()._strip_leading_space is strips


@pytest.mark.parametrize(
    "name, text",
    [
        # Byte fallback: each CJK character is three <0xNN> tokens.
        ("stories260K", "語"),
        ("stories260K", "🦙"),
        ("mistral", "🦙"),
        # Byte-level BPE splits a rare emoji across several tokens.
        ("llama3.2", "🦙"),
        ("gpt2", "語"),
    ],
)
def test_split_character_is_held_until_complete(load, name, text):
    tokenizer = load(name)
    ids = tokenizer.encode("x" + text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)

    # The character spans several ids, and nothing of it shows before the last.
    assert len(ids) > 2
    assert "".join(pieces).endswith(text)
    assert all(text not in piece and "\ufffd" not in piece for piece in pieces[:-2])
    assert text in pieces[-2] or text in pieces[-1]


def test_byte_level_keeps_leading_space(load):
    # The text starts with a space-prefixed token; decode keeps the space.
    tokenizer = load("gpt2")
    ids = tokenizer.encode(" hello world")
    assert "".join(stream(tokenizer, ids)) == " hello world"


def test_sentencepiece_strips_one_leading_space(load):
    tokenizer = load("stories260K")
    ids = tokenizer.encode("Once upon a time")
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "<s> Once upon a time"
    # Without BOS the decoder's Strip step removes the first token's space.
    pieces = stream(tokenizer, ids[1:])
    assert pieces[0] == "Once"
    assert "".join(pieces) == "Once upon a time"


def test_detokenizers_are_independent(load):
    tokenizer = load("qwen2.5")
    first, second = tokenizer.new_detokenizer(), tokenizer.detokenizer
    for token in tokenizer.encode("abc def"):
        first.add_token(token)
    assert second.tokens == []
    assert second.add_token(tokenizer.encode("x")[0]) == "x"
    assert first.text == "abc def"

    first.reset()
    assert (first.tokens, first.text) == ([], "")


def test_last_segment_reports_new_text(load):
    tokenizer = load("llama3.2")
    detokenizer = tokenizer.new_detokenizer()
    for token in tokenizer.encode("Hello world", add_special_tokens=False):
        detokenizer.add_token(token)
    assert detokenizer.last_segment == "Hello world"
    assert detokenizer.last_segment == ""


def test_token_bytes_helpers():
    assert byte_level_token_bytes("Ġhello") == b" hello"
    assert byte_level_token_bytes("ĊĊ") == b"\n\n"
    assert byte_level_token_bytes("ðŁ¦") == "🦙".encode()[:3]
    # Plain-text added tokens are not in the byte alphabet: kept as UTF-8.
    assert byte_level_token_bytes("<think>\n") == b"<think>\n"
    assert sentencepiece_token_bytes("\u2581hello") == b" hello"
    assert sentencepiece_token_bytes("<0xE6>") == b"\xe6"
    assert sentencepiece_token_bytes("<s>") == b"<s>"


# Chat formatting and prompt encoding


@pytest.mark.parametrize("name", sorted(EXPECTED_CHAT))
def test_chat_template_renders_expected_prompt(load, name):
    tokenizer = load(name)
    kwargs = LLAMA_DATE if name == "llama3.2" else None
    text = tokenizer.format_prompt(PROMPT, system=SYSTEM, chat_template_kwargs=kwargs)
    assert text == EXPECTED_CHAT[name]

    ids = tokenizer.encode_prompt(PROMPT, system=SYSTEM, chat_template_kwargs=kwargs)
    assert tokenizer.decode(ids) == EXPECTED_CHAT[name]


def test_llama3_prompt_has_bos_once(load):
    tokenizer = load("llama3.2")
    ids = tokenizer.encode_prompt(
        PROMPT, system=SYSTEM, chat_template_kwargs=LLAMA_DATE
    )
    begin_of_text, start_header = 128000, 128006
    assert ids[0:2] == [begin_of_text, start_header]
    assert ids.count(begin_of_text) == 1


def test_gemma3_prompt_has_bos_once(load):
    tokenizer = load("gemma3")
    ids = tokenizer.encode_prompt(PROMPT, system=SYSTEM)
    assert ids[0] == tokenizer.bos_token_id == 2
    assert ids.count(2) == 1


def test_chatml_prompt_starts_with_im_start(load):
    # SmolLM2 declares <|im_start|> (id 1) as its BOS: the template writes it
    # once per turn and the tokenizer must not add another in front.
    tokenizer = load("smollm2")
    ids = tokenizer.encode_prompt(PROMPT)
    assert ids[0:2] == [1, 9690]
    assert ids.count(1) == 3


def test_qwen_prompt_has_no_bos(load):
    tokenizer = load("qwen2.5")
    assert tokenizer.bos_token_id is None
    assert tokenizer.encode_prompt(PROMPT)[0] == 151644


def test_default_system_prompts(load):
    assert "named SmolLM" in load("smollm2").format_prompt(PROMPT)
    assert "You are Qwen" in load("qwen2.5").format_prompt(PROMPT)
    assert load("qwen3").format_prompt(PROMPT) == (
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_kwargs_reach_the_template(load):
    text = load("qwen3").format_prompt(
        PROMPT, chat_template_kwargs={"enable_thinking": False}
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_smollm2_template_comes_from_jinja_file(load, shared_tokenizer_dir):
    folder = shared_tokenizer_dir("smollm2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    template = (folder / "chat_template.jinja").read_text()
    assert load("smollm2").hf.chat_template == template


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mistral", [1, 22557, 1526]),
        ("stories260K", [1, 403, 407, 261, 378]),
        ("gpt2", [15496, 995]),
    ],
)
def test_plain_encoding_without_template(load, name, expected):
    tokenizer = load(name)
    assert not tokenizer.has_chat_template
    prompt = "Once upon a time" if name == "stories260K" else "Hello world"
    assert tokenizer.encode_prompt(prompt) == expected


def test_use_chat_template_false_encodes_plainly(load):
    tokenizer = load("llama3.2")
    ids = tokenizer.encode_prompt("Hello", use_chat_template=False)
    assert ids == [128000, 9906]


def test_system_without_template_is_prepended(load):
    tokenizer = load("mistral")
    assert tokenizer.format_prompt("Hi", system="Be brief.") == "Be brief.\n\nHi"
    ids = tokenizer.encode_prompt("Hi", system="Be brief.")
    assert ids[0] == 1 and ids.count(1) == 1


def test_system_folded_when_template_raises(shared_tokenizer_dir, tmp_path):
    folder = copy_with_config(
        shared_tokenizer_dir("mistral"), tmp_path / "m", chat_template=RAISING_TEMPLATE
    )
    tokenizer = load_tokenizer(folder)
    text = tokenizer.format_prompt("Hi", system="Be brief.")
    assert text == "<s>[INST] Be brief.\n\nHi [/INST]"

    ids = tokenizer.encode_prompt("Hi", system="Be brief.")
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_system_folded_when_template_drops_it(shared_tokenizer_dir, tmp_path):
    folder = copy_with_config(
        shared_tokenizer_dir("mistral"), tmp_path / "m", chat_template=DROPPING_TEMPLATE
    )
    tokenizer = load_tokenizer(folder)
    text = tokenizer.format_prompt("Hi", system="Be brief.")
    assert text == "USER: Be brief.\n\nHi\nASSISTANT:"
    # The template writes no BOS, so the tokenizer adds its own, once.
    ids = tokenizer.encode_prompt("Hi", system="Be brief.")
    assert ids[0] == 1 and ids.count(1) == 1


# EOS ids and basic properties


def test_eos_ids_smollm2(load):
    assert 2 in load("smollm2").eos_token_ids
    assert load("smollm2").hf.convert_ids_to_tokens(2) == "<|im_end|>"


def test_eos_ids_llama3_from_tokenizer_config(load):
    # tokenizer_config.json declares <|eot_id|> as eos_token.
    assert load("llama3.2").eos_token_ids == {128009}


def test_eos_ids_union_of_configs(shared_tokenizer_dir, tmp_path):
    folder = shutil.copytree(shared_tokenizer_dir("stories260K"), tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    tokenizer = load_tokenizer(folder, eos_token_ids={11})
    assert tokenizer.eos_token_ids == {2, 5, 7, 9, 11}


def test_eos_ids_from_nested_text_config(shared_tokenizer_dir, tmp_path):
    folder = shutil.copytree(shared_tokenizer_dir("stories260K"), tmp_path / "m")
    config = {"eos_token_id": None, "text_config": {"eos_token_id": [1, 106]}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink()
    assert load_tokenizer(folder).eos_token_ids == {1, 2, 106}


def test_stories260k_properties(load):
    tokenizer = load("stories260K")
    assert tokenizer.vocab_size == 512
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == {2}
    assert not tokenizer.has_chat_template
    ids = tokenizer.encode("Once upon a time")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Once upon a time"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_bad_config_json(shared_tokenizer_dir, tmp_path):
    folder = shutil.copytree(shared_tokenizer_dir("stories260K"), tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_tokenizer(folder)


# Stop strings


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Scan character by character for the first stop string to complete.

    At the same end position the longest stop string wins.
    """
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def safe_prefix(text: str, stops: list[str]) -> str:
    """The text minus its longest tail that starts some stop string."""
    for keep in range(len(text), 0, -1):
        if any(s.startswith(text[-keep:]) for s in stops):
            return text[:-keep]
    return text


def splits(text: str):
    """Every way to cut text into non-empty consecutive pieces."""
    for cuts in itertools.product([False, True], repeat=len(text) - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                pieces.append(text[start:i])
                start = i
        yield [*pieces, text[start:]]


@pytest.mark.parametrize(
    "text, stops",
    [
        ("xabcy", ["abc"]),
        ("xababcz", ["abc"]),
        ("aaab", ["aab"]),
        ("xabcz", ["ab", "abc"]),
        ("xabz", ["abc", "ab"]),
        ("xabcz", ["abc", "b"]),
        ("xab", ["ab", "b"]),
        ("qwe<|e", ["<|end|>"]),
        ("hi\n\nUser:x", ["\nUser:", "\n\n"]),
        ("no stop here", ["zz", "ez"]),
        ("日本語です。", ["語で", "。"]),
        ("héé🦙!🦙", ["🦙!", "é🦙?"]),
    ],
)
def test_stop_matcher_every_split(text, stops):
    expected_text, expected_stop = reference_cut(text, stops)
    for pieces in splits(text):
        matcher = StopMatcher(stops)
        shown, fed, stopped = "", "", False
        for piece in pieces:
            out, stopped = matcher.feed(piece)
            shown += out
            fed += piece
            if stopped:
                break
            # Holds back exactly the tail that could still start a stop.
            assert shown == safe_prefix(fed, stops), pieces
        shown += matcher.flush()

        assert (shown, stopped) == (expected_text, expected_stop), pieces
        assert matcher.stopped is expected_stop


def test_stop_matcher_after_stop():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcEN") == ("abc", False)
    assert matcher.feed("Dtail") == ("", True)
    assert matcher.matched == "END"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_matcher_flushes_unfinished_prefix():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("answer <|en") == ("answer ", False)
    assert matcher.flush() == "<|en"
    assert matcher.matched is None


def test_stop_matcher_without_stops_passes_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_stop_matcher_rejects_empty_stop():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])


def test_stop_string_across_real_tokens(load):
    # "\nUser:" spans several llama3.2 tokens; none of it may be shown.
    tokenizer = load("llama3.2")
    ids = tokenizer.encode("Sure, 日本.\nUser: next", add_special_tokens=False)
    detokenizer = tokenizer.new_detokenizer()
    matcher = StopMatcher(["\nUser:"])
    shown = []
    for token in ids:
        out, stopped = matcher.feed(detokenizer.add_token(token))
        shown.append(out)
        if stopped:
            break
    assert stopped
    assert "".join(shown) == "Sure, 日本."
    assert not any("\n" in piece for piece in shown)
