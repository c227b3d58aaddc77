"""Quantization-aware training: fine-tune *through* the rounding, so the weights learn to sit where
rounding hurts least.

The forward pass uses fake-quantized weights, ``dequantize(quantize(w))``, exactly what the int4 model
will compute with. Rounding has zero gradient almost everywhere, so the backward pass pretends it is
the identity: the straight-through estimator (Bengio et al., 2013),

    fake_quantize_ste(w) = w + (dequantize(quantize(w)) − w).detach()

whose value is the quantized weight and whose gradient with respect to w is 1. The float weights
keep receiving small updates, and every time one crosses a rounding boundary the quantized model
changes. The loss here is distillation (as in LLM-QAT, Liu et al., 2023): the KL divergence from the
float model's next-token distribution, so the quantized student learns to *behave like the
original*, not to fit the calibration text.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from miniinfer.quant.quantize import quantize_dequantize

__all__ = ["fake_quantize_ste", "FakeQuantLinear", "qat_finetune"]


def fake_quantize_ste(w: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                      symmetric: bool = False) -> torch.Tensor:
    """Forward: the RTN-quantized weight; backward: the identity (straight-through estimator)."""
    with torch.no_grad():
        g = group_size if not group_size or w.shape[-1] % group_size == 0 else None
        wq = quantize_dequantize(w, bits, symmetric=symmetric, group_size=g)
    return w + (wq - w).detach()


class FakeQuantLinear(nn.Module):
    """A linear layer whose float ``weight`` is fake-quantized in every forward (trainable)."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, symmetric: bool = False):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_ste(self.weight, self.bits, self.group_size, self.symmetric)
        return F.linear(x, w, self.bias)

    def to_linear(self) -> nn.Linear:
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device=self.weight.device,
                           dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


def qat_finetune(model: nn.Module, windows: torch.Tensor, linear_names: list[str], *, bits: int = 4,
                 group_size: int | None = 128, symmetric: bool = False, steps: int = 60, lr: float = 2e-4,
                 batch: int = 4, seed: int = 0, log=None) -> dict:
    """Fine-tune the float weights of ``linear_names`` (dotted module names of ``model``) in place so that the
    fake-quantized model matches the original's distributions on ``windows`` [n, L] (token ids).
    Returns {"losses": [...]}; the layers are plain ``nn.Linear`` again afterwards (ready for RTN)."""
    teacher = copy.deepcopy(model).eval()
    fake = {}
    for name in linear_names:
        parent, attr = _parent(model, name)
        fake[name] = FakeQuantLinear(getattr(parent, attr), bits, group_size, symmetric)
        setattr(parent, attr, fake[name])
    params = [m.weight for m in fake.values()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = params[0].device
    losses = []
    with torch.no_grad():
        teacher_logp = [F.log_softmax(teacher(windows[i:i + batch].to(device)).float(), dim=-1)
                        for i in range(0, len(windows), batch)]
    for step in range(steps):
        b = int(torch.randint(len(teacher_logp), (1,), generator=generator))
        ids = windows[b * batch:(b + 1) * batch].to(device)
        with torch.enable_grad():
            student_logp = F.log_softmax(model(ids).float(), dim=-1)
            loss = F.kl_div(student_logp, teacher_logp[b], log_target=True, reduction="batchmean") / ids.shape[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(float(loss))
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"QAT step {step}: KL {losses[-1]:.4f}")
    for name, module in fake.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, module.to_linear())
    return {"losses": losses}


def _parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr
