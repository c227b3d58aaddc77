"""A byte-level BPE tokenizer to and from GGUF metadata (``tokenizer.ggml.*``), as llama.cpp stores it.

GGUF has no copy of ``tokenizer.json``; it keeps the pieces a BPE tokenizer is made of:

* ``tokenizer.ggml.model`` = ``"gpt2"`` (byte-level BPE) and ``tokenizer.ggml.pre``: the *name* of the
  pre-tokenizer (the regex that splits text into words before BPE), e.g. ``"qwen2"``, ``"llama-bpe"``;
* ``tokenizer.ggml.tokens`` (the vocabulary, index = id, in byte-level form: a space is ``Ġ``),
  ``tokenizer.ggml.token_type`` (1 normal, 3 control = special, 4 user-defined = added, 5 unused = padding)
  and ``tokenizer.ggml.merges`` (``"a b"``, in priority order);
* special ids (``bos``/``eos``/``padding_token_id``), ``add_bos_token`` and ``tokenizer.chat_template``.

So the pre-tokenizer must be recognised by its regex on the way out and rebuilt from its name on the
way in; :data:`PRE_TOKENIZERS` holds the ones we know.
"""

from __future__ import annotations

import json

__all__ = ["PRE_TOKENIZERS", "tokenizer_metadata", "tokenizer_from_metadata", "GGUFTokenizerError"]

_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF pre-tokenizer name -> the split regex before the byte-level mapping (None: GPT-2's own, built into ByteLevel).
PRE_TOKENIZERS = {"qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX, "gpt-2": None}

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class GGUFTokenizerError(ValueError):
    """The tokenizer cannot be written to (or rebuilt from) GGUF metadata."""


def _pre_tokenizer_name(spec: dict | None) -> str:
    """tokenizer.json's pre_tokenizer -> the GGUF name, or GGUFTokenizerError for one we cannot name."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True) and parts[0].get("behavior") == "Isolated"
                and not parts[0].get("invert")):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name, known in PRE_TOKENIZERS.items():
                if known is not None and regex == known:
                    return name
    raise GGUFTokenizerError(f"the tokenizer's pre-tokenizer has no GGUF name (known: {', '.join(PRE_TOKENIZERS)}): "
                             f"{json.dumps(spec)[:200]}")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Our :class:`~miniinfer.tokenizer.Tokenizer` -> GGUF tokenizer fields (``tokens`` padded to ``vocab_size``
    with unused ``[PAD{id}]`` entries, as llama.cpp's converter does for embedding tables larger than the vocab)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") not in (None, {}):
        raise GGUFTokenizerError("only byte-level BPE tokenizers without a normalizer are exported to GGUF (model "
                                 f"{model.get('type')!r}, byte_fallback {model.get('byte_fallback')}, normalizer "
                                 f"{(spec.get('normalizer') or {}).get('type')!r})")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = json.dumps(spec.get("post_processor"))
    fields = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
              "add_bos_token": tokenizer.bos_token is not None and tokenizer.bos_token in post}
    for key, token in (("bos_token_id", tokenizer.bos_token), ("eos_token_id", tokenizer.eos_token),
                       ("padding_token_id", tokenizer.pad_token)):
        if token is not None and vocab.get(token) is not None:
            fields[key] = vocab[token]
    if "eos_token_id" not in fields and tokenizer.eos_token_ids:
        fields["eos_token_id"] = min(tokenizer.eos_token_ids)
    if tokenizer.chat_template:
        fields["chat_template"] = tokenizer.chat_template
    return fields


def tokenizer_from_metadata(meta: dict, source: str = "GGUF"):
    """GGUF tokenizer fields (keys without the ``tokenizer.ggml.`` prefix; ``chat_template`` too) ->
    :class:`~miniinfer.tokenizer.Tokenizer`, or None when the file has no tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from miniinfer.tokenizer import Tokenizer

    if "tokens" not in meta:
        return None
    if meta.get("model") != "gpt2":
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.model {meta.get('model')!r} is not supported (only 'gpt2', "
                                 "byte-level BPE)")
    pre = meta.get("pre", "gpt-2")
    if pre not in PRE_TOKENIZERS and pre != "default":
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                                 f"{', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokens"], meta.get("token_type") or [NORMAL] * len(meta["tokens"])
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise GGUFTokenizerError(f"{source}: tokenizer.ggml.merges entries must be 'left right' pairs")
    backend = Backend(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    regex = PRE_TOKENIZERS.get(pre)
    if regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=kind == CONTROL, normalized=False)
             for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_tokens(added)

    def token(key):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, pad = token("bos_token_id"), token("eos_token_id"), token("padding_token_id")
    if meta.get("add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    eos_ids = {meta["eos_token_id"]} if eos is not None else set()
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, eos_token_ids=eos_ids,
                     chat_template=meta.get("chat_template"))
