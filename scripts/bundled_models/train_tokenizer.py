"""Step 2: a byte-level BPE tokenizer (4096 entries) trained on the training works, and the token ids.

    python scripts/bundled_models/train_tokenizer.py [--data DIR]

Reads ``DIR/corpus/`` (step 1) and writes

    DIR/tokenizer/tokenizer.json, tokenizer_config.json   copied into every model folder at export
    DIR/tokens/train.u16, val.u16                          uint16 token ids, works joined by <|endoftext|>
    DIR/tokens/meta.json                                   counts per split and per work

Why these choices:
* byte level: every UTF-8 string maps to tokens and back exactly (the 256 byte symbols are in the
  vocabulary from the start), so the engine never meets an unknown character;
* no normaliser, so that decode(encode(text)) == text for any text (Qwen2's tokenizer applies NFC,
  which merges "e" + combining accent into "é"; transformers still does that when it loads these
  folders, see TOKENIZER_CONFIG);
* Qwen2's pre-tokenisation regex (digits one by one, words with their leading space), so the
  tokenizer behaves like the real Qwen2 one, only with a vocabulary 37x smaller;
* trained on the training works only, so nothing about the held-out works leaks into it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import CONTEXT, DATA_DIR, EOT, VOCAB_SIZE, read_json, tokens_path, write_json
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from miniinfer.models.bundled import CHAT_TEMPLATE  # the speaker-line chat format of the bundled models

QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

TOKENIZER_CONFIG = {
    # transformers 5 loads the tokenizer of any "qwen2" model as Qwen2Tokenizer whatever this says
    # (it rebuilds the pipeline from our vocabulary and merges, with Qwen2's regex and an NFC
    # normaliser), so name that class for all three folders: they then behave alike in transformers.
    # The ids equal tokenizer.json's on NFC text (the whole corpus); only tokenizer.json as written,
    # which the engine reads with `tokenizers`, keeps un-normalised text byte for byte.
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": EOT,
    "pad_token": EOT,
    "unk_token": None,
    "model_max_length": CONTEXT,
    "clean_up_tokenization_spaces": False,  # the default "clean up" would edit " ," and break round trips
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "0": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
              "single_word": False, "special": True},
    },
    "chat_template": CHAT_TEMPLATE,
}

ROUND_TRIP_SAMPLES = [
    "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
    "naïve café, Ünïcödé — “quotes” … 1234567890",
    "e\u0301 a\u0300 n\u0303 (combining marks)  \t tabs\r\nCRLF",
    "汉字かな한국어 🎭🗡️👑 🇬🇧",
    "",
]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: byte level needs none
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_round_trip(tok: Tokenizer) -> None:
    for text in ROUND_TRIP_SAMPLES:
        back = tok.decode(tok.encode(text).ids, skip_special_tokens=False)
        if back != text:
            raise AssertionError(f"tokenizer does not round-trip {text!r}: got {back!r}")


def encode_works(tok: Tokenizer, texts: list[str], eot_id: int) -> np.ndarray:
    """Each work's ids followed by <|endoftext|>: ``[N]`` uint16."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return np.asarray(ids, dtype="<u2")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="data folder (default: %(default)s)")
    args = ap.parse_args(argv)

    manifest = read_json(args.data / "corpus" / "manifest.json")
    works = manifest["works"]
    text = {w["stem"]: (args.data / "corpus" / "works" / f"{w['stem']}.txt").read_text() for w in works}
    by_split = {s: [w for w in works if w["split"] == s] for s in ("train", "val")}

    tok = train([text[w["stem"]] for w in by_split["train"]])
    assert tok.get_vocab_size() == VOCAB_SIZE and tok.token_to_id(EOT) == 0, "unexpected vocabulary layout"
    check_round_trip(tok)
    out = args.data / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)  # compact: it ships three times
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)

    meta = {"vocab_size": VOCAB_SIZE, "eot_id": 0, "splits": {}}
    for split, ws in by_split.items():
        ids = encode_works(tok, [text[w["stem"]] for w in ws], eot_id=0)
        path = tokens_path(split, args.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids.tofile(path)
        chars = sum(len(text[w["stem"]]) for w in ws)
        meta["splits"][split] = {"tokens": int(ids.size), "chars": chars, "works": [w["stem"] for w in ws],
                                 "chars_per_token": round(chars / ids.size, 3)}
        print(f"{split}: {len(ws)} works, {ids.size:,} tokens ({chars / ids.size:.2f} chars/token) -> {path}")
    write_json(args.data / "tokens" / "meta.json", meta)


if __name__ == "__main__":
    main()
