"""Step 3: train one bundled model, keeping the checkpoint with the best validation loss.

    python scripts/bundled_models/train.py --name shakespeare            # then shakespeare-moe,
    python scripts/bundled_models/train.py --name shakespeare-draft      # the draft needs the target
    python scripts/bundled_models/train.py --name shakespeare --smoke    # a 20-step CPU check

Reads ``DATA/tokens/{train,val}.u16``; writes ``WORK/runs/<name>/``: ``best.pt`` (fp32 weights, spec,
summary), ``train_log.jsonl`` (one line per evaluation) and ``summary.json``.

The corpus is small (~1.4 M training tokens, 3 held-out works), so the schedule is built around
overfitting rather than a token budget:
* random 1024-token windows of the training stream, an "epoch" being N_train / (B * L) steps;
* dropout on the residual stream and the attention weights, AdamW weight decay 0.1;
* validation on all held-out works every half epoch; the best weights are kept;
* when validation stops improving for ``patience`` evaluations, go back to the best weights and halve
  the learning rate; after ``max_decays`` halvings (or the epoch or time budget) stop.
  This finds the right number of epochs by itself instead of guessing a cosine length.
The draft (``shakespeare-draft``) learns from the target's full next-token distribution
(KL(target || draft), optionally mixed with the usual cross-entropy): what a speculative draft must
do is predict what the target would say, not the text.

On CUDA the forward runs under bf16 autocast with fp32 master weights; on CPU everything is fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    CONTEXT,
    DATA_DIR,
    DRAFT,
    MODELS,
    PACKAGE_MODELS,
    TARGET,
    WORK_DIR,
    eval_windows,
    load_tokens,
    write_json,
)
from modeling import CausalLM, num_parameters


@dataclass
class TrainConfig:
    batch_size: int = 16  # windows per step (B); B * L = 16k tokens
    seq_len: int = CONTEXT  # L
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr_scale: float = 1 / 16  # stop once the plateau halvings would go below this (4 halvings)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.1
    aux_loss_coef: float = 0.01  # MoE load balancing
    distill_alpha: float = 0.0  # 0 = plain cross-entropy; 1 = pure KL to the teacher
    evals_per_epoch: int = 2
    patience: int = 2  # evaluations without improvement before the learning rate halves
    min_delta: float = 1e-3  # an improvement smaller than this (nats) does not count
    max_epochs: float = 40.0
    max_steps: int = 0  # 0 = no limit (smoke runs set it)
    time_budget_s: float = 120.0  # training stops after this wall time (the GPU command has 10 minutes)
    decay_frac: float = 0.0  # > 0: the learning rate falls linearly to 0 over this last share of time_budget_s
    eval_windows: int = 0  # 0 = the whole validation stream; smoke runs use a few windows
    eval_batch: int = 32
    seed: int = 1234
    compile: bool = False


DEFAULTS = {
    TARGET: TrainConfig(),
    "shakespeare-moe": TrainConfig(),
    # Small and distilled: the teacher's soft targets regularise, so no dropout; a higher rate suits
    # a model this narrow. Mostly KL, with a little cross-entropy to keep it anchored to the text.
    DRAFT: TrainConfig(lr=3e-3, dropout=0.0, weight_decay=0.05, distill_alpha=0.9, time_budget_s=75.0),
}
SMOKE = dict(batch_size=2, seq_len=128, max_steps=20, warmup_steps=5, eval_windows=2, evals_per_epoch=0,
             time_budget_s=600.0)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (H100: bf16 tensor cores); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sample_batch(data: torch.Tensor, B: int, L: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of the token stream ``data [N]``: inputs ``[B, L]``, next-token targets ``[B, L]``."""
    start = torch.randint(0, data.numel() - L - 1, (B,), generator=gen, device=gen.device)
    idx = start[:, None] + torch.arange(L + 1, device=data.device)
    chunk = data[idx]  # [B, L+1]
    return chunk[:, :-1], chunk[:, 1:]


def val_batches(data: torch.Tensor, n_windows: int, L: int, batch: int):
    """The validation stream cut by :func:`common.eval_windows`, batched by equal length: ``[b, l+1]``."""
    spans = eval_windows(data.numel(), L)
    if n_windows:
        spans = spans[:n_windows]
    by_len: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        by_len.setdefault(e - s, []).append((s, e))
    for length, group in by_len.items():
        for i in range(0, len(group), batch):
            starts = torch.tensor([s for s, _ in group[i:i + batch]], device=data.device)
            yield data[starts[:, None] + torch.arange(length, device=data.device)]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student); logits ``[..., V]``."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def evaluate(model, teacher, val: torch.Tensor, cfg: TrainConfig, device) -> dict:
    """Validation cross-entropy (and, with a teacher, KL and greedy agreement) over the held-out works."""
    model.eval()
    tot = {"nll": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    for chunk in val_batches(val, cfg.eval_windows, cfg.seq_len, cfg.eval_batch):
        x, y = chunk[:, :-1], chunk[:, 1:]
        with autocast(device):
            logits = model(x)
            t_logits = teacher(x) if teacher is not None else None
        n = y.numel()
        tot["nll"] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        if t_logits is not None:
            tot["kl"] += kl_to_teacher(logits, t_logits).item() * n
            tot["agree"] += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
        tot["n"] += n
    model.train()
    out = {"val_loss": tot["nll"] / tot["n"], "val_tokens": tot["n"]}
    out["val_ppl"] = math.exp(out["val_loss"])
    if teacher is not None:
        out["val_kl"] = tot["kl"] / tot["n"]
        out["val_agreement"] = tot["agree"] / tot["n"]
    return out


def load_teacher(path: Path, device) -> CausalLM:
    """The target, from its training checkpoint (``best.pt``) or an exported HF folder."""
    if path.is_dir():
        from common import read_json
        from modeling import load_hf_state_dict
        from safetensors.torch import load_file

        cfg = read_json(path / "config.json")
        spec = MODELS[TARGET]
        assert cfg["hidden_size"] == spec.hidden_size, f"{path} is not the {TARGET} model"
        teacher = CausalLM(spec)
        load_hf_state_dict(teacher, {k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    else:
        from export import load_checkpoint

        teacher, _ = load_checkpoint(path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def train(name: str, cfg: TrainConfig, data_dir: Path, run_dir: Path, device: torch.device,
          teacher_path: Path | None = None) -> dict:
    spec = MODELS[name]
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_ids = torch.from_numpy(load_tokens("train", data_dir)).to(device)
    val_ids = torch.from_numpy(load_tokens("val", data_dir)).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    model = CausalLM(spec, dropout=cfg.dropout).to(device).train()
    teacher = None
    if name == DRAFT:
        # Default: the target trained in this work folder; else the target already in the package.
        if teacher_path is None:
            teacher_path = run_dir.parent / TARGET / "best.pt"
            if not teacher_path.exists() and (PACKAGE_MODELS / TARGET / "config.json").exists():
                teacher_path = PACKAGE_MODELS / TARGET
        print(f"[{name}] teacher: {teacher_path}", flush=True)
        teacher = load_teacher(teacher_path, device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")

    step_fn = model
    if cfg.compile:
        try:
            step_fn = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - any failure: train eagerly
            print(f"[{name}] torch.compile unavailable ({type(e).__name__}: {e}); training eagerly", flush=True)

    B, L = cfg.batch_size, cfg.seq_len
    steps_per_epoch = max(1, train_ids.numel() // (B * L))
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch) if cfg.evals_per_epoch else max(1, cfg.max_steps // 2)
    max_steps = int(cfg.max_epochs * steps_per_epoch)
    if cfg.max_steps:
        max_steps = min(max_steps, cfg.max_steps)

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train_log.jsonl"
    log_path.write_text("")
    n_params = num_parameters(model)
    print(f"[{name}] {n_params:,} parameters on {device}; {train_ids.numel():,} train / {val_ids.numel():,} val "
          f"tokens; {steps_per_epoch} steps per epoch of {B}x{L}; eval every {eval_every} steps", flush=True)

    def loss_fn(x, y):
        with autocast(device):
            logits = step_fn(x)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss = ce
            if teacher is not None and cfg.distill_alpha > 0:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = cfg.distill_alpha * kl_to_teacher(logits, t_logits) + (1 - cfg.distill_alpha) * ce
            if spec.is_moe:
                loss = loss + cfg.aux_loss_coef * model.aux_loss()
        return loss, ce

    def metric(ev: dict) -> float:  # what early stopping watches
        return ev["val_kl"] if teacher is not None and cfg.distill_alpha > 0 else ev["val_loss"]

    t0 = time.perf_counter()
    best = evaluate(model, teacher, val_ids, cfg, device) | {"step": 0, "epoch": 0.0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr_scale, bad, decays, step, stop_reason = 1.0, 0, 0, 0, "max_epochs"
    train_loss_sum, train_loss_n = 0.0, 0
    history = []
    while step < max_steps:
        x, y = sample_batch(train_ids, B, L, gen)
        lr = cfg.lr * lr_scale * min(1.0, (step + 1) / cfg.warmup_steps)
        if cfg.decay_frac > 0:  # anneal towards the end of the wall-clock budget
            left = cfg.time_budget_s - (time.perf_counter() - t0)
            lr *= min(1.0, max(0.0, left) / (cfg.decay_frac * cfg.time_budget_s))
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            loss, ce = loss_fn(x, y)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - a compiled graph that fails falls back to eager
            if step_fn is model:
                raise
            print(f"[{name}] torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly", flush=True)
            opt.zero_grad(set_to_none=True)
            step_fn = model
            loss, ce = loss_fn(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_loss_sum += ce.detach()
        train_loss_n += 1

        elapsed = time.perf_counter() - t0
        out_of_time = elapsed > cfg.time_budget_s
        if step % eval_every == 0 or step == max_steps or out_of_time:
            ev = evaluate(model, teacher, val_ids, cfg, device)
            ev |= {"step": step, "epoch": round(step / steps_per_epoch, 3), "lr": lr,
                   "train_loss": float(train_loss_sum) / train_loss_n, "elapsed_s": round(elapsed, 1),
                   "tokens_per_s": round(step * B * L / elapsed)}
            if spec.is_moe:
                ev["expert_load"] = [[round(f, 3) for f in layer] for layer in model.expert_load()]
            train_loss_sum, train_loss_n = 0.0, 0
            improved = metric(ev) < metric(best) - cfg.min_delta
            if improved:
                best, bad = dict(ev), 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            ev["best"] = improved
            history.append(ev)
            with log_path.open("a") as f:
                f.write(json.dumps(ev) + "\n")
            extra = f" kl {ev['val_kl']:.4f} agree {ev['val_agreement']:.3f}" if teacher is not None else ""
            print(f"[{name}] step {step:5d} ep {ev['epoch']:5.2f} lr {lr:.2e} train {ev['train_loss']:.4f} "
                  f"val {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}){extra}{' *' if improved else ''} "
                  f"{elapsed:6.1f}s", flush=True)
            if out_of_time:
                stop_reason = "time_budget"
                break
            if bad >= cfg.patience:
                # Plateau: return to the best weights and continue with half the learning rate.
                if lr_scale / 2 < cfg.min_lr_scale:
                    stop_reason = "plateau"
                    break
                lr_scale, bad, decays = lr_scale / 2, 0, decays + 1
                model.load_state_dict(best_state)
                print(f"[{name}] plateau: back to step {best['step']}, learning rate x{lr_scale:g}", flush=True)
    if cfg.max_steps and step >= cfg.max_steps:
        stop_reason = "max_steps"

    wall = time.perf_counter() - t0
    summary = {
        "name": name, "spec": spec.to_dict(), "parameters": n_params, "device": device_name(device), "torch": str(torch.__version__),
        "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": asdict(cfg), "steps": step, "epochs": round(step / steps_per_epoch, 2),
        "steps_per_epoch": steps_per_epoch, "tokens_seen": step * B * L, "lr_halvings": decays,
        "stop_reason": stop_reason, "wall_s": round(wall, 1), "best": best,
        "train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()),
        "distilled_from": TARGET if teacher is not None else None,
    }
    torch.save({"spec": spec.to_dict(), "state_dict": {k: v.cpu() for k, v in best_state.items()},
                "summary": summary}, run_dir / "best.pt")
    write_json(run_dir / "summary.json", summary)
    print(f"[{name}] done: {stop_reason} after {step} steps ({summary['epochs']} epochs, {wall:.0f} s); best val "
          f"loss {best['val_loss']:.4f} (ppl {best['val_ppl']:.2f}) at epoch {best['epoch']}", flush=True)
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, choices=sorted(MODELS))
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="outputs (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--teacher", type=Path, help="draft only: the target's best.pt or HF folder "
                    "(default: WORK/runs/shakespeare/best.pt, else miniinfer/data/models/shakespeare)")
    ap.add_argument("--smoke", action="store_true", help="a few tiny steps, to check the pipeline on a CPU")
    for field, value in asdict(TrainConfig()).items():  # every hyperparameter can be overridden
        if isinstance(value, tuple):
            continue
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        ap.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None)
    args = ap.parse_args(argv)

    cfg = DEFAULTS[args.name]
    overrides = dict(SMOKE) if args.smoke else {}
    overrides |= {k: v for k, v in vars(args).items() if k in asdict(cfg) and v is not None}
    cfg = TrainConfig(**(asdict(cfg) | overrides))
    np.random.seed(cfg.seed)
    train(args.name, cfg, args.data, args.work / "runs" / args.name, pick_device(args.device), args.teacher)


if __name__ == "__main__":
    main()
