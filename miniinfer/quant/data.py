"""Text for calibration and evaluation: the committed held-out Shakespeare slice, cut in two.

The bundled models never saw the validation works (Macbeth, Twelfth Night, Richard II); the
repository keeps ~32k characters of Macbeth (``tests/data/shakespeare_heldout_slice.txt``). We cut it
at a blank line about a third of the way in: the first part calibrates (GPTQ's Hessians, QAT's
distillation), the rest is the evaluation text of every perplexity in chapter 11. No method sees the
text it is scored on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["heldout_text", "calibration_evaluation_split", "token_windows", "perplexity"]

CALIBRATION_FRACTION = 1 / 3


def heldout_text() -> str:
    path = Path(__file__).resolve().parents[2] / "tests" / "data" / "shakespeare_heldout_slice.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the calibration/evaluation text comes with a source checkout "
                                "of miniinfer (git clone); pass your own calibration token ids instead")
    return path.read_text(encoding="utf-8")


def calibration_evaluation_split(text: str | None = None) -> tuple[str, str]:
    """-> (calibration text, evaluation text), cut at the first blank line after a third of the text."""
    text = heldout_text() if text is None else text
    cut = text.find("\n\n", int(len(text) * CALIBRATION_FRACTION))
    cut = len(text) // 3 if cut < 0 else cut + 2
    return text[:cut], text[cut:]


def token_windows(ids: torch.Tensor | list[int], length: int) -> torch.Tensor:
    """ids [N] -> [N // length, length] (the tail that does not fill a window is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor | list[int], window: int = 256, batch: int = 8) -> float:
    """exp(mean next-token NLL) of ``model`` over ``ids`` [N], cut into windows of ``window + 1`` tokens
    (each window a fresh context, ``window`` predictions)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = (ids.numel() - 1) // window
    if n < 1:
        raise ValueError(f"need more than {window} tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = [ids[i * window: i * window + window + 1] for i in range(start, min(n, start + batch))]
        chunk = torch.stack(rows).to(device)
        logits = model(chunk[:, :-1]).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
