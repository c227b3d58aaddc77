"""Steps 3-5 for all three models in one process: train, export (checked against HF), measure, pack.

    python scripts/bundled_models/pipeline.py --out DIR [--models NAME ...] [--smoke] [--device cpu]

This is what ``run_gpu.sh`` runs on the GPU machine. It needs only ``DATA`` (tokenizer + token ids,
see prepare_corpus.py / train_tokenizer.py) and writes at most five files into ``DIR``:

    <name>.tar.gz   per model: the finished HF folder <name>/ and training/<name>/{train_log.jsonl,
                    summary.json, gpu_metrics.json}
    metrics.json    everything measured, for finalize.py and the model cards

Models run in the order target, draft (distilled from the target just trained), MoE. A model that
fails is reported in metrics.json and the others still run; a global deadline shrinks the training
budgets so the whole command ends inside the GPU machine's 10-minute limit.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from common import DATA_DIR, DRAFT, PACKAGE_MODELS, TARGET, WORK_DIR, corpus_summary, write_json

ORDER = [TARGET, DRAFT, "shakespeare-moe"]
RESERVE_S = 45.0  # export + HF evaluation + packing of one model, with margin


def pack(out_dir: Path, name: str, folder: Path, run_dir: Path, gpu_metrics: dict) -> Path:
    """``out_dir/<name>.tar.gz``: the HF folder as ``<name>/``, the training record as ``training/<name>/``."""
    path = out_dir / f"{name}.tar.gz"

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:  # no owner names, readable by everyone
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"{name}/{f.name}", filter=clean)
        for f in ("train_log.jsonl", "summary.json"):
            if (run_dir / f).exists():
                tar.add(run_dir / f, arcname=f"training/{name}/{f}", filter=clean)
        data = json.dumps(gpu_metrics, indent=2).encode()
        info = clean(tarfile.TarInfo(f"training/{name}/gpu_metrics.json"))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def parse_overrides(items: list[str], name: str) -> dict:
    """``["lr=1e-3", "shakespeare-moe:dropout=0.2"]`` -> the TrainConfig overrides that apply to ``name``."""
    from train import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        scope, _, key = key.rpartition(":")
        if key not in fields or isinstance(getattr(TrainConfig(), key), tuple):
            raise SystemExit(f"--set {item}: unknown hyperparameter {key!r}")
        if scope and scope != name:
            continue
        default = getattr(TrainConfig(), key)
        out[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return out


def run_model(name: str, args, deadline: float, n_left: int) -> dict:
    import train as train_step
    from evaluate import evaluate_folder
    from export import load_checkpoint, verify_with_hf, write_folder
    from model_card import render_card

    cfg = train_step.DEFAULTS[name]
    overrides = (dict(train_step.SMOKE) if args.smoke else {}) | parse_overrides(args.set, name)
    budget = min(overrides.get("time_budget_s", cfg.time_budget_s), deadline - time.time() - RESERVE_S * n_left)
    if budget < 10:
        raise RuntimeError(f"no time left to train {name} ({budget:.0f} s before the deadline)")
    cfg = train_step.TrainConfig(**(asdict(cfg) | overrides | {"time_budget_s": budget}))
    device = train_step.pick_device(args.device)
    run_dir = args.work / "runs" / name

    summary = train_step.train(name, cfg, args.data, run_dir, device)
    model, _ = load_checkpoint(run_dir / "best.pt")
    folder = args.work / "export" / name
    write_folder(model, folder, args.data / "tokenizer", card=render_card(model.spec, {"train": summary}))
    diff = verify_with_hf(model, folder)
    print(f"[{name}] exported {folder}; transformers reproduces the logits (max diff {diff:.1e})", flush=True)

    target = None
    if name == DRAFT:  # measured against the target it was distilled from (see train.train)
        target = args.work / "export" / TARGET
        if not (args.work / "runs" / TARGET / "best.pt").exists():
            target = PACKAGE_MODELS / TARGET
    t0 = time.perf_counter()
    metrics = evaluate_folder(folder, args.data, target=target, device=str(device), with_samples=True)
    metrics["hf_logits_max_diff"] = diff
    metrics["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    v = metrics["val"]
    extra = f", agreement {v['agreement']:.3f}" if "agreement" in v else ""
    print(f"[{name}] HF fp32 on {metrics['device']}: val loss {v['loss']:.4f} ppl {v['ppl']:.2f}{extra}", flush=True)
    for s in metrics["samples"][:1]:
        print(f"[{name}] sample:\n{s['prompt']}{s['completion']}\n", flush=True)

    # The card inside the tarball already has the GPU numbers; finalize.py adds the CPU re-run.
    (folder / "README.md").write_text(render_card(model.spec, {"train": summary, "gpu": metrics,
                                                               "corpus": corpus_summary(args.data),
                                                               "command": args.command}))
    tarball = pack(args.out, name, folder, run_dir, metrics)
    print(f"[{name}] packed {tarball} ({tarball.stat().st_size / 1e6:.2f} MB)", flush=True)
    return {"train": summary, "gpu": metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where the tarballs and metrics.json go")
    ap.add_argument("--models", nargs="+", choices=ORDER, default=ORDER)
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="scratch space (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--smoke", action="store_true", help="a few tiny training steps per model (CPU check)")
    ap.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                    help="override a training hyperparameter (train.TrainConfig), e.g. compile=true, "
                         "shakespeare:dropout=0.15; repeatable")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="finish within this many seconds")
    ap.add_argument("--command", help="how this run was started, for the model cards "
                    "(default: run_gpu.sh with this command's options but --out)")
    args = ap.parse_args(argv)
    for name in args.models:
        parse_overrides(args.set, name)  # fail now on a typo, not after the first model
    if args.command is None:
        argv = sys.argv[1:] if argv is None else argv
        kept = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
        args.command = " ".join(["bash scripts/bundled_models/run_gpu.sh"] + kept)
    start = time.time()
    deadline = start + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)

    env = {"python": platform.python_version(), "torch": str(torch.__version__), "platform": platform.platform(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"environment: {env}", flush=True)
    report = {"command": args.command, "argv": sys.argv, "smoke": args.smoke, "environment": env,
              "corpus": corpus_summary(args.data), "models": {}}
    failed = []
    todo = [m for m in ORDER if m in args.models]
    for i, name in enumerate(todo):
        t0 = time.time()
        try:
            report["models"][name] = run_model(name, args, deadline, n_left=len(todo) - i)
        except Exception as e:  # noqa: BLE001 - record it, carry on with the next model
            traceback.print_exc()
            report["models"][name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        report["models"][name]["pipeline_wall_s"] = round(time.time() - t0, 1)
        report["wall_s"] = round(time.time() - start, 1)
        write_json(args.out / "metrics.json", report)  # after every model: a timeout still leaves results
    print(f"done in {time.time() - start:.0f} s; " + (f"FAILED: {failed}" if failed else "all models OK"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
