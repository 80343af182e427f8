"""Fine-tuning data: JSON Lines records, validation, tokenization and batches.

A data folder holds ``train.jsonl`` and ``valid.jsonl`` (``test.jsonl`` is
optional). Each line is one record in one of three formats, the same in every
file of the folder:

- ``{"text": ...}``: plain text. The loss covers every token.
- ``{"prompt": ..., "completion": ...}``: with a chat template, rendered as a
  user turn and an assistant turn; without one, the two strings are joined.
- ``{"messages": [...], "tools": [...]}``: a conversation (``tools``
  optional), rendered with the tokenizer's chat template.

This module owns the path from those files to training batches:

- :func:`load_dataset` checks every line of every file before tokenizing
  anything, then tokenizes, truncates and drops examples, returning one
  :class:`Dataset` of :class:`Example` per split.
- :func:`summarize` turns the datasets into a :class:`DataReport` (counts,
  warnings, one rendered example) for the CLI to print.
- :func:`batch_order` fixes the batches of an epoch from a seed, so a
  checkpoint can resume on the same data order; :func:`iterate_batches` and
  :func:`loop_batches` turn that order into padded arrays with a loss mask.

With ``mask_prompt`` the loss covers only what the model should learn to
write: the completion of a prompt/completion record, or every assistant turn
of a conversation (its content and end-of-turn token). Assistant turns are
located by rendering each conversation prefix with a generation prompt and
matching it against the full rendering, so any template that renders a
conversation's history the same way as its prefixes works.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_WORDS = {"train": "training", "valid": "validation", "test": "test"}

# The keys each record format allows; "tools" only makes sense with messages.
_KIND_KEYS = {
    "text": ("text",),
    "completions": ("prompt", "completion"),
    "chat": ("messages", "tools"),
}
_ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_TOOL_CALL_KEYS = ("id", "type", "function")

# Length grouping sorts examples by length within pools of this many batches:
# batches hold similar lengths, yet their make-up still changes every epoch.
POOL_BATCHES = 64


@dataclass
class Example:
    """One tokenized training example.

    The loss for token ``i`` (predicted from the tokens before it) applies
    when :meth:`targets` is true at ``i``. Token 0 is never predicted.

    Attributes:
        tokens: The token ids, BOS and end-of-sequence included.
        target_start: With ``mask_prompt``, the first target token (the loss
            applies to ``tokens[target_start:]`` unless ``mask`` is set);
            0 otherwise.
        mask: A per-token target mask, for conversations with
            ``mask_prompt``, where every assistant turn is a target; it takes
            precedence over ``target_start``. None when the targets are
            ``tokens[target_start:]``.
        line: The line of the record in its file (1-based); 0 if unknown.
    """

    tokens: list[int]
    target_start: int = 0
    mask: list[bool] | None = None
    line: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def targets(self) -> list[bool]:
        """Whether each token is a loss target."""
        if self.mask is not None:
            return list(self.mask)
        return [i >= self.target_start for i in range(len(self.tokens))]

    @property
    def num_targets(self) -> int:
        """How many tokens the loss covers (token 0 is never predicted)."""
        return sum(self.targets()[1:])


class Dataset(Sequence[Example]):
    """The tokenized examples of one split, in file order.

    Args:
        examples: The examples.
        name: The split name (``train``, ``valid`` or ``test``).
        path: The file the examples came from.
        kind: The record format: ``text``, ``completions`` or ``chat``.
        records: How many records the file held, dropped ones included.
        truncated: How many kept examples were cut to ``max_seq_length``.
        dropped_lines: File lines of the records dropped for having no
            target tokens left.
        max_seq_length: The length examples were cut to.
        pad_id: The id that pads batches.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        name: str = "train",
        path: Path | None = None,
        kind: str = "text",
        records: int | None = None,
        truncated: int = 0,
        dropped_lines: Sequence[int] = (),
        max_seq_length: int = 2048,
        pad_id: int = 0,
    ) -> None:
        self.examples = list(examples)
        self.name = name
        self.path = path
        self.kind = kind
        self.records = len(self.examples) if records is None else records
        self.truncated = truncated
        self.dropped_lines = list(dropped_lines)
        self.max_seq_length = max_seq_length
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        return self.examples[index]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, kind={self.kind!r}, "
            f"examples={len(self)}, path={str(self.path)!r})"
        )

    @property
    def lengths(self) -> list[int]:
        """The token count of each example."""
        return [len(e) for e in self.examples]

    @property
    def dropped(self) -> int:
        """How many records were dropped for having no target tokens."""
        return len(self.dropped_lines)


@dataclass(frozen=True)
class Record:
    """One checked line of a data file.

    Attributes:
        line: The line number (1-based).
        kind: ``text``, ``completions`` or ``chat``.
        data: The JSON object, with tool-call arguments given as JSON strings
            parsed into objects (what chat templates expect).
    """

    line: int
    kind: str
    data: dict[str, Any]


@dataclass
class SplitSummary:
    """Counts for one split; see :func:`summarize`."""

    name: str
    path: str
    kind: str
    records: int
    examples: int
    truncated: int
    dropped: int
    first_dropped: str | None
    tokens: int
    target_tokens: int
    max_length: int


@dataclass
class DataReport:
    """What the CLI shows about the data before training.

    Attributes:
        splits: Counts per split name.
        warnings: One line per problem worth telling the user about.
        example: The first training example as the model sees it, decoded
            with its special tokens visible.
        example_targets: The parts of that example the loss covers, one
            string per contiguous run of target tokens.
    """

    splits: dict[str, SplitSummary]
    warnings: list[str] = field(default_factory=list)
    example: str = ""
    example_targets: list[str] = field(default_factory=list)


class Batch(NamedTuple):
    """A padded batch.

    Attributes:
        tokens: ``(B, L)`` int32 ids, padded on the right with the pad id.
        loss_mask: ``(B, L - 1)`` bool, true where ``tokens[:, 1:]`` is a
            target: not padding and not a masked prompt token.
        lengths: ``(B,)`` int32 unpadded lengths.
        indices: The dataset indices of the rows.
    """

    tokens: mx.array
    loss_mask: mx.array
    lengths: mx.array
    indices: list[int]


class _RecordError(ValueError):
    """A record is malformed; the caller adds the file and line."""


# ---------------------------------------------------------------------------
# Reading and checking records


def read_jsonl(path: Path) -> list[Record]:
    """Read and check every line of a JSON Lines data file.

    Blank lines are skipped. All records must share one format.

    Args:
        path: The file.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: At the first bad line, naming ``file:line`` and what is
            wrong; or if the file holds no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")

    records: list[Record] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = _parse_line(raw, number)
            except _RecordError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            if record is None:
                continue
            if records and record.kind != records[0].kind:
                raise ValueError(
                    f"{path}:{number}: a {record.kind} record, but line "
                    f"{records[0].line} is a {records[0].kind} record; use one "
                    "format per data folder"
                )
            records.append(record)

    if not records:
        raise ValueError(f"data file {path} is empty; it needs one record per line")
    return records


def _parse_line(raw: bytes, number: int) -> Record | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _RecordError(
            f"not valid UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    # Editors on Windows may start a file with a byte-order mark.
    text = text.removeprefix("\ufeff") if number == 1 else text
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _RecordError(
            f"not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    kind, data = check_record(obj)
    return Record(number, kind, data)


def check_record(obj: Any) -> tuple[str, dict[str, Any]]:
    """Check one record and tell its format.

    Args:
        obj: The parsed JSON value of one line.

    Returns:
        ``(kind, data)``: the format (``text``, ``completions`` or ``chat``)
        and the record, with tool-call arguments written as JSON strings
        parsed into objects.

    Raises:
        ValueError: If the record is malformed; the message says what is
            wrong, on one line.
    """
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {_json_type(obj)}")

    if "messages" in obj:
        kind = "chat"
    elif "text" in obj:
        kind = "text"
    elif "prompt" in obj or "completion" in obj:
        kind = "completions"
    else:
        found = ", ".join(sorted(obj)) or "none"
        raise _RecordError(
            "expected a 'text', 'prompt'/'completion' or 'messages' record "
            f"(found keys: {found})"
        )
    allowed = _KIND_KEYS[kind]
    for key in obj:
        if key not in allowed:
            raise _RecordError(
                f"unknown key {key!r} in a {kind} record "
                f"(allowed: {', '.join(allowed)})"
            )

    if kind == "text":
        _check_text(obj, "text")
        return kind, obj
    if kind == "completions":
        if "prompt" not in obj:
            raise _RecordError("has 'completion' but no 'prompt'")
        if "completion" not in obj:
            raise _RecordError("has 'prompt' but no 'completion'")
        _check_text(obj, "prompt")
        _check_text(obj, "completion")
        return kind, obj
    return kind, _check_chat(obj)


def _check_text(obj: dict[str, Any], key: str) -> None:
    value = obj[key]
    if not isinstance(value, str):
        raise _RecordError(f"{key!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _RecordError(f"{key!r} is empty")


def _check_chat(obj: dict[str, Any]) -> dict[str, Any]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _RecordError(
            f"'messages' must be a non-empty array, got {_json_type(messages)}"
            + (" (empty)" if messages == [] else "")
        )
    checked = [_check_message(m, f"messages[{i}]") for i, m in enumerate(messages)]

    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _RecordError(f"'tools' must be an array, got {_json_type(tools)}")
        for i, tool in enumerate(tools):
            _check_tool(tool, f"tools[{i}]")
    return {"messages": checked, "tools": tools or None}


def _check_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _RecordError(f"{where} must be an object, got {_json_type(message)}")
    for key in message:
        if key not in _MESSAGE_KEYS:
            raise _RecordError(
                f"{where} has unknown key {key!r} (allowed: {', '.join(_MESSAGE_KEYS)})"
            )
    if "role" not in message:
        raise _RecordError(f"{where} has no 'role'")
    role = message["role"]
    if role not in _ROLES:
        raise _RecordError(
            f"{where} has role {role!r}; expected one of {', '.join(_ROLES)}"
        )

    message = dict(message)
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise _RecordError(f"{where} has 'tool_calls' but role {role!r}")
        if not isinstance(tool_calls, list) or not tool_calls:
            raise _RecordError(f"{where}.tool_calls must be a non-empty array")
        message["tool_calls"] = [
            _check_tool_call(call, f"{where}.tool_calls[{i}]")
            for i, call in enumerate(tool_calls)
        ]

    content = message.get("content")
    if content is None:
        if tool_calls is None:
            raise _RecordError(f"{where} ({role}) has no 'content'")
        # OpenAI-style tool calls leave content null; templates want a string.
        message["content"] = ""
    elif not isinstance(content, str):
        raise _RecordError(
            f"{where}.content must be a string, got {_json_type(content)}"
        )
    for key in ("name", "tool_call_id"):
        if key in message and not isinstance(message[key], str):
            raise _RecordError(
                f"{where}.{key} must be a string, got {_json_type(message[key])}"
            )
    return message


def _check_tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise _RecordError(f"{where} must be an object, got {_json_type(call)}")
    for key in call:
        if key not in _TOOL_CALL_KEYS:
            raise _RecordError(
                f"{where} has unknown key {key!r} "
                f"(allowed: {', '.join(_TOOL_CALL_KEYS)})"
            )
    if call.get("type", "function") != "function":
        raise _RecordError(f"{where}.type must be 'function', got {call['type']!r}")
    function = call.get("function")
    if not isinstance(function, dict):
        raise _RecordError(f"{where} needs a 'function' object with a 'name'")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _RecordError(f"{where}.function.name must be a non-empty string")

    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI writes arguments as a JSON string; chat templates serialize
        # them again, so pass them on as an object.
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        raise _RecordError(
            f"{where}.function.arguments must be an object (or a JSON string of one)"
        )
    return {**call, "function": {**function, "arguments": arguments}}


def _check_tool(tool: Any, where: str) -> None:
    if not isinstance(tool, dict):
        raise _RecordError(f"{where} must be an object, got {_json_type(tool)}")
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise _RecordError(
            f"{where} must be {{'type': 'function', 'function': {{...}}}}"
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise _RecordError(f"{where}.function.name must be a non-empty string")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------
# Tokenization


class _Encoder:
    """Turns checked records into examples for one tokenizer.

    Args:
        tokenizer: The model's tokenizer.
        mask_prompt: Compute loss targets for the completion or the
            assistant turns only.
    """

    def __init__(self, tokenizer: Tokenizer, *, mask_prompt: bool) -> None:
        self.tokenizer = tokenizer
        self.mask_prompt = mask_prompt
        self._specials = sorted(
            (t.content for t in tokenizer.hf.added_tokens_decoder.values()),
            key=len,
            reverse=True,
        )
        self._checked_tools = False
        self._checked_tool_calls = False

    def encode(self, record: Record) -> Example:
        """Tokenize one record, without truncation."""
        data = record.data
        if record.kind == "text":
            tokens = self._with_eos(self._encode(data["text"]))
            return Example(tokens, line=record.line)

        if record.kind == "completions":
            if not self.tokenizer.has_chat_template:
                return self._joined(data["prompt"], data["completion"], record.line)
            messages = [
                {"role": "user", "content": data["prompt"]},
                {"role": "assistant", "content": data["completion"]},
            ]
            return self._chat(messages, None, record.line)
        return self._chat(data["messages"], data["tools"], record.line)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=not self._has_bos(text))

    def _has_bos(self, text: str) -> bool:
        # Chat templates usually write BOS themselves; adding it again would
        # start every example with two.
        bos = self.tokenizer.hf.bos_token
        return bool(bos) and text.startswith(bos)

    def _with_eos(self, tokens: list[int]) -> list[int]:
        # mlx-lm appends EOS to text examples too, so the model learns to stop.
        eos = self.tokenizer.hf.eos_token_id
        stops = self.tokenizer.eos_token_ids
        if eos is not None and (not tokens or tokens[-1] not in stops):
            tokens = [*tokens, eos]
        return tokens

    def _joined(self, prompt: str, completion: str, line: int) -> Example:
        tokens, (start,) = self._encode_at(prompt + completion, [len(prompt)])
        start = start if self.mask_prompt else 0
        return Example(self._with_eos(tokens), target_start=start, line=line)

    def _chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        line: int,
    ) -> Example:
        self._check_tool_support(messages, tools)
        text = self.render(messages, tools)
        if not self.mask_prompt:
            return Example(self._encode(text), line=line)

        spans = self._assistant_spans(messages, tools, text)
        tokens, bounds = self._encode_at(text, [p for span in spans for p in span])
        mask = [False] * len(tokens)
        for first, stop in zip(bounds[::2], bounds[1::2], strict=True):
            mask[first:stop] = [True] * (stop - first)
        first_target = mask.index(True) if True in mask else len(tokens)
        return Example(tokens, target_start=first_target, mask=mask, line=line)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        add_generation_prompt: bool = False,
    ) -> str:
        """Render messages with the chat template, as one string."""
        try:
            return self.tokenizer.hf.apply_chat_template(
                messages,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as err:  # jinja raises many kinds; all mean the same
            # Keep the message on one line: jinja messages may span several.
            reason = " ".join(str(err).split())
            raise _RecordError(
                f"the chat template failed on this record: {reason}"
            ) from err

    def _assistant_spans(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        text: str,
    ) -> list[tuple[int, int]]:
        """Character spans of each assistant turn's content and end token.

        A turn starts where the rendering of the messages before it, with a
        generation prompt, ends. It ends at its end-of-turn token: the
        rendering of the conversation up to and including it, stripped of
        trailing whitespace. Templates that render the last turn differently
        from a turn in the history (Qwen3 adds an empty think block) are
        matched on the end-of-turn token instead.
        """
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], tools, add_generation_prompt=True)
            if not text.startswith(prompt) or (spans and len(prompt) < spans[-1][1]):
                raise _RecordError(
                    f"cannot locate assistant turn messages[{i}]: the chat template "
                    "renders the conversation before it differently from the "
                    "whole conversation; train without mask_prompt"
                )
            whole = (
                text
                if i == len(messages) - 1
                else self.render(messages[: i + 1], tools)
            )
            turn = whole[len(prompt) :].rstrip() if whole.startswith(prompt) else ""
            start = len(prompt)
            if turn and text.startswith(turn, start):
                spans.append((start, start + len(turn)))
                continue
            marker = next((s for s in self._specials if turn.endswith(s)), None)
            end = text.find(marker, start) if marker else -1
            if end < 0:
                raise _RecordError(
                    f"cannot find the end of assistant turn messages[{i}] in the "
                    "rendered conversation; train without mask_prompt"
                )
            spans.append((start, end + len(marker)))
        return spans

    def _encode_at(
        self, text: str, positions: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """Tokenize ``text`` and find the token index of each character position.

        A position's index is that of the first token ending after it, so a
        token straddling a position counts as after it.
        """
        hf = self.tokenizer.hf
        add_special = not self._has_bos(text)
        try:
            encoded = hf(
                text, add_special_tokens=add_special, return_offsets_mapping=True
            )
            offsets = encoded["offset_mapping"]
        except (NotImplementedError, KeyError):
            # Only fast tokenizers report offsets. Otherwise a position's index
            # is how many tokens its prefix shares with the whole text.
            tokens = hf.encode(text, add_special_tokens=add_special)
            return tokens, [
                _common_prefix(
                    hf.encode(text[:p], add_special_tokens=add_special), tokens
                )
                for p in positions
            ]
        ends = [end for _, end in offsets]
        return list(encoded["input_ids"]), [_token_index(ends, p) for p in positions]

    def _check_tool_support(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> None:
        """Refuse a template that silently drops tools or tool calls.

        Checked once per dataset, on the first record that has them: the
        rendering must change when they are removed.
        """
        if tools and not self._checked_tools:
            if self.render(messages, tools) == self.render(messages, None):
                raise _RecordError(
                    "the tokenizer's chat template ignores 'tools' (the rendered "
                    "text is the same without them); use a model whose template "
                    "supports tools"
                )
            self._checked_tools = True
        has_calls = any(m.get("tool_calls") for m in messages)
        if has_calls and not self._checked_tool_calls:
            bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
            if self.render(messages, tools) == self.render(bare, tools):
                raise _RecordError(
                    "the tokenizer's chat template ignores assistant 'tool_calls' "
                    "(the rendered text is the same without them); use a model "
                    "whose template supports tool calls"
                )
            self._checked_tool_calls = True


def _token_index(ends: Sequence[int], position: int) -> int:
    """The first token that ends after character ``position``.

    Tokens added by the tokenizer (BOS) report an empty span at 0, so they
    always fall before; a token straddling ``position`` falls after.
    """
    return next((i for i, end in enumerate(ends) if end > position), len(ends))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def render_example(record: Mapping[str, Any], tokenizer: Tokenizer) -> str:
    """The text the model trains on for one record, special tokens visible.

    Args:
        record: One record as it would appear on a line of a data file.
        tokenizer: The model's tokenizer.

    Returns:
        The decoded tokens of the example (BOS, chat markup and EOS
        included), before any truncation.

    Raises:
        ValueError: If the record is malformed or cannot be rendered.
    """
    try:
        kind, data = check_record(dict(record))
        _check_kind(kind, tokenizer, mask_prompt=False, where="record")
        example = _Encoder(tokenizer, mask_prompt=False).encode(Record(0, kind, data))
    except _RecordError as err:
        raise ValueError(f"record: {err}") from None
    return tokenizer.decode(example.tokens)


def _check_kind(
    kind: str, tokenizer: Tokenizer, *, mask_prompt: bool, where: str
) -> None:
    if kind == "chat" and not tokenizer.has_chat_template:
        raise ValueError(
            f"{where} holds chat records but the tokenizer has no chat template; "
            "use a chat model or write the data as text"
        )
    if kind == "text" and mask_prompt:
        raise ValueError(
            f"{where} holds text records, which have no prompt to mask; use "
            "prompt/completion or messages records, or turn mask_prompt off"
        )


# ---------------------------------------------------------------------------
# Loading


def load_dataset(
    folder: str | Path,
    tokenizer: Tokenizer,
    *,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
    splits: Collection[str] = SPLITS,
    optional: Collection[str] = ("test",),
    batch_size: int | None = None,
) -> dict[str, Dataset]:
    """Load, check and tokenize the splits of a data folder.

    Every line of every file is checked before anything is tokenized, so a
    bad line fails at once, naming ``file:line``. Examples longer than
    ``max_seq_length`` keep their start; examples with no target token left
    are dropped. Both are counted on the returned datasets (see
    :func:`summarize`).

    Args:
        folder: The data folder, holding ``<split>.jsonl`` files.
        tokenizer: The model's tokenizer.
        max_seq_length: The most tokens an example keeps.
        mask_prompt: Train only on completions and assistant turns.
        splits: The splits to load. Leave out ``valid`` to train without
            validation.
        optional: Splits in ``splits`` that may be missing; a missing one is
            left out of the result.
        batch_size: If given, the training and validation sets must hold at
            least one batch (checked here, before any training starts).

    Returns:
        The datasets by split name.

    Raises:
        FileNotFoundError: If the folder or a required split file is missing.
        ValueError: For a bad line, an empty file, records of mixed formats,
            chat records without a chat template, text records with
            ``mask_prompt``, a training set left empty after dropping, or a
            split smaller than ``batch_size``.
    """
    folder = Path(folder)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; expected one of {SPLITS}")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")

    paths = _split_paths(folder, [s for s in SPLITS if s in splits], optional)
    # Check every file completely before spending time on tokenization.
    records = {name: read_jsonl(path) for name, path in paths.items()}
    kind = _common_kind(records, paths)
    first = next(iter(paths.values()))
    _check_kind(kind, tokenizer, mask_prompt=mask_prompt, where=str(first))

    pad_id = _pad_id(tokenizer)
    datasets = {}
    for name, path in paths.items():
        encoder = _Encoder(tokenizer, mask_prompt=mask_prompt)
        datasets[name] = _build(
            name, path, records[name], encoder, max_seq_length, pad_id
        )

    train = datasets.get("train")
    if train is not None and len(train) == 0:
        raise ValueError(
            f"{train.path}: none of its {train.records} examples has a target "
            f"token within max_seq_length={max_seq_length}; raise max_seq_length"
        )
    if batch_size is not None:
        for name in ("train", "valid"):
            if name in datasets:
                _check_batch_size(datasets[name], batch_size)
    return datasets


def _split_paths(
    folder: Path, splits: Sequence[str], optional: Collection[str]
) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder {folder} does not exist; it should hold train.jsonl "
            "and valid.jsonl (test.jsonl optional)"
        )
    paths = {}
    for name in splits:
        path = folder / f"{name}.jsonl"
        if path.is_file():
            paths[name] = path
        elif name not in optional:
            hint = " (or turn validation off)" if name == "valid" else ""
            raise FileNotFoundError(
                f"{folder} has no {name}.jsonl{hint}; a data folder holds "
                "train.jsonl and valid.jsonl (test.jsonl optional), one JSON "
                "record per line"
            )
    if not paths:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(splits)}.jsonl")
    return paths


def _common_kind(records: dict[str, list[Record]], paths: dict[str, Path]) -> str:
    names = list(records)
    kind = records[names[0]][0].kind
    for name in names[1:]:
        if records[name][0].kind != kind:
            raise ValueError(
                f"{paths[name]} holds {records[name][0].kind} records but "
                f"{paths[names[0]]} holds {kind} records; use one format per "
                "data folder"
            )
    return kind


def _pad_id(tokenizer: Tokenizer) -> int:
    hf = tokenizer.hf
    for candidate in (hf.pad_token_id, hf.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _build(
    name: str,
    path: Path,
    records: list[Record],
    encoder: _Encoder,
    max_seq_length: int,
    pad_id: int,
) -> Dataset:
    examples, dropped, truncated = [], [], 0
    for record in records:
        try:
            example = encoder.encode(record)
        except _RecordError as err:
            raise ValueError(f"{path}:{record.line}: {err}") from None

        cut = len(example) > max_seq_length
        if cut:
            example = Example(
                example.tokens[:max_seq_length],
                target_start=example.target_start,
                mask=None if example.mask is None else example.mask[:max_seq_length],
                line=example.line,
            )
        if example.num_targets == 0:
            dropped.append(record.line)
            continue
        truncated += cut
        examples.append(example)

    dataset = Dataset(
        examples,
        name=name,
        path=path,
        kind=records[0].kind,
        records=len(records),
        truncated=truncated,
        dropped_lines=dropped,
        max_seq_length=max_seq_length,
        pad_id=pad_id,
    )
    logger.info(
        "%s: %d examples (%d truncated, %d dropped)",
        path,
        len(examples),
        truncated,
        len(dropped),
    )
    return dataset


def summarize(datasets: Mapping[str, Dataset], tokenizer: Tokenizer) -> DataReport:
    """Describe loaded datasets for the user.

    Args:
        datasets: What :func:`load_dataset` returned.
        tokenizer: The tokenizer that made them, to decode the example.

    Returns:
        Counts per split, one warning line per split with truncated or
        dropped examples, and the first training example decoded.
    """
    splits, warnings = {}, []
    for name, data in datasets.items():
        word = _SPLIT_WORDS.get(name, name)
        first_dropped = (
            f"{data.path}:{data.dropped_lines[0]}" if data.dropped_lines else None
        )
        splits[name] = SplitSummary(
            name=name,
            path=str(data.path),
            kind=data.kind,
            records=data.records,
            examples=len(data),
            truncated=data.truncated,
            dropped=data.dropped,
            first_dropped=first_dropped,
            tokens=sum(data.lengths),
            target_tokens=sum(e.num_targets for e in data),
            max_length=max(data.lengths, default=0),
        )
        if data.truncated:
            warnings.append(
                f"{data.truncated} of {data.records} {word} examples were longer "
                f"than max_seq_length={data.max_seq_length} and were truncated"
            )
        if data.dropped:
            warnings.append(
                f"{data.dropped} of {data.records} {word} examples had no target "
                f"tokens within max_seq_length={data.max_seq_length} and were "
                f"dropped (first: {first_dropped})"
            )

    report = DataReport(splits=splits, warnings=warnings)
    shown = datasets.get("train") or next(iter(datasets.values()), None)
    if shown is not None and len(shown):
        example = shown[0]
        report.example = tokenizer.decode(example.tokens)
        report.example_targets = [
            tokenizer.decode(example.tokens[a:b]) for a, b in _runs(example.targets())
        ]
    return report


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of true values after position 0."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and i > 0 and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ---------------------------------------------------------------------------
# Batching


def batch_order(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    length_grouped: bool = True,
    drop_last: bool = True,
) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices.

    The order depends only on the arguments, so a checkpoint can store
    ``(seed, epoch, position)`` (or the order itself) and a resumed run sees
    the same remaining batches. Examples are shuffled; with length grouping
    they are then sorted by length within pools of :data:`POOL_BATCHES`
    batches and cut into batches, so a batch holds similar lengths and wastes
    little padding. The batch order is shuffled last.

    Args:
        dataset: The examples.
        batch_size: Examples per batch.
        seed: The shuffling seed.
        epoch: The epoch number; each epoch gets its own shuffle.
        length_grouped: Group examples of similar length.
        drop_last: Leave out the examples that do not fill a last batch (a
            different few each epoch); otherwise the last batch is short.

    Returns:
        One list of indices per batch, in the order to train on them.

    Raises:
        ValueError: If ``batch_size`` is not positive or the dataset holds
            fewer than ``batch_size`` examples.
    """
    _check_batch_size(dataset, batch_size)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = np.random.default_rng([seed, epoch])
    n = len(dataset)
    usable = n - n % batch_size if drop_last else n
    order = rng.permutation(n)[:usable]

    if length_grouped:
        lengths = np.array(dataset.lengths)
        pool = batch_size * POOL_BATCHES
        # A stable sort keeps the shuffled order among equal lengths.
        order = np.concatenate(
            [
                chunk[np.argsort(lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(pool, usable, pool))
            ]
        )
    batches = [order[i : i + batch_size].tolist() for i in range(0, usable, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _check_batch_size(dataset: Dataset, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(dataset) < batch_size:
        word = _SPLIT_WORDS.get(dataset.name, dataset.name)
        where = f" ({dataset.path})" if dataset.path else ""
        raise ValueError(
            f"the {word} set{where} has {len(dataset)} examples, fewer than "
            f"one batch of batch_size={batch_size}; add examples or lower the "
            "batch size"
        )


def make_batch(
    dataset: Dataset, indices: Sequence[int], *, pad_multiple: int = 8
) -> Batch:
    """Pad some examples into one batch.

    Args:
        dataset: The examples.
        indices: Which examples, in row order.
        pad_multiple: Round the model's input length (``L - 1``) up to a
            multiple of this, so fewer distinct shapes reach the model; it
            never grows past the dataset's ``max_seq_length``.

    Returns:
        The batch.
    """
    examples = [dataset[i] for i in indices]
    lengths = [len(e) for e in examples]
    longest = max(lengths)
    width = 1 + -(-(longest - 1) // pad_multiple) * pad_multiple
    width = max(longest, min(width, dataset.max_seq_length))

    tokens = np.full((len(examples), width), dataset.pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(examples), width - 1), dtype=bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example)] = example.tokens
        # Row j of the mask scores the prediction of token j + 1.
        loss_mask[row, : len(example) - 1] = example.targets()[1:]
    return Batch(
        mx.array(tokens),
        mx.array(loss_mask),
        mx.array(np.array(lengths, dtype=np.int32)),
        list(indices),
    )


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    start: int = 0,
    order: Sequence[Sequence[int]] | None = None,
    length_grouped: bool = True,
    drop_last: bool = True,
    pad_multiple: int = 8,
) -> Iterator[Batch]:
    """The batches of one epoch, from position ``start`` on.

    Args:
        dataset: The examples.
        batch_size: Examples per batch.
        seed: The shuffling seed.
        epoch: The epoch number.
        start: How many batches of the epoch to skip (already trained).
        order: A stored :func:`batch_order` to follow instead of computing it.
        length_grouped: Group examples of similar length.
        drop_last: See :func:`batch_order`.
        pad_multiple: See :func:`make_batch`.

    Yields:
        The batches.

    Raises:
        ValueError: As :func:`batch_order`, or if ``start`` is outside the
            epoch or ``order`` names an example the dataset lacks.
    """
    if order is None:
        order = batch_order(
            dataset,
            batch_size,
            seed=seed,
            epoch=epoch,
            length_grouped=length_grouped,
            drop_last=drop_last,
        )
    elif any(not 0 <= i < len(dataset) for batch in order for i in batch):
        raise ValueError(
            f"the stored batch order names examples outside the {dataset.name} "
            f"set of {len(dataset)}; was it made for another dataset?"
        )
    if not 0 <= start <= len(order):
        raise ValueError(f"start must be in [0, {len(order)}], got {start}")
    for indices in order[start:]:
        yield make_batch(dataset, indices, pad_multiple=pad_multiple)


def loop_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    step: int = 0,
    length_grouped: bool = True,
    pad_multiple: int = 8,
) -> Iterator[Batch]:
    """Batches epoch after epoch, endlessly, starting at a global step.

    Step ``s`` is batch ``s % n`` of epoch ``s // n``, where ``n`` is the
    number of batches per epoch; resuming at the step a checkpoint stored
    yields exactly the batches the interrupted run would have seen.

    Args:
        dataset: The examples.
        batch_size: Examples per batch.
        seed: The shuffling seed.
        step: The first global step to yield.
        length_grouped: Group examples of similar length.
        pad_multiple: See :func:`make_batch`.

    Yields:
        The batches.

    Raises:
        ValueError: As :func:`batch_order`, or for a negative ``step``.
    """
    _check_batch_size(dataset, batch_size)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, start = divmod(step, len(dataset) // batch_size)
    while True:
        yield from iterate_batches(
            dataset,
            batch_size,
            seed=seed,
            epoch=epoch,
            start=start,
            length_grouped=length_grouped,
            pad_multiple=pad_multiple,
        )
        epoch, start = epoch + 1, 0
