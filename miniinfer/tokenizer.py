"""Text <-> token ids, with the ``tokenizers`` library (the Rust core of HF's fast tokenizers).

Besides ``encode``/``decode`` this module holds the two things an inference engine adds on top:

* chat templates: the checkpoint's own Jinja template (``tokenizer_config.json`` or
  ``chat_template.jinja``) turns a list of messages into the exact prompt format it was trained on;
* :class:`IncrementalDetokenizer`: text for a *stream* of generated tokens. A byte-level BPE token can
  end in the middle of a UTF-8 character (an emoji is 4 bytes, often 2–4 tokens), so decoding token
  by token would print U+FFFD garbage; we hold text back until the character is complete.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

__all__ = ["Tokenizer", "IncrementalDetokenizer", "check_text", "check_messages"]

REPLACEMENT_CHAR = "\ufffd"  # what a UTF-8 decoder emits for an incomplete (or invalid) byte sequence


def check_text(text: str) -> None:
    """Raise ``ValueError`` if ``text`` cannot be encoded as UTF-8, i.e. holds a lone surrogate (U+D800–U+DFFF).

    Python strings may hold them (``"\\ud83d"`` from a JSON escape cut in half, ``os.fsdecode`` of
    undecodable bytes, ``errors="surrogateescape"``), but no tokenizer can: they are not characters.
    The message gives the index so the caller can find it.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        context = text[max(0, e.start - 20):e.start]
        raise ValueError(f"text has a lone surrogate {char!r} (U+{ord(char):04X}) at index {e.start} (after "
                         f"{context!r}); it is not a character and cannot be encoded as UTF-8. Decode the input "
                         "with errors='replace', or fix the escape that produced it") from None


_MESSAGE_CONTENT_TYPES = (str, list)  # a list: multimodal parts [{"type": "text", "text": ...}, ...]


def check_messages(messages) -> None:
    """Raise ``ValueError`` unless ``messages`` is a non-empty list of ``{"role": str, "content": ...}`` dicts.

    ``content`` is a string or a list of parts; it may be None only for an assistant message carrying
    ``tool_calls`` (the OpenAI shape). Which roles exist is up to the template (it raises for others).
    """
    if isinstance(messages, (str, dict)) or not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__} {messages!r:.60}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got "
                             f"{type(message).__name__} {message!r:.60}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {index} needs a 'role' (a string such as 'user'), got {message!r:.80}")
        if "content" not in message:
            raise ValueError(f"message {index} ({role}) has no 'content'")
        content = message["content"]
        if content is None and message.get("tool_calls"):
            continue
        if not isinstance(content, _MESSAGE_CONTENT_TYPES):
            raise ValueError(f"message {index} ({role}): content must be a string (or a list of content parts), "
                             f"got {type(content).__name__}")
        if isinstance(content, str):
            try:
                check_text(content)
            except ValueError as e:
                raise ValueError(f"message {index} ({role}): {e}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """A checkpoint's tokenizer: ``encode``, ``decode``, special tokens, ``eos_token_ids``, chat template."""

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 eos_token_ids: set[int] | None = None, chat_template: str | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        ids = set(eos_token_ids or ())
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids: set[int] = ids

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` plus, when present, ``tokenizer_config.json`` (special tokens, chat
        template), ``chat_template.jinja``/``chat_template.json``, ``generation_config.json`` and
        ``config.json`` (their ``eos_token_id`` join :attr:`eos_token_ids`)."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a valid tokenizers file: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            by_name = {t["name"]: t["template"] for t in template}
            template = by_name.get("default", next(iter(by_name.values()), None))
        eos_ids = set(_as_id_list(_read_json(folder / "generation_config.json").get("eos_token_id")))
        eos_ids |= set(_as_id_list(_read_json(folder / "config.json").get("eos_token_id")))
        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   unk_token=_token_text(config.get("unk_token")), eos_token_ids=eos_ids, chat_template=template)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> token ids (``add_special_tokens`` applies the tokenizer's post-processor, as HF does)."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the Rust side says only "TextInputSequence must be str" for a lone surrogate
            if isinstance(text, str):
                check_text(text)
            raise

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """token ids (list or 1-D tensor) -> text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` ([{"role": "user", "content": "..."}, ...]) with the checkpoint's template.

        ``add_generation_prompt`` appends the header of an assistant turn, so the model's continuation is
        the reply. Extra keyword arguments (``tools=...``) reach the template, as with HF. Malformed
        ``messages`` (see :func:`check_messages`) and the template's own refusals (``raise_exception``,
        e.g. an unknown role) raise ``ValueError``.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json or "
                             "chat_template.jinja); it is probably a base model: prompt it with plain text")
        check_messages(messages)
        template = _compile_template(self.chat_template)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "unk_token": self.unk_token}
        import jinja2

        try:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   **{"tools": None, "documents": None, **specials, **kwargs})
        except jinja2.exceptions.SecurityError:
            raise  # a template reaching for Python internals is not a bad message: keep it loud
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, or a broken one
            raise ValueError(f"the chat template refused these messages: {e}") from None


_TEMPLATE_CACHE: dict[str, object] = {}


def _compile_template(source: str):
    """Compile a chat template the way HF transformers does: a *sandboxed* Jinja environment (a template
    comes with a downloaded checkpoint, so it must not reach Python internals), trim/lstrip blocks, loop
    controls, and HF's globals ``raise_exception`` and ``strftime_now`` and non-escaping ``tojson``."""
    if source in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[source]
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    _TEMPLATE_CACHE[source] = template = env.from_string(source)
    return template


class IncrementalDetokenizer:
    """Turn generated token ids into text pieces, one ``add`` per token; ``"".join(pieces) + flush()``
    equals ``tokenizer.decode(all_ids)``.

    We decode a small window ``ids[prefix_offset:]`` rather than single tokens (a decoder may render a
    token differently depending on what precedes it, e.g. SentencePiece's leading-space rule) and emit
    only what the newest tokens added to the window's text. If that text ends in U+FFFD, the last
    token stopped inside a multi-byte UTF-8 character: emit nothing yet and wait for the rest.
    Each step decodes a few tokens only, so streaming costs O(1) per token, not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window (always at a character boundary)
        self.read_offset = 0  # tokens before this are emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.token_ids[self.prefix_offset:])
        if final or (len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT_CHAR)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return window_text[len(prefix_text):]
        return ""  # nothing new yet, or the tail is an incomplete character: hold it back

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is still incomplete)."""
        self.token_ids.append(int(token_id))
        return self._step(final=False)

    def add_many(self, token_ids) -> str:
        """Append several tokens at once; return the text they complete. Equal to joining ``add`` of each
        (the window then spans all of them), for two decodes instead of two per token: a server that sends
        several tokens in one event (a slow reader's merged deltas) pays for the event, not the tokens."""
        if not token_ids:
            return ""
        self.token_ids.extend(int(token_id) for token_id in token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD, as in a full decode)."""
        return self._step(final=True)

    @property
    def text(self) -> str:
        """The full decode of every token added so far."""
        return self._decode(self.token_ids)
