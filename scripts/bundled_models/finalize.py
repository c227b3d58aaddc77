"""Step 6 (CPU): install the GPU run's models into the package and write their model cards.

    python scripts/bundled_models/finalize.py --from DIR [--dest miniinfer/data/models] [--data DIR]

``DIR`` holds what run_gpu.sh wrote (``<name>.tar.gz`` x 3 and ``metrics.json``). For each model this
unpacks the HF folder into ``DEST/<name>/`` (replacing what was there) and the training record into
``scripts/bundled_models/runs/<name>/``, then re-measures every model with transformers on the CPU in
fp32 (the held-out works, the committed test slice, the draft's agreement with the target, seeded
samples) and writes the model card with both the GPU and the CPU numbers. The tests later recompute
the CPU test-slice numbers from the card.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

import torch
from common import DATA_DIR, DRAFT, HERE, MODELS, PACKAGE_MODELS, TARGET, ModelSpec, read_json, write_json
from model_card import render_card

SIZE_LIMIT = 20_000_000  # bytes, all bundled folders together
RUNS = HERE / "runs"  # the committed training records (logs, summaries, metrics)


def unpack(tarball: Path, name: str, dest: Path, runs: Path) -> Path:
    """Extract ``<name>/*`` into ``dest/<name>/`` and ``training/<name>/*`` into ``runs/<name>/``.

    Only plain files at those two places are accepted (no links, no ``..``): the archive came from
    another machine.
    """
    folder, record = dest / name, runs / name
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            ok = m.isfile() and (len(parts) == 2 and parts[0] == name or
                                 len(parts) == 3 and parts[:2] == ("training", name))
            if not ok and not m.isdir():
                raise ValueError(f"{tarball}: unexpected member {m.name!r}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        record.mkdir(parents=True, exist_ok=True)
        for m in members:
            if m.isfile():
                parts = Path(m.name).parts
                target = folder / parts[1] if parts[0] == name else record / parts[2]
                target.write_bytes(tar.extractfile(m).read())
                target.chmod(0o644)
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", type=Path, required=True, help="folder with the GPU run's files")
    ap.add_argument("--dest", type=Path, default=PACKAGE_MODELS, help="where the model folders go (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data, for the full validation set")
    ap.add_argument("--runs", type=Path, default=RUNS, help="where the training records go (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=[TARGET, DRAFT, "shakespeare-moe"], choices=sorted(MODELS))
    ap.add_argument("--no-val", action="store_true", help="re-measure only the test slice (no prepared data needed)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from evaluate import evaluate_folder  # imports transformers

    report = read_json(args.src / "metrics.json")
    folders = {}
    for name in args.models:
        entry = report["models"].get(name, {})
        if "error" in entry or not (args.src / f"{name}.tar.gz").exists():
            raise SystemExit(f"{name}: the GPU run has no result ({entry.get('error', 'tarball missing')})")
        folders[name] = unpack(args.src / f"{name}.tar.gz", name, args.dest, args.runs)
        print(f"{name}: unpacked into {folders[name]}")

    for name in args.models:  # the target first: the draft is measured against it
        entry = report["models"][name]
        target = (folders.get(TARGET) or args.dest / TARGET) if name == DRAFT else None
        cpu = evaluate_folder(folders[name], args.data, target=target, device="cpu", with_samples=True,
                              val=not args.no_val)
        cpu["torch_threads"] = torch.get_num_threads()
        write_json(args.runs / name / "cpu_metrics.json", cpu)
        gpu = entry["gpu"]
        for split in ("val", "test_slice"):
            if split in cpu and split in gpu:
                delta = cpu[split]["loss"] - gpu[split]["loss"]
                flag = "" if abs(delta) < 1e-3 else "  <-- larger than expected for fp32 on both sides"
                print(f"{name} {split}: loss CPU {cpu[split]['loss']:.5f} vs GPU {gpu[split]['loss']:.5f} "
                      f"(delta {delta:+.1e}); ppl {cpu[split]['ppl']:.3f}{flag}")
        if "agreement" in cpu["test_slice"]:
            print(f"{name}: greedy agreement with {TARGET} {cpu['test_slice']['agreement']:.3f} (test slice)"
                  + (f", {cpu['val']['agreement']:.3f} (held-out works)" if "val" in cpu else ""))
        info = {"train": entry["train"], "gpu": gpu, "cpu": cpu, "corpus": report.get("corpus"),
                "command": report.get("command")}
        spec = ModelSpec(**entry["train"]["spec"]) if "spec" in entry["train"] else MODELS[name]
        (folders[name] / "README.md").write_text(render_card(spec, info))

    sizes = {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in sorted(args.dest.iterdir()) if d.is_dir()}
    total = sum(sizes.values())
    print("sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()) + f"; total {total / 1e6:.2f} MB")
    if total > SIZE_LIMIT:
        raise SystemExit(f"the bundled models take {total / 1e6:.2f} MB, more than {SIZE_LIMIT / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
