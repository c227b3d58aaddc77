"""``quantize_model``: replace a Qwen2 model's linear layers by quantized ones, in place.

    quantize_model(model, "int8")                     # weight-only int8, per channel (symmetric=False: asym)
    quantize_model(model, "w8a8")                     # int8 weights and per-token int8 activations
    quantize_model(model, "int4", group_size=128)     # RTN int4 groups (bits=3: int3)
    quantize_model(model, "gptq", calibration=ids)    # GPTQ int4 g128 (act_order=True available)
    quantize_model(model, "fp8")                      # FP8 E4M3 weights and activations (fmt="e5m2")
    quantize_model(model, "qat", calibration=ids)     # a short distillation fine-tune through fake
                                                      # quantization, then RTN int4

What stays in floating point, and why (mixed precision): the embedding table, which is also the LM
head of the tied bundled models (a lookup reads one row per token: it costs nothing at decode, and
the head's logits feed the sampler directly, where small errors flip tokens); the RMSNorm gains and
the biases (tiny); attention itself (activations, not weights). The four matmuls of every layer —
``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` — hold almost all the bytes read per token.

``weight_fn`` is the plug-in seam for your own quantizer (chapter 11): ``weight_fn(w [N, K]) -> (q [N, K]
integers in [0, 2**bits), scale [N, K // g], zero [N, K // g])``; the layers are built from what it returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from miniinfer.quant.gptq import gptq_quantize
from miniinfer.quant.linear import FP8Linear, GroupQuantLinear, Int8Linear, W8A8Linear

__all__ = ["METHODS", "quantize_model", "quantizable_linears", "collect_hessians", "gptq_quantize_model",
           "group_linear_from_weight_fn"]

METHODS = ("int8", "w8a8", "int4", "rtn", "gptq", "fp8", "qat")
LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Dotted names of the decoder layers' four matmuls, in forward order."""
    return [f"model.layers.{i}.{name}" for i in range(len(model.model.layers)) for name in LINEAR_NAMES]


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _calibration_windows(model: nn.Module, calibration, window: int) -> torch.Tensor:
    if calibration is None:
        raise ValueError("this method needs calibration token ids (calibration=[...] or a [n, L] tensor); "
                         "miniinfer.quant.data.calibration_evaluation_split() gives Shakespeare text for the "
                         "bundled models")
    from miniinfer.quant.data import token_windows

    calibration = torch.as_tensor(calibration, dtype=torch.long)
    return calibration if calibration.dim() == 2 else token_windows(calibration, window)


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch: int = 8
                     ) -> dict[str, torch.Tensor]:
    """H = 2 XᵀX / n (float64, [K, K]) of the inputs X [n, K] that each named linear sees while ``model``
    runs over ``windows`` [n_windows, L]."""
    sums, counts, hooks = {}, {}, []

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch):
            model(windows[i:i + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: 2 * sums[name] / counts[name] for name in names}


def _group_linear(linear: nn.Linear, result, bits: int, group_size: int) -> GroupQuantLinear:
    return GroupQuantLinear(result.q.t().contiguous(), result.scales.t().contiguous().to(linear.weight.dtype),
                            result.zeros.t().contiguous(), bits, group_size, linear.bias, g_idx=result.g_idx)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, windows: torch.Tensor, bits: int = 4, group_size: int = 128,
                        symmetric: bool = False, act_order: bool = False, percdamp: float = 0.3,
                        log: Callable | None = None) -> nn.Module:
    """Layer by layer: the Hessians of a layer's four linears come from a forward pass in which every
    earlier layer is already quantized (so each layer corrects for the errors before it).

    Defaults for the bundled models' small calibration set (~3.5k tokens): ``percdamp`` 0.3 rather than
    the paper's 0.01, because a lightly damped Hessian of few samples over-fits them, and no
    ``act_order``. Chosen by a sweep (0.01/0.03/0.1/0.3 × act_order) whose held-out perplexities moved
    by ±0.4 at int4 — noise-sized on this 4 M-parameter model (see scripts/quant_quality.py's notes);
    for real checkpoints with 128 × 2048 calibration tokens use 0.01 and act_order=True."""
    for i in range(len(model.model.layers)):
        names = [f"model.layers.{i}.{name}" for name in LINEAR_NAMES]
        hessians = collect_hessians(model, names, windows)
        for name in names:
            linear = model.get_submodule(name)
            K = linear.in_features
            g = min(group_size, K) if group_size else K
            result = gptq_quantize(linear.weight.float(), hessians[name].float(), bits, g, symmetric, act_order,
                                   percdamp=percdamp)
            _replace(model, name, _group_linear(linear, result, bits, g))
        if log is not None:
            log(f"GPTQ layer {i} done")
    return model


def group_linear_from_weight_fn(linear: nn.Linear, weight_fn: Callable, bits: int) -> GroupQuantLinear:
    """Build a :class:`GroupQuantLinear` from your quantizer's ``(q [N, K], scale [N, G], zero [N, G])``."""
    w = linear.weight.detach().float()
    q, scale, zero = weight_fn(w)
    q = torch.as_tensor(q).to(torch.int32)
    scale, zero = torch.as_tensor(scale).float(), torch.as_tensor(zero)
    N, K = w.shape
    if tuple(q.shape) != (N, K) or scale.dim() != 2 or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"weight_fn must return q [N, K] = [{N}, {K}] and scale/zero [N, G] with G dividing K; "
                         f"got q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    if int(q.min()) < 0 or int(q.max()) >= 2**bits:
        raise ValueError(f"weight_fn's q must hold unsigned {bits}-bit integers (0 … {2**bits - 1}); "
                         f"got values in [{int(q.min())}, {int(q.max())}] (store symmetric q as q + 2**(bits−1))")
    zero = torch.broadcast_to(torch.round(zero.float()), scale.shape).to(torch.int32)
    return GroupQuantLinear(q.t().contiguous(), scale.t().contiguous().to(linear.weight.dtype),
                            zero.t().contiguous(), bits, K // scale.shape[1], linear.bias)


def quantize_model(model: nn.Module, method: str, bits: int | None = None, group_size: int | None = 128, *,
                   symmetric: bool | None = None, calibration=None, act_order: bool = False, fmt: str = "e4m3",
                   qat_steps: int = 60, qat_lr: float = 2e-4, calibration_window: int = 256,
                   weight_fn: Callable | None = None, log: Callable | None = None) -> nn.Module:
    """Quantize the decoder layers' linears of ``model`` in place (see the module docstring). -> model.

    bits: 8 for int8/w8a8, 4 (default) or 2/3/8 for int4/rtn/gptq/qat; group_size: inputs per scale for
    the group methods (None: per channel); symmetric: default True for int8, False (asymmetric) for the
    group methods; calibration: token ids [N] (cut into ``calibration_window`` windows) or [n, L], needed
    by gptq and qat; fmt: "e4m3" or "e5m2" for fp8; weight_fn: your own quantizer (group methods).
    """
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    names = quantizable_linears(model)
    if method in ("int8", "w8a8"):
        if bits not in (None, 8):
            raise ValueError(f"{method} quantizes to 8 bits, got bits={bits}")
        for name in names:
            linear = model.get_submodule(name)
            new = (Int8Linear.from_linear(linear, symmetric=True if symmetric is None else symmetric)
                   if method == "int8" else W8A8Linear.from_linear(linear))
            _replace(model, name, new)
        return model
    if method == "fp8":
        for name in names:
            _replace(model, name, FP8Linear.from_linear(model.get_submodule(name), fmt))
        return model
    bits = 4 if bits is None else bits
    symmetric = False if symmetric is None else symmetric
    if method == "gptq":
        windows = _calibration_windows(model, calibration, calibration_window)
        return gptq_quantize_model(model, windows, bits, group_size or 0, symmetric, act_order, log=log)
    if method == "qat":
        from miniinfer.quant.qat import qat_finetune

        windows = _calibration_windows(model, calibration, calibration_window)
        qat_finetune(model, windows, names, bits=bits, group_size=group_size, symmetric=symmetric,
                     steps=qat_steps, lr=qat_lr, log=log)
    for name in names:  # int4 / rtn / qat's final rounding
        linear = model.get_submodule(name)
        if weight_fn is not None:
            new = group_linear_from_weight_fn(linear, weight_fn, bits)
        else:
            new = GroupQuantLinear.from_linear(linear, bits, group_size or 0, symmetric)
        _replace(model, name, new)
    return model


LLM_METHODS = ("int8", "w8a8", "int4", "gptq", "fp8")


def quantize_for_llm(model: nn.Module, tokenizer, quantization: str, path) -> nn.Module:
    """What ``LLM(path, quantization=...)`` does after loading: int4 and gptq are 4-bit, group 128,
    asymmetric; gptq calibrates on the held-out calibration text (:mod:`miniinfer.quant.data`). A
    checkpoint that is already GPTQ-quantized accepts ``quantization="gptq"`` (nothing to do) only."""
    from miniinfer.loader import resolve_model_path
    from miniinfer.quant.checkpoint import quantization_config

    if quantization not in LLM_METHODS:
        raise ValueError(f"quantization must be one of {LLM_METHODS} or None, got {quantization!r}")
    try:
        prequantized = quantization_config(resolve_model_path(path)) is not None
    except Exception:  # noqa: BLE001 - a hub id offline: not a local GPTQ folder
        prequantized = False
    if prequantized:
        if quantization != "gptq":
            raise ValueError(f"{path} is already a GPTQ checkpoint; use quantization='gptq' or None")
        return model
    calibration = None
    if quantization == "gptq":
        if tokenizer is None:
            raise ValueError("quantization='gptq' calibrates on text and this model has no tokenizer")
        from miniinfer.quant.data import calibration_evaluation_split

        calibration = tokenizer.encode(calibration_evaluation_split()[0])
    return quantize_model(model, quantization, calibration=calibration)
