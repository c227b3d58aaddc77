"""Step 4: a training checkpoint -> a Hugging Face model folder, checked against transformers.

    python scripts/bundled_models/export.py --name shakespeare [--work DIR] [--data DIR] [--out DIR]

Reads ``WORK/runs/<name>/best.pt`` (train.py) and the tokenizer from ``DATA/tokenizer/``; writes
``OUT`` (default ``WORK/export/<name>``):

    config.json  generation_config.json  model.safetensors (bf16)  tokenizer.json
    tokenizer_config.json  README.md (the model card; finalize.py adds the final numbers)

Then it loads the folder with ``transformers.AutoModelForCausalLM`` (offline, fp32, CPU) and checks
that its logits equal the training module's (with the same bf16-rounded weights) on random ids.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch
from common import DATA_DIR, GENERATION_CONFIG, WORK_DIR, ModelSpec, hf_config, write_json
from modeling import CausalLM, hf_state_dict
from safetensors.torch import save_file

HF_TOLERANCE = 1e-3  # max |logit difference| in fp32; typical is ~1e-5 (summation order only)


def load_checkpoint(path: Path) -> tuple[CausalLM, dict]:
    """A ``best.pt`` from train.py -> (model in eval mode on CPU, fp32; the training summary)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = CausalLM(ModelSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt.get("summary", {})


def round_to_bf16(model: CausalLM) -> CausalLM:
    """A copy whose weights went through bf16 storage and back: what the exported folder holds."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def write_folder(model: CausalLM, out: Path, tokenizer_dir: Path, card: str | None = None) -> Path:
    """Write the HF folder for ``model`` (weights stored in bf16: half the bytes, ample precision)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; it ships in a wheel
    write_json(out / "config.json", hf_config(model.spec))
    write_json(out / "generation_config.json", GENERATION_CONFIG)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    if card is None:
        from model_card import render_card  # lazy: the card module needs nothing else from here
        card = render_card(model.spec, {})
    (out / "README.md").write_text(card)
    return out


def verify_with_hf(model: CausalLM, folder: Path, seed: int = 0) -> float:
    """Max |logits(HF folder) - logits(model with bf16-rounded weights)| on random ids, CPU fp32.

    Raises if transformers reports missing or unexpected tensors or the difference is too large.
    """
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "mismatched_keys" or (k == "mismatched_keys" and v)}
    if problems:
        raise RuntimeError(f"transformers loaded {folder} with problems: {problems}")
    ref = round_to_bf16(model).cpu().eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (2, 96), generator=g)
    with torch.no_grad():
        diff = (hf(ids).logits.float() - ref(ids)).abs().max().item()
    if not diff < HF_TOLERANCE:
        raise RuntimeError(f"{folder}: HF logits differ from the training module by {diff:.2e} "
                           f"(tolerance {HF_TOLERANCE:g})")
    return diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="training outputs (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="prepared data (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="output folder (default: WORK/export/NAME)")
    args = ap.parse_args(argv)

    model, summary = load_checkpoint(args.work / "runs" / args.name / "best.pt")
    out = args.out or args.work / "export" / args.name
    from model_card import render_card

    write_folder(model, out, args.data / "tokenizer", card=render_card(model.spec, {"train": summary}))
    diff = verify_with_hf(model, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{args.name}: exported to {out} ({size / 1e6:.2f} MB); HF logits match (max diff {diff:.1e})")


if __name__ == "__main__":
    main()
