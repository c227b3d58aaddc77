"""Tokenizer: encode/decode as HF, EOS ids, chat templates as HF renders them, streaming detokenization."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import CHAT_TEMPLATE, CORPUS

from miniinfer.loader import load_model
from miniinfer.models.bundled import BUNDLED_MODELS, bundled_model_path
from miniinfer.models.bundled import CHAT_TEMPLATE as BUNDLED_CHAT_TEMPLATE
from miniinfer.tokenizer import IncrementalDetokenizer, Tokenizer, check_text

TEXTS = CORPUS[:5] + ["", " leading space", "tabs\tand\nnewlines\n\n", "🎭🎭 ééé 中中 🇫🇷!"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder) -> Tokenizer:
    return Tokenizer.from_folder(tokenizer_folder)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_folder / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def test_encode_decode_match_hf(tokenizer, hf_tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
    specials = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert specials[0] == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.decode(specials) == "user\nhi"
    assert tokenizer.decode(specials, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.vocab_size == len(hf_tokenizer)


def test_multibyte_characters_span_tokens(tokenizer):
    """The fixture's tokenizer really splits some characters across tokens (else streaming tests are moot)."""
    split = 0
    for token_id in tokenizer.encode(" ".join(TEXTS)):
        if "\ufffd" in tokenizer.decode([token_id]):
            split += 1
    assert split > 0


def test_eos_token_ids(tmp_path, tokenizer_folder):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_folder, folder)
    assert Tokenizer.from_folder(folder).eos_token_ids == {Tokenizer.from_folder(folder).token_to_id("<|im_end|>")}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token_ids == {0, 5, 7, tok.token_to_id("<|im_end|>")}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        Tokenizer.from_folder(tmp_path)


def test_chat_template_matches_hf(tokenizer, hf_tokenizer):
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Écris un haïku 🌸"},
                {"role": "assistant", "content": "D'accord."}, {"role": "user", "content": "Encore <b>un</b>"}]
    for add in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=add) == expected
    tools = [{"name": "lookup", "description": "find <things> & 'stuff'"}]
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tools=tools) == expected  # tojson without HTML escaping


def test_chat_template_errors_and_sources(tmp_path, tokenizer_folder):
    import jinja2

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_folder, folder)
    tok = Tokenizer.from_folder(folder)
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="chat template refused these messages: unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])  # the template's raise_exception
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed: no reaching into Python internals
        Tokenizer(tok.backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}").apply_chat_template(hi)
    (folder / "chat_template.jinja").write_text("{{ bos_token or 'B' }}{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "BHI"
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).apply_chat_template(hi) == "D"
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages, match", [
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    (None, "messages must be a list"),
    ([], "messages is empty"),
    (["hi"], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0 needs a 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "message 1 \\(user\\) has no 'content'"),
    ([{"role": "user", "content": 42}], "content must be a string"),
    ([{"role": "user", "content": "bad \ud83d half"}], "message 0 \\(user\\): .*lone surrogate .* index 4"),
])
def test_chat_template_rejects_bad_messages(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.apply_chat_template(messages)


def test_chat_template_accepts_tool_call_messages(tokenizer):
    """content None is the OpenAI shape of an assistant turn that only calls tools: not a malformed message."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    ok = Tokenizer(tokenizer.backend, chat_template="{{ messages | length }}")
    assert ok.apply_chat_template(messages) == "2"


def test_check_text_and_encode_refuse_lone_surrogates(tokenizer):
    check_text("plain, ümlaut, 🎭, \U0010ffff")  # every real character passes
    for text, index in [("\ud800", 0), ("ab\udcffc", 2), ("🎭x\udfff", 2)]:
        with pytest.raises(ValueError, match=f"lone surrogate .* at index {index}\\b"):
            check_text(text)
        with pytest.raises(ValueError, match=f"lone surrogate .* at index {index}\\b"):
            tokenizer.encode(text)  # not the Rust side's bare TypeError ("TextInputSequence must be str")
    with pytest.raises(TypeError):
        check_text(b"bytes")
    with pytest.raises(TypeError):
        tokenizer.encode(None)


# -- the bundled models' chat template ---------------------------------------------------------------

SCENE = [{"role": "system", "content": "Enter Horatio and Hamlet."},
         {"role": "user", "content": "What news, my lord?"},
         {"role": "assistant", "content": "None, but that the world's grown honest.\n"},
         {"role": "user", "content": "Then is doomsday near.", "name": "Rosencrantz"}]


@pytest.fixture(scope="module")
def bundled_tokenizer() -> Tokenizer:
    return Tokenizer.from_folder(bundled_model_path("shakespeare"))


def test_bundled_chat_template_renders_a_scene(bundled_tokenizer):
    assert bundled_tokenizer.apply_chat_template(SCENE, add_generation_prompt=True) == (
        "[Enter Horatio and Hamlet.]\n\nHORATIO.\nWhat news, my lord?\n\n"
        "HAMLET.\nNone, but that the world's grown honest.\n\nROSENCRANTZ.\nThen is doomsday near.\n\nHAMLET.\n")
    assert bundled_tokenizer.apply_chat_template(SCENE[1:2], add_generation_prompt=False) == (
        "HORATIO.\nWhat news, my lord?\n\n")
    # The model answers as the speaker of its last named turn; template variables rename the defaults.
    named = [{"role": "user", "content": "Hail."}, {"role": "assistant", "content": "Hail.", "name": "Lady Macbeth"},
             {"role": "user", "content": "And?"}]
    assert bundled_tokenizer.apply_chat_template(named).endswith("LADY MACBETH.\nHail.\n\nHORATIO.\nAnd?\n\n"
                                                                 "LADY MACBETH.\n")
    text = bundled_tokenizer.apply_chat_template(SCENE[1:2], user_name="Romeo", assistant_name="Juliet")
    assert text == "ROMEO.\nWhat news, my lord?\n\nJULIET.\n"
    with pytest.raises(ValueError, match="unknown role 'tool'.*system, user and assistant"):
        bundled_tokenizer.apply_chat_template([{"role": "tool", "content": "42"}])


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_chat_template_matches_hf(name, bundled_tokenizer):
    """Every bundled folder carries CHAT_TEMPLATE, and transformers renders it exactly as we do."""
    transformers = pytest.importorskip("transformers")
    folder = bundled_model_path(name)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == BUNDLED_CHAT_TEMPLATE
    ours = Tokenizer.from_folder(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for messages in (SCENE, SCENE[1:2], SCENE[:2] + [{"role": "assistant", "content": "Hm.", "name": "Ophelia"}]):
        for add in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected, (messages, add)
    with pytest.raises(Exception, match="unknown role"):  # HF refuses through the same raise_exception
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _stream(tokenizer, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush()


def test_streaming_pieces_concatenate_to_full_decode(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces, tail = _stream(tokenizer, ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids) == text
        assert tail == "" and not any("\ufffd" in p for p in pieces), text  # never a half character


def test_streaming_random_token_sequences(tokenizer, seed):
    """Arbitrary ids (invalid UTF-8 included, special tokens included): still exactly the full decode."""
    rng = random.Random(seed)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            pieces, tail = _stream(tokenizer, ids, skip)
            assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_streaming_holds_back_incomplete_characters(tokenizer):
    """An emoji whose bytes arrive in several tokens appears whole, with the token that completes it."""
    ids = tokenizer.encode("🐍")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🐍"]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[0]) == "" and detok.flush() == "\ufffd"  # an incomplete end decodes as in decode()
    assert detok.text == tokenizer.decode(ids[:1])


def test_folder_without_tokenizer_loads_with_none(small_checkpoint):
    model, tokenizer = load_model(small_checkpoint[0])
    assert tokenizer is None


def test_load_model_returns_tokenizer(checkpoint_with_tokenizer):
    model, tokenizer = load_model(checkpoint_with_tokenizer[0])
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.eos_token_ids == {0, tokenizer.token_to_id("<|im_end|>")}  # generation_config + config
