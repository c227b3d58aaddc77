"""GGUF (llama.cpp's format, through its own gguf package): export and load round trips for every type we
write, the tokenizer from tokenizer.ggml.* metadata against tokenizer.json, Llama/Qwen3/Qwen2 against HF
transformers (and against transformers' own GGUF reader, an independent check of llama.cpp's conventions:
names, metadata, Llama's q/k permutation), and refusals that name the tensor for broken files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from miniinfer.formats.gguf import GGUFError, export_gguf, load_gguf  # noqa: E402
from miniinfer.loader import load_model  # noqa: E402
from miniinfer.models.bundled import bundled_model_path  # noqa: E402

HERE = Path(__file__).parent
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\nJULIET.\nAy me."
# max |logits - original| / logit range, per type (the type's own rounding error, with margin)
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2, "q4_0": 0.25, "q4_k": 0.25}


def ratio(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / (expected.max() - expected.min())).item()


@pytest.fixture(scope="module")
def draft():
    model, tokenizer = load_model(bundled_model_path("shakespeare-draft"), device="cpu")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        return ids, model(ids)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_round_trip_per_type(tmp_path, draft, kind):
    ids, expected = draft
    file = export_gguf(bundled_model_path("shakespeare-draft"), tmp_path / f"draft-{kind}.gguf", kind)
    reader = gguf.GGUFReader(str(file))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    assert types["blk.0.attn_q.weight"] == kind.upper()
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    model, tokenizer = load_gguf(file, device="cpu", quantized_kernels=False)
    with torch.no_grad():
        got = model(ids)
    if kind == "f32":
        assert torch.equal(got, expected)
    assert ratio(got, expected) <= TOLERANCE[kind], kind
    assert tokenizer.encode(PROMPT) == ids[0].tolist()
    if kind in ("q8_0", "q4_0"):  # int8/int4 group-32 layers hold exactly the file's numbers
        from miniinfer.quant.linear import GroupQuantLinear

        quantized, _ = load_gguf(file, device="cpu", quantized_kernels=True)
        assert isinstance(quantized.model.layers[1].mlp.gate_up_proj, GroupQuantLinear)
        assert quantized.model.layers[0].self_attn.qkv_proj.bits == (8 if kind == "q8_0" else 4)
        with torch.no_grad():
            assert ratio(quantized(ids), got) <= 1e-5


def test_q4_k_quantizer_and_loader(tmp_path):
    """Our Q4_K packing read back by gguf's own dequantizer (error within half a step), then the main model."""
    import numpy as np

    from miniinfer.formats.ggml_quants import quantize_q4_k

    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q4_k(w), gguf.GGMLQuantizationType.Q4_K)
    step = (w.reshape(-1, 32).max(1) - np.minimum(w.reshape(-1, 32).min(1), 0)) / 15
    assert (np.abs(back - w).reshape(-1, 32).max(1) <= 0.5 * step * 1.1 + 1e-3).all()

    hf = _llama_qwen3_checkpoint(tmp_path / "hf", "llama", hidden_size=256, intermediate_size=256,
                                 num_hidden_layers=1)
    file = export_gguf(tmp_path / "hf", tmp_path / "q4k.gguf", "q4_k")
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors if len(t.shape) == 2} == {"Q4_K"}
    loaded, _ = load_gguf(file, device="cpu")
    ids = torch.randint(0, hf.config.vocab_size, (1, 30))
    with torch.no_grad():
        # The loader computes exactly the model whose 2-D weights are Q4_K-rounded (gguf's dequantizer) ...
        for _, p in hf.named_parameters():
            if p.dim() == 2:
                q = quantize_q4_k(p.numpy())
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_K)))
        assert ratio(loaded(ids), hf(ids).logits) <= 1e-5


def test_cli_convert_bundled_llm_and_tokenizer(tmp_path):
    """`miniinfer convert shakespeare-draft --to gguf` (a bundled model, with the main model's tokenizer.json):
    LLM(file) generates the original model's greedy tokens; the
    GGUF tokenizer tokenizes a corpus exactly as tokenizer.json does (ids and decoded text), special tokens
    included."""
    from miniinfer import LLM, SamplingParams
    from miniinfer.cli import main
    from miniinfer.tokenizer import Tokenizer

    file = tmp_path / "draft.gguf"
    assert main(["convert", "shakespeare-draft", "--to", "gguf", "--output", str(file), "--type", "f32"]) == 0
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["ROMEO.", "To be, or not to be"]
    llm = LLM(str(file), device="cpu")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    model, original = load_model(bundled_model_path("shakespeare-draft"), device="cpu")
    for prompt, tokens in zip(prompts, got):
        ids = original.encode(prompt)
        with torch.no_grad():
            for _ in range(12):  # the original's plain greedy loop
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[-12:], prompt
    assert isinstance(original, Tokenizer)
    tokenizer = llm.tokenizer
    corpus = (HERE / "data" / "shakespeare_heldout_slice.txt").read_text(encoding="utf-8")[:20000].splitlines()
    corpus += ["", "  leading and  double  spaces  ", "tabs\tand\r\nCRLF", "digits 1234567 3.14", "naïve café — “quotes”",
               "emoji 🙂👍🏽 and 漢字", "<|endoftext|>ROMEO.<|endoftext|>", "it's, we'll, I'D"]
    for line in corpus:
        ids = original.encode(line)
        assert tokenizer.encode(line) == ids, line
        assert tokenizer.decode(ids) == original.decode(ids), line
    assert tokenizer.vocab_size == original.vocab_size
    assert tokenizer.eos_token == original.eos_token and tokenizer.eos_token_ids == original.eos_token_ids
    assert tokenizer.chat_template == original.chat_template


def _llama_qwen3_checkpoint(folder: Path, kind: str, **overrides):
    from test_llama_qwen3_parity import make_checkpoint

    return make_checkpoint(folder, kind, 3, **(dict(hidden_size=64, intermediate_size=96) | overrides))


ARCHS = {  # name: (kind, overrides, transformers can read it back as an oracle)
    "llama-GQA": ("llama", dict(num_attention_heads=8, num_key_value_heads=2), True),
    "llama-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True), False),
    "llama3-scaling": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                       False),
    # transformers' GGUF reader ignores qwen3.attention.key_length (it assumes Qwen3's default head_dim 128),
    # so the oracle runs on a head_dim-128 model only; llama.cpp and we read key_length.
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16), False),
    "qwen3-head_dim128": ("qwen3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128), True),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_architectures_match_hf(tmp_path, name):
    kind, overrides, oracle = ARCHS[name]
    hf = _llama_qwen3_checkpoint(tmp_path / "hf", kind, **overrides)
    file = export_gguf(tmp_path / "hf", tmp_path / "model.gguf", "f32")
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    positions = torch.arange(200, 240)[None].expand(2, 40)
    with torch.no_grad():
        expected, far = hf(ids).logits, hf(ids, position_ids=positions).logits
        model, _ = load_gguf(file, device="cpu")
        assert model.config.model_type == kind
        assert ratio(model(ids), expected) <= 1e-5
        assert ratio(model(ids, positions), far) <= 1e-5
    names = {t.name for t in gguf.GGUFReader(str(file)).tensors}
    if kind == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    if "scaling" in name:
        assert "rope_freqs.weight" in names
        # A file from llama.cpp has only rope_freqs (no miniinfer.rope_scaling key): the divisors alone suffice.
        data = file.read_bytes().replace(b"miniinfer.rope_scaling", b"miniinfer.rope_scalinX")
        foreign = tmp_path / "foreign.gguf"
        foreign.write_bytes(data)
        other, _ = load_gguf(foreign, device="cpu")
        assert other.config.rope_scaling is None
        with torch.no_grad():
            assert ratio(other(ids, positions), far) <= 1e-5
    if oracle:
        pytest.importorskip("accelerate")  # transformers needs it to read GGUF
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                                   dtype=torch.float32).eval()
        with torch.no_grad():
            assert ratio(theirs(ids).logits, expected) <= 1e-5, "transformers reads our GGUF differently"


# -- broken files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return export_gguf(bundled_model_path("shakespeare-draft"), tmp_path_factory.mktemp("gguf") / "d.gguf", "f16")


def _name_offset(data: bytes, name: str) -> int:
    """Offset just past a tensor info's name (where n_dims, then the dims, follow)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.find(key)
    assert at >= 0
    return at + len(key)


def test_truncated_file_names_a_tensor(tmp_path, good_file):
    data = good_file.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    with pytest.raises(GGUFError, match=r"tensor \S+ .*truncated"):
        load_model(tmp_path / "cut.gguf", device="cpu")
    (tmp_path / "header.gguf").write_bytes(data[:300])
    with pytest.raises(GGUFError, match="header is truncated or corrupt"):
        load_gguf(tmp_path / "header.gguf", device="cpu")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(GGUFError, match="not a valid GGUF file"):
        load_gguf(tmp_path / "text.gguf", device="cpu")


def test_corrupt_shape_names_the_tensor(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    at = _name_offset(data, "blk.1.ffn_down.weight")
    n_dims, cols, rows = struct.unpack_from("<IQQ", data, at)
    assert n_dims == 2
    struct.pack_into("<Q", data, at + 4 + 8, rows // 2)  # fewer rows: still inside the file, wrong shape
    (tmp_path / "shape.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"tensor blk\.1\.ffn_down\.weight \(model\.layers\.1\.mlp\.down_proj\.weight\) "
                                        r"has shape \(48, 256\), but the metadata implies \(96, 256\)"):
        load_gguf(tmp_path / "shape.gguf", device="cpu")
    struct.pack_into("<Q", data, at + 4 + 8, rows * 1000)  # past the end of the file
    (tmp_path / "huge.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"tensor blk\.1\.ffn_down\.weight .*truncated, or the tensor's shape"):
        load_gguf(tmp_path / "huge.gguf", device="cpu")


def test_missing_tensor_and_unsupported_architecture(tmp_path, good_file):
    data = good_file.read_bytes()
    renamed = data.replace(struct.pack("<Q", 19) + b"blk.1.ffn_up.weight", struct.pack("<Q", 19) + b"blk.1.ffn_uX.weight")
    (tmp_path / "missing.gguf").write_bytes(renamed)
    with pytest.raises(GGUFError, match=r"missing tensors: blk\.1\.ffn_up\.weight; unexpected tensors: blk\.1\.ffn_uX"):
        load_gguf(tmp_path / "missing.gguf", device="cpu")
    arch = data.replace(b"general.architecture" + struct.pack("<IQ", 8, 5) + b"qwen2",
                        b"general.architecture" + struct.pack("<IQ", 8, 5) + b"gemma")
    assert arch != data
    (tmp_path / "arch.gguf").write_bytes(arch)
    with pytest.raises(ValueError, match="GGUF architecture 'gemma' is not supported.*qwen2, llama, qwen3"):
        load_gguf(tmp_path / "arch.gguf", device="cpu")
