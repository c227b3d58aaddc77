"""Sample text from the bundled target, as extra training windows for distill_draft.py (issue 13).

    python scripts/bundled_models/gen_samples.py --out .gpu/bundled_data/tokens/generated.u16 \
        [--batch 128] [--seq-len 1024] [--prefix 4] [--top-p 0.95] [--until-utc 14:50] [--device cpu]

Each sequence is ``--seq-len`` tokens: a random ``--prefix``-token slice of the *training* works (never
the held-out ones), then the target's own continuation sampled at temperature 1.0; every other batch
uses nucleus sampling (``--top-p``) instead, when given. Sequences are appended to ``--out`` (uint16,
one after another, so the file is ``n x seq_len`` tokens) as soon as a batch is done, so the file is
usable at any time and a later run continues it. A plain batched KV-cache loop over modeling.py's
weights (the target in fp32 here), no engine needed; ``--meta`` (default ``OUT`` with ``.json``) records
what was generated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import DATA_DIR, MODELS, PACKAGE_MODELS, TARGET, load_tokens
from modeling import apply_rope


@torch.no_grad()
def sample(model, prefix: torch.Tensor, total: int, top_p: float | None, gen: torch.Generator,
           deadline: float | None = None) -> torch.Tensor:
    """prefix ``[B, P]`` -> ``[B, total]``: the prefix, then sampled tokens (temperature 1).

    Past ``deadline`` (time.perf_counter()) it stops and returns the ``[B, t]`` tokens done so far."""
    B, P = prefix.shape
    spec = model.spec
    H, H_kv, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    G, scale = H // H_kv, 1.0 / D ** 0.5
    layers = model.model.layers
    dev = prefix.device
    kc = [torch.empty(B, H_kv, total, D, device=dev) for _ in layers]
    vc = [torch.empty(B, H_kv, total, D, device=dev) for _ in layers]
    out = torch.empty(B, total, dtype=torch.long, device=dev)
    out[:, :P] = prefix
    W = model.model.embed_tokens.weight
    for t in range(total - 1):
        if deadline is not None and t % 32 == 0 and time.perf_counter() > deadline:
            return out[:, :t + 1]
        tok = out[:, t]
        x = model.model.embed_tokens(tok)[:, None, :]  # [B, 1, E]
        cos, sin = model.rope_cos[t:t + 1], model.rope_sin[t:t + 1]
        for i, layer in enumerate(layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(B, 1, H, D).transpose(1, 2)
            k = a.k_proj(h).view(B, 1, H_kv, D).transpose(1, 2)
            v = a.v_proj(h).view(B, 1, H_kv, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc[i][:, :, t:t + 1] = k
            vc[i][:, :, t:t + 1] = v
            # One query against every cached position (no mask needed). Grouped-query attention as HF's
            # repeat_kv (query head h reads KV head h // G), without copying the cache: [B, H_kv, G, D].
            qg = q.view(B, H_kv, G, D)
            att = torch.softmax((qg @ kc[i][:, :, :t + 1].transpose(-1, -2)) * scale, dim=-1)  # [B, H_kv, G, t+1]
            y = (att @ vc[i][:, :, :t + 1]).reshape(B, 1, H * D)
            x = x + a.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if t + 1 < P:
            continue
        logits = F.linear(model.model.norm(x[:, 0]), W).float()  # [B, V]
        probs = torch.softmax(logits, dim=-1)
        if top_p is not None and top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p
            sp = sp * keep
            nxt = si.gather(-1, torch.multinomial(sp, 1, generator=gen))[:, 0]
        else:
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out[:, t + 1] = nxt
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR / "tokens" / "generated.u16")
    ap.add_argument("--meta", type=Path)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prefix", type=int, default=4)
    ap.add_argument("--top-p", type=float, default=None, help="every other batch: nucleus sampling")
    ap.add_argument("--batches", type=int, default=0, help="0 = until --until-utc / --max-mb")
    ap.add_argument("--until-utc", default=None, help="HH:MM: start no batch that would end after it")
    ap.add_argument("--max-mb", type=float, default=35.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from train import load_teacher

    model = load_teacher(PACKAGE_MODELS / TARGET, torch.device(args.device))
    assert model.spec == MODELS[TARGET]
    train_ids = torch.from_numpy(load_tokens("train", args.data).astype(np.int64))
    gen = torch.Generator().manual_seed(args.seed)
    dgen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    meta_path = args.meta or args.out.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and args.out.exists() else {
        "what": "target samples (gen_samples.py)", "seq_len": args.seq_len, "prefix": args.prefix, "batches": []}
    assert meta["seq_len"] == args.seq_len
    deadline = None
    if args.until_utc:
        hh, mm = map(int, args.until_utc.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    b, last = 0, None
    while not args.batches or b < args.batches:
        size = args.out.stat().st_size if args.out.exists() else 0
        if size + args.batch * args.seq_len * 2 > args.max_mb * 1e6:
            print("size limit reached", flush=True)
            break
        if deadline and last and time.time() + last > deadline:
            print("deadline reached", flush=True)
            break
        starts = torch.randint(0, train_ids.numel() - args.prefix, (args.batch,), generator=gen)
        prefix = train_ids[starts[:, None] + torch.arange(args.prefix)].to(args.device)
        top_p = args.top_p if (args.top_p and len(meta["batches"]) % 2 == 1) else None
        t0 = time.perf_counter()
        seqs = sample(model, prefix, args.seq_len, top_p, dgen)
        last = time.perf_counter() - t0
        arr = seqs.cpu().numpy().astype(np.uint16)
        with args.out.open("ab") as f:
            arr.tofile(f)
        meta["batches"].append({"n": args.batch, "top_p": top_p, "s": round(last, 1)})
        n_tok = sum(x["n"] for x in meta["batches"]) * args.seq_len
        meta["tokens"] = n_tok
        meta_path.write_text(json.dumps(meta, indent=1))
        print(f"batch {len(meta['batches'])}: {args.batch}x{args.seq_len} in {last:.1f} s "
              f"({args.batch * args.seq_len / last:,.0f} tok/s, top_p {top_p}); total {n_tok:,} tokens", flush=True)
        b += 1


if __name__ == "__main__":
    main()
