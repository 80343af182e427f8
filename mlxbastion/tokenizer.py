"""Tokenizers: loading, prompt encoding, streaming decoding and stop strings.

This module owns everything between text and token ids for generation:

- :func:`load_tokenizer` wraps a Hugging Face tokenizer in :class:`Tokenizer`
  and collects every end-of-sequence id the model folder declares.
- :meth:`Tokenizer.encode_prompt` renders the chat template (folding a system
  prompt into the user turn when the template refuses a system role) and
  encodes the result with the BOS token exactly once.
- :class:`StreamingDetokenizer` turns ids into text one token at a time. The
  text it streams concatenates to ``Tokenizer.decode`` of the same ids, and it
  never emits half of a multi-byte character.
- :class:`StopMatcher` cuts a text stream at the first stop string, holding
  back any tail that might be the start of one.

The streaming decoder is chosen from the tokenizer's decoder pipeline, as
mlx-lm does: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece
with byte fallback (Llama 2, Mistral, Gemma) are decoded byte-exactly in
linear time; anything else falls back to re-decoding a short window of ids.
"""

from __future__ import annotations

import abc
import codecs
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# SentencePiece's word-boundary marker, U+2581 LOWER ONE EIGHTH BLOCK.
SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ChatTemplateError(ValueError):
    """The model's chat template has a syntax error or raised while rendering."""


class StreamingDetokenizer(abc.ABC):
    """Incremental decoder from token ids to text.

    Feed ids with :meth:`add_token`, which returns the text that became
    printable, and call :meth:`finalize` once at the end for whatever was held
    back. Text is held back while it ends in an incomplete UTF-8 sequence, so
    a replacement character never appears just because a character's bytes
    are split across tokens. The concatenation of everything returned equals
    ``Tokenizer.decode(tokens)``.

    Attributes:
        tokens: Every id added since the last reset.
    """

    tokens: list[int]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all ids and text, ready for a new sequence."""
        self.tokens = []
        self._parts: list[str] = []
        self._offset = 0

    @abc.abstractmethod
    def add_token(self, token: int) -> str:
        """Add one id.

        Args:
            token: The next token id.

        Returns:
            The text that became printable; may be empty.
        """

    @abc.abstractmethod
    def finalize(self) -> str:
        """Flush the text held back at the end of the sequence.

        Returns:
            The remaining text; may be empty.
        """

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._parts)

    @property
    def last_segment(self) -> str:
        """The text returned since the previous read of this property."""
        text = self.text
        segment = text[self._offset :]
        self._offset = len(text)
        return segment

    def _emit(self, piece: str) -> str:
        if piece:
            self._parts.append(piece)
        return piece


class ByteStreamDetokenizer(StreamingDetokenizer):
    """Streams text from a fixed table of raw bytes per token id.

    This is exact for decoders that map each token to bytes independently and
    then decode the concatenation as UTF-8: byte-level BPE, and SentencePiece
    with byte fallback.

    Args:
        token_bytes: The bytes of each token id. Ids past the end decode to
            nothing, as Hugging Face tokenizers skip unknown ids.
        strip_leading_space: Drop one space from the start of the text, as
            SentencePiece decoders with a ``Strip`` step do.
    """

    def __init__(
        self, token_bytes: Sequence[bytes], *, strip_leading_space: bool = False
    ) -> None:
        self._token_bytes = token_bytes
        self._strip_leading_space = strip_leading_space
        super().__init__()

    def reset(self) -> None:
        """Forget all ids and text, ready for a new sequence."""
        super().reset()
        # The incremental decoder keeps an incomplete UTF-8 tail until the
        # bytes that finish it arrive.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = self._strip_leading_space

    def add_token(self, token: int) -> str:
        """Add one id and return the text that became printable."""
        self.tokens.append(token)
        data = self._token_bytes[token] if 0 <= token < len(self._token_bytes) else b""
        return self._emit_stripped(self._utf8.decode(data))

    def finalize(self) -> str:
        """Flush an incomplete UTF-8 tail as replacement characters."""
        return self._emit_stripped(self._utf8.decode(b"", final=True))

    def _emit_stripped(self, piece: str) -> str:
        if self._strip_pending and piece:
            self._strip_pending = False
            if piece.startswith(" "):
                piece = piece[1:]
        return self._emit(piece)


class WindowDetokenizer(StreamingDetokenizer):
    """Streams text by re-decoding a short window of recent ids.

    Works with any tokenizer: each new id is decoded together with the ids
    since the last emitted boundary, and the text added relative to the
    window without it is emitted. Costs two small decodes per id.

    Args:
        decode: Decodes a list of ids to text, as ``Tokenizer.decode`` does.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        super().__init__()

    def reset(self) -> None:
        """Forget all ids and text, ready for a new sequence."""
        super().reset()
        # Ids in [_start, _read) are context already emitted; ids from
        # _read on are not emitted yet.
        self._start = 0
        self._read = 0

    def add_token(self, token: int) -> str:
        """Add one id and return the text that became printable."""
        self.tokens.append(token)
        new_text = self._decode(self.tokens[self._start :])
        if new_text.endswith("\ufffd"):
            return ""
        old_text = self._decode(self.tokens[self._start : self._read])
        if not new_text.startswith(old_text):
            # The window does not decode additively yet; wait for more ids.
            return ""

        self._start, self._read = self._read, len(self.tokens)
        return self._emit(new_text[len(old_text) :])

    def finalize(self) -> str:
        """Emit the rest, so the stream adds up to the full decode."""
        full = self._decode(self.tokens)
        done = self.text
        if not full.startswith(done):
            logger.warning("streamed text diverged from the full decode")
            return ""
        self._start = self._read = len(self.tokens)
        return self._emit(full[len(done) :])


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Map each character of the GPT-2 byte-level alphabet to its byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes
    (controls, space, soft hyphen) are shifted to U+0100 onwards in byte
    order, so that every byte has a visible character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    alphabet = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in set(printable)]
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


def byte_level_token_bytes(token: str) -> bytes:
    """The raw bytes of a byte-level BPE token such as ``"Ġhello"``.

    Args:
        token: The token string from the vocabulary.

    Returns:
        Its bytes. Added tokens written as plain text (a character outside the
        byte alphabet, such as a newline) are encoded as UTF-8 whole, as the
        ``ByteLevel`` decoder does.
    """
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def sentencepiece_token_bytes(token: str) -> bytes:
    """The raw bytes of a SentencePiece token such as ``"▁hello"`` or ``"<0xE6>"``.

    Args:
        token: The token string from the vocabulary.

    Returns:
        Its bytes: a byte-fallback token gives its single byte, and any other
        token its UTF-8 text with the word-boundary marker turned into a space.
    """
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(SPM_SPACE, " ").encode("utf-8")


def _decoder_kind(decoder: dict[str, Any] | None) -> tuple[str, bool]:
    """Classify a ``tokenizer.json`` decoder for streaming.

    Returns:
        ``(kind, strip_leading_space)`` with kind ``"byte_level"``,
        ``"sentencepiece"`` or ``"window"`` (anything not recognized).
    """
    if not decoder:
        return "window", False
    if decoder.get("type") == "ByteLevel":
        return "byte_level", False

    # SentencePiece with byte fallback, as converted by transformers:
    # Replace(▁ -> " "), ByteFallback, Fuse, and optionally Strip(" ", 1, 0).
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    if not steps:
        return "window", False
    strip = steps[-1] == {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    core = steps[:-1] if strip else steps
    spm_core = [
        {"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if core == spm_core:
        return "sentencepiece", strip
    return "window", False


def _backend_decoder(hf: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """The decoder section of the fast tokenizer's ``tokenizer.json``, if any."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return None
    # The Python binding exposes the decoder's JSON through its pickle state.
    return json.loads(backend.decoder.__getstate__())


class Tokenizer:
    """A Hugging Face tokenizer with what generation needs on top.

    Args:
        hf: The Hugging Face tokenizer to wrap.
        eos_token_ids: End-of-sequence ids besides the tokenizer's own
            ``eos_token``, which is always included.
    """

    def __init__(
        self, hf: PreTrainedTokenizerBase, *, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self._hf = hf
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if hf.eos_token_id is not None:
            self.eos_token_ids.add(hf.eos_token_id)

        self._detokenizer_kind, self._strip_leading_space = _decoder_kind(
            _backend_decoder(hf)
        )
        # Built on first use: listing a 260K-token vocabulary takes ~0.3 s.
        self._token_bytes: list[bytes] | None = None
        logger.debug("streaming detokenizer: %s", self._detokenizer_kind)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The wrapped Hugging Face tokenizer."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None if the tokenizer has none."""
        return self._hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template."""
        return self._hf.chat_template is not None

    @property
    def detokenizer_kind(self) -> str:
        """How streaming decodes: ``byte_level``, ``sentencepiece`` or ``window``."""
        return self._detokenizer_kind

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Encode text to ids.

        Args:
            text: The text to encode.
            add_special_tokens: Let the tokenizer add BOS (or whatever its
                post-processor adds).

        Returns:
            The token ids.
        """
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ids to text, special tokens included unless asked otherwise.

        Args:
            ids: The token ids.
            skip_special_tokens: Leave out special tokens such as BOS and EOS.

        Returns:
            The text. No clean-up of spaces before punctuation is applied, so
            the result matches what :meth:`new_detokenizer` streams.
        """
        return self._hf.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def new_detokenizer(self) -> StreamingDetokenizer:
        """Return a fresh streaming detokenizer for one sequence.

        Returns:
            A detokenizer whose streamed text adds up to :meth:`decode` of the
            ids fed to it (with special tokens).
        """
        if self._detokenizer_kind == "window":
            return WindowDetokenizer(self.decode)
        return ByteStreamDetokenizer(
            self._get_token_bytes(), strip_leading_space=self._strip_leading_space
        )

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer on every access (mlx-lm's spelling)."""
        return self.new_detokenizer()

    def _get_token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            to_bytes = (
                byte_level_token_bytes
                if self._detokenizer_kind == "byte_level"
                else sentencepiece_token_bytes
            )
            tokens = self._hf.convert_ids_to_tokens(list(range(len(self._hf))))
            self._token_bytes = [b"" if t is None else to_bytes(t) for t in tokens]
        return self._token_bytes

    def format_prompt(
        self,
        prompt: str,
        *,
        system: str | None = None,
        use_chat_template: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Render a prompt as the model should see it, before tokenization.

        With a chat template (and ``use_chat_template``), the messages are the
        optional system prompt and the user prompt, followed by the generation
        prompt. When the template raises on the system role, or renders
        without the system text, the system prompt is folded into the user
        message instead. Without a template, a system prompt is put before
        the prompt, separated by a blank line.

        Args:
            prompt: The user's prompt.
            system: An optional system prompt.
            use_chat_template: Use the chat template when there is one.
            chat_template_kwargs: Extra variables for the template, such as
                ``{"date_string": "26 Jul 2024"}`` for Llama 3 or
                ``{"enable_thinking": False}`` for Qwen 3.

        Returns:
            The rendered prompt text.

        Raises:
            ChatTemplateError: If the chat template does not render (a syntax
                error in it, or an exception it raises).
        """
        if not (use_chat_template and self.has_chat_template):
            return _fold_system(system, prompt)
        try:
            return self._format_chat(prompt, system, chat_template_kwargs)
        except Exception as err:
            # Jinja raises TemplateError subclasses, but a template's own
            # expressions can raise anything (TypeError on `'a' + 1`).
            raise ChatTemplateError(
                f"the model's chat template fails to render ({one_line_reason(err)}); "
                "pass --ignore-chat-template (use_chat_template=False) to prompt "
                "without it, or fix chat_template in tokenizer_config.json"
            ) from err

    def _format_chat(
        self,
        prompt: str,
        system: str | None,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> str:
        user = {"role": "user", "content": prompt}
        kwargs = chat_template_kwargs or {}
        if system is None:
            return self._render([user], kwargs)

        try:
            text = self._render([{"role": "system", "content": system}, user], kwargs)
        except TemplateError as err:
            logger.info("chat template rejects a system prompt (%s); folding it", err)
        else:
            if system.strip() in text:
                return text
            logger.info("chat template drops the system prompt; folding it")
        folded = {"role": "user", "content": _fold_system(system, prompt)}
        return self._render([folded], kwargs)

    def encode_prompt(
        self,
        prompt: str,
        *,
        system: str | None = None,
        use_chat_template: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Render a prompt (see :meth:`format_prompt`) and encode it.

        The BOS token appears once: when the rendered text already starts
        with it (most chat templates write it), it is encoded without special
        tokens; otherwise the tokenizer adds its special tokens as its config
        says.

        Args:
            prompt: The user's prompt.
            system: An optional system prompt.
            use_chat_template: Use the chat template when there is one.
            chat_template_kwargs: Extra variables for the template.

        Returns:
            The prompt's token ids.

        Raises:
            ChatTemplateError: If the chat template does not render.
        """
        text = self.format_prompt(
            prompt,
            system=system,
            use_chat_template=use_chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        bos = self._hf.bos_token
        has_bos = bool(bos) and text.startswith(bos)
        return self.encode(text, add_special_tokens=not has_bos)

    def _render(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> str:
        return self._hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )


def _fold_system(system: str | None, prompt: str) -> str:
    return prompt if system is None else f"{system}\n\n{prompt}"


def parse_eos_token_ids(value: Any, source: str | Path) -> set[int]:
    """The ids of an ``eos_token_id`` entry: an int, a list of ints, or null.

    Args:
        value: The entry's value.
        source: The file it comes from, named in the error.

    Returns:
        The ids; empty for null.

    Raises:
        ValueError: If the value is of any other type (a string, a float...).
    """
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return set(values)
    raise ValueError(
        f"{source}: eos_token_id must be an integer or a list of integers, got "
        f"{value!r}; fix the file"
    )


def declared_eos_ids(model_path: Path) -> set[int]:
    """Collect the EOS ids that a model folder's config files declare.

    ``config.json`` (top level and ``text_config``) and
    ``generation_config.json`` may each hold an int, a list of ints or null.

    Args:
        model_path: The model folder.

    Returns:
        The declared ids.

    Raises:
        ValueError: If a file is not valid JSON, or an entry is of another type.
    """
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_path / name
        if not path.is_file():
            continue
        config = _read_json(path, f"{path}")
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object; fix the file")
        text_config = config.get("text_config")
        sections = [config, text_config if isinstance(text_config, dict) else {}]
        for section in sections:
            ids |= parse_eos_token_ids(section.get("eos_token_id"), path)
    return ids


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{label} is not valid JSON ({err}); fix or re-download it"
        ) from err


# The tokenizer files that are JSON, checked before transformers reads them.
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "vocab.json",
)


def check_tokenizer_json(folder: Path) -> None:
    """Refuse a tokenizer JSON file that does not parse, naming it.

    Args:
        folder: The model folder.

    Raises:
        ValueError: ``"tokenizer.json in FOLDER is not valid JSON (...)"``.
    """
    for name in TOKENIZER_JSON_FILES:
        path = Path(folder) / name
        if path.is_file():
            _read_json(path, f"{name} in {folder}")


def one_line_reason(err: BaseException) -> str:
    """An exception condensed to one informative line, for error messages.

    transformers reports a tokenizer it cannot build in several lines, and a
    KeyError prints only the key; both become one line with the type named.

    Args:
        err: The exception.

    Returns:
        ``"Type: message"`` on one line, at most about 300 characters.
    """
    text = " ".join(str(err).split())
    if text.startswith("Couldn't instantiate the backend tokenizer"):
        return (
            "no usable tokenizer.json, and no slow tokenizer (tokenizer.model) "
            "that could be converted to one"
        )
    if isinstance(err, TemplateSyntaxError):
        return f"{err.message} (line {err.lineno})"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_tokenizer(
    model_path: Path, eos_token_ids: Iterable[int] | None = None
) -> Tokenizer:
    """Load the tokenizer of a local model folder.

    Args:
        model_path: Folder with ``tokenizer.json`` (or a SentencePiece model)
            and ``tokenizer_config.json``; a ``chat_template.jinja`` beside
            them is picked up by transformers.
        eos_token_ids: Extra ids that end generation.

    Returns:
        The tokenizer. Its ``eos_token_ids`` is the union of ``eos_token_ids``,
        the tokenizer's ``eos_token`` and the ``eos_token_id`` entries of
        ``config.json`` and ``generation_config.json``.

    Raises:
        FileNotFoundError: If ``model_path`` is not a folder.
        ValueError: If a config or tokenizer file in it is not valid JSON, an
            ``eos_token_id`` is not an int or a list of ints, or the tokenizer
            does not load (the reason condensed to one line).
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(
            f"model folder {model_path} does not exist; pass a local folder "
            "holding tokenizer.json and tokenizer_config.json"
        )
    # Read the configs first: AutoTokenizer also parses config.json and would
    # report a broken one less clearly.
    eos = set(eos_token_ids or ()) | declared_eos_ids(model_path)
    check_tokenizer_json(model_path)
    # transformers takes seconds to import; only pay for it when loading.
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(model_path))
    except Exception as err:
        raise ValueError(
            f"cannot load the tokenizer in {model_path} ({one_line_reason(err)}); "
            "fix or re-download its tokenizer files"
        ) from err
    return Tokenizer(hf, eos_token_ids=eos)


class StopMatcher:
    """Cuts a streamed text at the first stop string.

    The text is cut where a stop string first completes; if several complete
    at the same character, the longest wins. The result does not depend on
    how the text is split into pieces. Any tail that could be the start of a
    stop string is held back until it is ruled out, so no part of a stop
    string is ever returned.

    Args:
        stop_strings: The stop strings; may be empty (then text passes
            through unchanged).

    Raises:
        ValueError: If a stop string is empty.

    Attributes:
        matched: The stop string that ended the stream, or None.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {self.stop_strings}")
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen."""
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add the next piece of text.

        Args:
            text: The next piece of the stream.

        Returns:
            ``(safe_text, stopped)``: the text that can be shown now and
            whether a stop string completed. After a stop, the text before the
            stop string has been returned and later calls return ``("", True)``.
        """
        if self.stopped:
            return "", True

        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            start, self.matched = match
            self._held = ""
            return buffer[:start], True

        keep = self._partial_tail(buffer)
        split = len(buffer) - keep
        self._held = buffer[split:]
        return buffer[:split], False

    def flush(self) -> str:
        """Return the text held back, at the end of the stream.

        Returns:
            The held-back tail; empty after a stop.
        """
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None
        for stop in self.stop_strings:
            start = buffer.find(stop)
            if start < 0:
                continue
            # Earliest end first, then earliest start (the longer string).
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of buffer that starts a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
