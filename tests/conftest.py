"""Shared fixtures: tiny random HF Qwen2 checkpoints (written by transformers itself) and a tiny tokenizer.

Random inputs are fresh each run; every random test seeds from ``fresh_seed`` and prints the seed, so
a failure can be replayed with ``MINIINFER_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text with characters of 1 to 4 UTF-8 bytes, so that some tokens end inside a character.
CORPUS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Café crème, naïve façade, Straße, smørrebrød, ĳ, ŉ — déjà vu.",
    "中文字符在这里出现，日本語のテキストもあります。한국어 텍스트.",
    "Emoji: 😀 🎭 🐍 👩‍💻 🇫🇷 and math ∑ ∫ √ ≈ ≠ ∞.",
    "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun.",
] * 4


def fresh_seed() -> int:
    """A new seed each run (or MINIINFER_TEST_SEED), printed so a failing run can be replayed."""
    seed = int(os.environ.get("MINIINFER_TEST_SEED", random.randrange(2**31)))
    print(f"seed={seed} (replay with MINIINFER_TEST_SEED={seed})")
    return seed


@pytest.fixture
def seed() -> int:
    seed = fresh_seed()
    torch.manual_seed(seed)
    return seed


def make_hf_checkpoint(folder: Path, *, vocab_size: int = 101, hidden_size: int = 48, intermediate_size: int = 72,
                       num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                       tie: bool = False, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                       max_position_embeddings: int = 256, seed: int = 0, max_shard_size: str | None = None,
                       eos_token_id: int | None = None, weight_std: float = 0.15):
    """Save a random transformers Qwen2ForCausalLM to ``folder``; return the HF model (fp32, eval).

    Every parameter is randomised (biases and norm gains too, which HF initialises to constants) so
    that a wrong bias or norm weight shows up in the logits.
    """
    import transformers

    kwargs = {} if head_dim is None else {"head_dim": head_dim}
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
        max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id, pad_token_id=None,
        bos_token_id=None, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(weight_std * noise)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = eos_token_id if eos_token_id is not None else 0
    folder = Path(folder)
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def train_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on CORPUS, saved as an HF tokenizer folder (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 256}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def checkpoint_with_tokenizer(tmp_path_factory, tokenizer_folder):
    """(folder, hf_model): a random Qwen2 whose vocabulary is the tiny tokenizer's, tokenizer files included.

    generation_config.json names <|endoftext|> as EOS; tokenizer_config.json names <|im_end|>."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json")).get_vocab_size()
    folder = tmp_path_factory.mktemp("ckpt_tok")
    model = make_hf_checkpoint(folder, vocab_size=vocab, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                               intermediate_size=96, eos_token_id=0, seed=1234)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder, model


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """(folder, hf_model): a random GQA Qwen2 without tokenizer files, no EOS."""
    folder = tmp_path_factory.mktemp("ckpt_small")
    return folder, make_hf_checkpoint(folder, seed=99)


# -- the server tests' shared fixtures (the modules that use them define ``server``) --------------------

@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client on the module's ``server``."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline():
    """The bundled model offline: the greedy answers (12 tokens) a server must reproduce for each prompt."""
    from miniinfer import LLM, SamplingParams
    from tests.server_fixtures import PROMPTS

    llm = LLM(device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    return {p: o.text for p, o in zip(PROMPTS, outs)}
