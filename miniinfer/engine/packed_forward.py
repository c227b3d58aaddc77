"""The engine's CPU fast path: the model's forward with its matmuls on oneDNN-prepacked weights.

On a CPU ``F.linear`` hands a float32 matmul to MKL's GEMM, which is good at large square products and
poor at the shapes an engine step has: ``M`` = the step's tokens (one per sequence when decoding, 1 + γ
per sequence when verifying guesses, a few hundred in a prefill) against small weight matrices. With
the bundled model 5 rows cost about 4–5 × one row, 16 rows ~6 ×. oneDNN's inner-product primitive on a
weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` /
``_linear_pointwise``, what ``torch.compile`` emits for CPU linears) does the same products ~1.6 ×
faster at 4 rows and ~2 × from 16 rows up to prefill sizes (1024 rows). At one row the two matmuls are
about even in isolation, yet batch-1 decoding through the whole packed forward measured ~1.3 × faster
(part of that is :class:`~miniinfer.speculative.proposers.LeanForward`'s lighter Python per layer).

:class:`PackedForward` is :class:`~miniinfer.speculative.proposers.LeanForward` (the model's forward as
one flat function: same contract, same math, less Python per layer) with those matmuls. The model
runner calls it for every eager CPU step — prefill, decode and speculative verify — when
``EngineConfig.cpu_packed_weights`` is True (or ``"auto"``, the default, and it measures faster) and :meth:`PackedForward.supports` the model:
float32 on the CPU, oneDNN built in, a Qwen2 / Llama model on the default components, plain
``nn.Linear`` layers, no per-head q/k norms. Anything else, and any step where :meth:`PackedForward.usable`
says the model changed under it (its components replaced, a layer swapped — ``quantize_model`` after
the engine was built —, a forward hook added), runs the model's own forward. In-place weight updates
(``load_state_dict``, ``weight.mul_``) bump a tensor's version counter: the packs are rebuilt before
the next step.

Results are the model's up to float rounding (a different summation order), so a greedy text can
differ from the unpacked path's where two logits nearly tie; ``cpu_packed_weights=False`` gives the
model's own forward everywhere.

Which path is faster depends on the CPU: the figures above are from one machine; on another (a Xeon
with AVX-512 and AMX) oneDNN's inner product cost ~13–17 µs per call at 1–5 rows against 2–8 µs for
MKL, and batch-1 decoding through the model's own forward was ~1.25 × faster than the packed one. So
``cpu_packed_weights="auto"`` (the default) measures: :func:`choose_packed_forward` times both forwards
once on decode-shaped inputs (1 and 16 rows; attention left out, it is the same on both paths) and
keeps the faster, a decision cached for the process per model shape, dtype and torch thread count.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import weakref

import torch
from torch import nn

__all__ = ["PackedForward", "choose_packed_forward", "measure_packed_forward", "packed_forward_for"]

log = logging.getLogger("miniinfer.engine.packed_forward")


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with ``weight`` = w reordered by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _lean_forward():
    # Imported lazily: the speculative package imports the engine's modules.
    from miniinfer.speculative.proposers import LeanForward

    return LeanForward


class PackedForward:
    """``forward(input_ids, positions, attention, logits_indices)`` of the model with packed weights."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        try:
            parameter = next(model.parameters())
        except (StopIteration, AttributeError, TypeError):
            return False
        if not (parameter.device.type == "cpu" and parameter.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and not getattr(model, "fused_kernels", True) and _lean_forward().supports(model)):
            return False
        return all(type(module) is nn.Linear for layer in model.model.layers
                   for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                  layer.mlp.down_proj))

    def __init__(self, model: nn.Module, warm_rows: int = 16):
        self._model = weakref.ref(model)  # not a strong reference: the packs are cached per model, weakly
        self._pack()
        self._warm(warm_rows)

    def _pack(self) -> None:
        model = self._model()
        lean = _lean_forward()(model)  # fresh references to the model's tensors
        self._components = model.components
        layers, sources = [], []
        for index, scale, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, w_down in lean.layers:
            sources += [w_qkv, w_o, w_gate_up, w_down]
            layers.append((index, scale, norm1, self._reorder(w_qkv), b_qkv, self._reorder(w_o), b_o, norm2,
                           self._reorder(w_gate_up), self._reorder(w_down)))
        sources.append(lean.head)
        lean.head = self._reorder(lean.head)
        lean.layers = layers
        lean.linear = _packed_linear
        self._lean = lean
        self._sources = sources
        self._stamps = self._stamp()
        self._structure = self._links(model)

    @staticmethod
    def _links(model: nn.Module) -> tuple[list, list]:
        """What the packs were built from: (container dict, key, object) links from the model down to every
        weight, and the modules whose hooks would be skipped. ``usable`` checks both before each step."""
        links, modules = [], [model, model.model]
        inner = model.model
        links += [(model._modules, "model", inner), (inner._modules, "layers", inner.layers),
                  (inner._modules, "embed_tokens", inner.embed_tokens), (inner._modules, "norm", inner.norm),
                  (inner.embed_tokens._parameters, "weight", inner.embed_tokens.weight),
                  (inner.norm._parameters, "weight", inner.norm.weight)]
        if model.lm_head is not None:
            links += [(model._modules, "lm_head", model.lm_head),
                      (model.lm_head._parameters, "weight", model.lm_head.weight)]
            modules.append(model.lm_head)
        modules += [inner.layers, inner.embed_tokens, inner.norm]
        for key, layer in inner.layers._modules.items():
            links.append((inner.layers._modules, key, layer))
            modules.append(layer)
            for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                child = layer._modules[name]
                links.append((layer._modules, name, child))
                modules.append(child)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                links.append((norm._parameters, "weight", norm.weight))
            for parent, names in ((layer.self_attn, ("qkv_proj", "o_proj")), (layer.mlp, ("gate_up_proj", "down_proj"))):
                for name in names:
                    linear = parent._modules[name]
                    links += [(parent._modules, name, linear), (linear._parameters, "weight", linear.weight),
                              (linear._parameters, "bias", linear.bias)]
                    modules.append(linear)
        return links, modules

    def _warm(self, max_rows: int) -> None:
        """oneDNN builds (JIT-compiles) a primitive for each new number of rows, ~0.5 ms per weight shape,
        cached for the process: build them now for 1 … ``max_rows`` rows (decode batches, verify steps of
        1 + γ rows), so that the first steps do not carry that cost (it would also mislead the timings
        ``num_speculative_tokens="auto"`` decides by). Larger prefills build theirs on first use."""
        shapes = {(tuple(w.shape), b is not None): (w, b) for w, b in self._weights()}
        with torch.inference_mode():
            for rows in range(1, max_rows + 1):
                for w, b in shapes.values():
                    _packed_linear(torch.zeros(rows, w.shape[1], dtype=torch.float32), w, b)

    def _weights(self):
        for _, _, _, w_qkv, b_qkv, w_o, b_o, _, w_gate_up, w_down in self._lean.layers:
            yield from ((w_qkv, b_qkv), (w_o, b_o), (w_gate_up, None), (w_down, None))
        yield self._lean.head, None

    @staticmethod
    def _reorder(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)

    def _stamp(self) -> list[tuple[int, int]]:
        return [(w.data_ptr(), w._version) for w in self._sources]

    def current(self) -> bool:
        """Whether the packs still match the model's weights (same storage, no in-place update since)."""
        return self._stamp() == self._stamps

    def usable(self) -> bool:
        """Whether this forward still computes the model's: same components, not fused, every module and
        weight where it was when packed, no forward hooks (they would not run here)."""
        model = self._model()
        if model is None or model.components is not self._components or model.fused_kernels:
            return False
        links, modules = self._structure
        for container, key, value in links:
            if container.get(key) is not value:
                return False
        for module in modules:
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                return False
        hooks = torch.nn.modules.module
        return not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)

    def __call__(self, input_ids, positions, attention, logits_indices=None):
        if not self.usable():
            model = self._model()
            return model(input_ids, positions, attention=attention, logits_indices=logits_indices)
        if not self.current():
            self._pack()
        return self._lean(input_ids, positions, attention, logits_indices)


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedForward


def packed_forward_for(model: nn.Module) -> PackedForward | None:
    """The model's :class:`PackedForward` (one per model, shared by the engines built on it), or None
    where it does not apply."""
    if not PackedForward.supports(model):
        return None
    forward = _PACKED.get(model)
    if forward is not None and forward.usable():
        return forward
    try:
        forward = _PACKED[model] = PackedForward(model)
    except RuntimeError:  # a oneDNN build that cannot pack these weights: the model's own forward
        return None
    return forward


class _NoAttention:
    """The attention context of a timing run: the queries stand in for attention's output (attention
    costs the same on both paths, and would only add noise to their difference)."""

    @staticmethod
    def attend(layer_index, q, k, v, scale):
        return q


def _signature(model: nn.Module) -> tuple:
    """What decides the two paths' costs: the model's shapes, its dtype, torch's thread count."""
    config = model.config
    linears = tuple((tuple(module.weight.shape), module.bias is not None) for layer in model.model.layers
                    for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                   layer.mlp.down_proj))
    head = model.lm_head_weight
    return (type(model).__name__, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            linears, tuple(head.shape), head.dtype, torch.get_num_threads())


def measure_packed_forward(model: nn.Module, packed: PackedForward, rows: tuple[int, ...] = (1, 16),
                           repeats: int = 9) -> dict:
    """Seconds per forward of the model's own forward (``F.linear``, MKL) and of ``packed``, at each of
    ``rows`` decode rows (one token per sequence, every row's logits): the median of ``repeats`` calls
    each, the two paths alternating (so that a load spike hits both), after two warm-up calls each."""
    vocab = model.config.vocab_size
    timings: dict[str, dict[int, float]] = {"linear": {}, "packed": {}}
    attention = _NoAttention()
    with torch.inference_mode():
        for n in rows:
            ids = torch.arange(n, dtype=torch.int32) % vocab
            positions = torch.arange(8, 8 + n, dtype=torch.int32)
            indices = torch.arange(n, dtype=torch.int32)
            calls = {"linear": lambda ids=ids, positions=positions, indices=indices: model(
                         ids, positions, attention=attention, logits_indices=indices),
                     "packed": lambda ids=ids, positions=positions, indices=indices: packed(
                         ids, positions, attention, indices)}
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(2):
                for call in calls.values():
                    call()
            for _ in range(repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - start)
            for name in calls:
                timings[name][n] = statistics.median(samples[name])
    return timings


_CHOICES: dict[tuple, dict] = {}  # _signature(model) -> the decision of choose_packed_forward


def choose_packed_forward(model: nn.Module) -> tuple[PackedForward | None, dict]:
    """``cpu_packed_weights="auto"``: the model's packed forward if it measures faster than the model's
    own, else None; and the decision: ``{"packed": bool, "linear_ms": {rows: ms}, "packed_ms": {rows:
    ms}, "ratio": packed / linear (geometric mean over the row counts), "measure_ms", "cached"}``.

    Measured once per process for each model shape, dtype and torch thread count (:func:`_signature`);
    a model the packed forward does not apply to gets None without a measurement."""
    if not PackedForward.supports(model):
        return None, {"packed": False, "reason": "the packed forward does not apply to this model"}
    key = _signature(model)
    decision = _CHOICES.get(key)
    if decision is not None:
        packed = packed_forward_for(model) if decision["packed"] else None  # F.linear: nothing to pack
        return packed, {**decision, "cached": True}
    existed = model in _PACKED
    started = time.perf_counter()
    packed = packed_forward_for(model)
    if packed is None:
        return None, {"packed": False, "reason": "this oneDNN build cannot pack the model's weights"}
    timings = measure_packed_forward(model, packed)
    rows = sorted(timings["linear"])
    ratio = math.exp(statistics.fmean(math.log(timings["packed"][n] / timings["linear"][n]) for n in rows))
    decision = {"packed": ratio < 1.0,
                "linear_ms": {n: round(timings["linear"][n] * 1e3, 4) for n in rows},
                "packed_ms": {n: round(timings["packed"][n] * 1e3, 4) for n in rows},
                "ratio": round(ratio, 4), "measure_ms": round((time.perf_counter() - started) * 1e3, 1)}
    _CHOICES[key] = decision
    if not decision["packed"] and not existed:
        _PACKED.pop(model, None)  # not used: do not keep a second copy of the weights alive with the model
    log.info("cpu_packed_weights='auto': %s (forward ms at %s rows: F.linear %s, packed %s; packed/F.linear "
             "%.3f; measured in %.0f ms)", "packed oneDNN weights" if decision["packed"] else "F.linear",
             rows, list(decision["linear_ms"].values()), list(decision["packed_ms"].values()), ratio,
             decision["measure_ms"])
    return (packed if decision["packed"] else None), {**decision, "cached": False}
