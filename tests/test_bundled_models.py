"""The bundled models: transformers loads them offline, their cards tell the truth, they fit the budget.

Each model card carries, in its front matter, the loss / perplexity (and for the draft, the greedy
agreement with the target) that scripts/bundled_models/finalize.py measured on the committed
held-out text ``tests/data/shakespeare_heldout_slice.txt`` (the start of Macbeth, a validation work),
with transformers on a CPU in fp32. These tests recompute them the same way:

* token count: exact;
* loss: within 2e-3 nats (perplexity within 0.2 %); fp32 on different CPUs / BLAS builds differs by
  ~1e-6, so anything beyond the tolerance means the weights or the tokenizer changed;
* agreement: within 0.01 (an argmax may flip at a near tie), and above 0.5 ("most positions").

The folders come from ``miniinfer/data/models`` (or ``$MINIINFER_BUNDLED_MODELS`` for a scratch build);
the tests skip, saying why, only when the folders are absent. They take ~20-40 s on two CPU cores.
"""

from __future__ import annotations

import math
import os
import random
import re
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never touch the network

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("MINIINFER_BUNDLED_MODELS", REPO / "miniinfer" / "data" / "models"))
NAMES = ["shakespeare", "shakespeare-draft", "shakespeare-moe"]
SLICE = REPO / "tests" / "data" / "shakespeare_heldout_slice.txt"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "README.md"]
WINDOW = 1024
LOSS_TOL = 2e-3
AGREEMENT_TOL = 0.01
SIZE_LIMIT = 20_000_000  # bytes, the three folders together

transformers = pytest.importorskip("transformers", reason="transformers (the [dev] extra) checks the bundled models")
from tokenizers import Tokenizer  # noqa: E402

_missing = [n for n in NAMES if not (MODELS_DIR / n / "config.json").exists()]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"bundled model folders absent ({', '.join(_missing)} under {MODELS_DIR}); "
           "build them with scripts/bundled_models (see its README.md)",
)


def card_values(name: str) -> dict[str, str]:
    """The ``key: value`` lines of the card's front matter."""
    text = (MODELS_DIR / name / "README.md").read_text()
    head = text.split("\n---\n", 1)[0] if text.startswith("---\n") else ""
    return dict(m.groups() for m in re.finditer(r"^(miniinfer_\w+):\s*(\S+)\s*$", head, re.M))


def windows(n: int, window: int = WINDOW) -> list[tuple[int, int]]:
    """Same cut as scripts/bundled_models/common.eval_windows: (window+1)-token spans sharing one token."""
    spans, start = [], 0
    while start + 1 < n:
        stop = min(start + window + 1, n)
        spans.append((start, stop))
        start = stop - 1
    return spans


_cache: dict = {}


def load(name: str):
    if name not in _cache:
        path = MODELS_DIR / name
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # fp32: config.json says so
        tok = transformers.AutoTokenizer.from_pretrained(path)
        _cache[name] = (model, tok)
    return _cache[name]


def slice_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N-1, V]`` for every predicted position of the slice, and the targets ``[N-1]``."""
    key = ("logits", name)
    if key not in _cache:
        model, tok = load(name)
        ids = torch.tensor(tok(SLICE.read_text(), add_special_tokens=False, verbose=False)["input_ids"])
        logits, targets = [], []
        with torch.no_grad():
            for s, e in windows(len(ids)):
                chunk = ids[s:e][None]
                logits.append(model(chunk[:, :-1]).logits[0].float())
                targets.append(chunk[0, 1:])
        _cache[key] = (torch.cat(logits), torch.cat(targets))
    return _cache[key]


@pytest.mark.parametrize("name", NAMES)
def test_folder_is_a_complete_hf_checkpoint(name):
    missing = [f for f in FILES if not (MODELS_DIR / name / f).exists()]
    assert not missing, f"{MODELS_DIR / name} lacks {missing}"
    config = transformers.AutoConfig.from_pretrained(MODELS_DIR / name)
    expected = "Qwen2MoeForCausalLM" if name.endswith("moe") else "Qwen2ForCausalLM"
    assert config.architectures == [expected]
    model, _ = load(name)
    assert type(model).__name__ == expected and model.dtype == torch.float32


def test_total_size_within_budget():
    sizes = {n: sum(f.stat().st_size for f in (MODELS_DIR / n).iterdir()) for n in NAMES}
    total = sum(sizes.values())
    assert total <= SIZE_LIMIT, f"bundled models take {total / 1e6:.2f} MB > 20 MB: {sizes}"


@pytest.mark.parametrize("name", NAMES)
def test_test_slice_perplexity_matches_card(name):
    card = card_values(name)
    assert "miniinfer_test_slice_loss" in card, f"{name}'s card has no test-slice numbers; run finalize.py"
    assert card["miniinfer_test_slice"] == str(SLICE.relative_to(REPO))
    logits, targets = slice_logits(name)
    loss = F.cross_entropy(logits, targets).item()
    assert targets.numel() == int(card["miniinfer_test_slice_tokens"]), "the tokenizer changed"
    assert abs(loss - float(card["miniinfer_test_slice_loss"])) <= LOSS_TOL, (
        f"{name}: test-slice loss {loss:.5f} (ppl {math.exp(loss):.3f}) but the card says "
        f"{card['miniinfer_test_slice_loss']} (ppl {card['miniinfer_test_slice_ppl']})")
    assert math.exp(loss) == pytest.approx(float(card["miniinfer_test_slice_ppl"]), rel=2 * LOSS_TOL)


def test_draft_agrees_with_target_as_the_card_says():
    card = card_values("shakespeare-draft")
    target_logits, _ = slice_logits("shakespeare")
    draft_logits, _ = slice_logits("shakespeare-draft")
    agreement = (target_logits.argmax(-1) == draft_logits.argmax(-1)).float().mean().item()
    assert abs(agreement - float(card["miniinfer_test_slice_agreement"])) <= AGREEMENT_TOL, (
        f"draft/target greedy agreement {agreement:.4f}, card says {card['miniinfer_test_slice_agreement']}")
    assert agreement > 0.5, f"the draft agrees with the target on only {agreement:.1%} of positions"


def _round_trip_texts() -> list[str]:
    rng = random.Random(0)
    texts = [
        "ROMEO.\nBut, soft! what light through yonder window breaks?\n",
        "🎭🗡️👑 👩‍👩‍👧‍👦 🇬🇧 emoji, ZWJ sequences and flags",
        "汉字 かな カナ 한국어 中文标点，。！",
        "e\u0301 a\u0300 o\u0302\u0323 Z\u0351\u0308\u0334 combining marks (not NFC)",
        "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 right-to-left",
        "\t tabs \r\n CRLF \x00 NUL \x7f DEL \u200b zero width \ufeff BOM",
        "   leading and trailing spaces   ",
        "<|endoftext|> a special token spelled out",
        "",
    ]
    for _ in range(20):  # random bytes made into text, and random code points (no surrogates)
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))).decode("utf-8", errors="replace"))
        texts.append("".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                                             rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(1, 32))))
    return texts


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_round_trips_any_utf8(name):
    """tokenizer.json as the engine reads it (``tokenizers``): decode(encode(text)) == text, byte for byte."""
    tok = Tokenizer.from_file(str(MODELS_DIR / name / "tokenizer.json"))
    for text in _round_trip_texts():
        ids = tok.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < 4096 for i in ids)
        back = tok.decode(ids, skip_special_tokens=False)
        assert back == text, f"{name}: {text!r} came back as {back!r}"


@pytest.mark.parametrize("name", NAMES)
def test_transformers_tokenizer_agrees(name):
    """transformers' tokenizer (Qwen2Tokenizer: NFC first) gives tokenizer.json's ids on NFC text, and round-trips it."""
    _, hf = load(name)
    tok = Tokenizer.from_file(str(MODELS_DIR / name / "tokenizer.json"))
    for text in [SLICE.read_text()] + [unicodedata.normalize("NFC", t) for t in _round_trip_texts()]:
        ids = hf(text, add_special_tokens=False, verbose=False)["input_ids"]
        assert ids == tok.encode(text, add_special_tokens=False).ids, f"{name}: ids differ on {text[:40]!r}"
        assert hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_tokenizer_is_shared():
    """One tokenizer for all three (the draft must share the target's vocabulary); eos is id 0."""
    blobs = {(MODELS_DIR / n / "tokenizer.json").read_bytes() for n in NAMES}
    assert len(blobs) == 1, "the bundled models' tokenizer.json files differ"
    _, tok = load("shakespeare")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and len(tok) == 4096


def test_target_writes_play_shaped_text():
    """Sampled text has speaker lines ("NAME." alone on a line) and several lines of speech."""
    model, tok = load("shakespeare")
    torch.manual_seed(0)
    ids = tok("ROMEO.\n", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=50,
                         max_new_tokens=160, pad_token_id=0)
    text = tok.decode(out[0], skip_special_tokens=True)
    speakers = re.findall(r"^[A-Z][A-Za-z' ]{1,30}\.$", text, re.M)
    assert len(speakers) >= 2 and text.count("\n") >= 6, f"not play-shaped:\n{text}"
