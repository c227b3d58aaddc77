"""The target's forward for verify steps on a CPU: the same math, its matmuls on prepacked oneDNN weights.

A verify step multiplies every weight matrix by ``1 + γ`` rows per sequence (5 for γ = 4) instead of
decoding's one. On this CPU with the bundled model the default small-``M`` GEMM (MKL through
``F.linear``) is slow at that shape: 5 rows cost about 4–5 × one row, so a verify step of 5 tokens
cost ~3 plain decode steps and ate most of what the accepted guesses gained. oneDNN's inner-product
primitive on weights reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``
/ ``_linear_pointwise``, what ``torch.compile`` uses for CPU linears) does the same product about twice
as fast at 5–80 rows.

That is not specific to speculation: plain decoding through this forward is faster too (at one row
roughly even on a quiet machine, faster under load; at 16 rows, a batch-16 decode step, ~1.7 ×). The
engine's plain path is left as it is here; ``benchmarks/speculative.py`` measures plain decoding
through this forward as a reference row (``none (packed)``), so that its speed-ups can be read against
either baseline.

:class:`PackedVerifyForward` is :class:`~miniinfer.speculative.proposers.LeanForward` (the model's
forward as one flat function, same contract and math) with those packed matmuls. It keeps its packs in
step with the model: before each forward it checks every packed weight's storage and version counter
(an in-place update or a reload bumps them) and repacks if one moved. Only for float32 models on the
CPU that :meth:`LeanForward.supports <miniinfer.speculative.proposers.LeanForward.supports>` covers,
where oneDNN is built in; anything else verifies with the model itself. Results are the product's up
to float rounding (as a 5-row GEMM's already are against decoding's 1-row GEMV), so greedy
speculation still emits what plain greedy decoding does except at exact ties of the top two logits.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from miniinfer.speculative.proposers import LeanForward

__all__ = ["PackedVerifyForward", "verify_forward_for"]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedVerifyForward(LeanForward):
    """``forward(input_ids, positions, attention, logits_indices)`` of the target with packed weights."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        try:
            parameter = next(model.parameters())
        except (StopIteration, AttributeError, TypeError):
            return False
        return (parameter.device.type == "cpu" and parameter.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and not getattr(model, "fused_kernels", True) and LeanForward.supports(model))

    def __init__(self, model: nn.Module, warm_rows: int = 16):
        super().__init__(model)
        self._model = weakref.ref(model)  # not a strong reference: the packs are cached per model, weakly
        self._pack()
        self._warm(warm_rows)

    def _pack(self) -> None:
        model = self._model()
        LeanForward.__init__(self, model)  # fresh references to the model's tensors
        self._components = model.components
        layers, sources = [], []
        for index, scale, norm1, w_qkv, b_qkv, w_o, b_o, norm2, w_gate_up, w_down in self.layers:
            sources += [w_qkv, w_o, w_gate_up, w_down]
            layers.append((index, scale, norm1, self._reorder(w_qkv), b_qkv, self._reorder(w_o), b_o, norm2,
                           self._reorder(w_gate_up), self._reorder(w_down)))
        sources.append(self.head)
        self.head = self._reorder(self.head)
        self.layers = layers
        self.linear = _packed_linear
        self._sources = sources
        self._stamps = self._stamp()

    def _warm(self, max_rows: int) -> None:
        """oneDNN builds (JIT-compiles) a primitive for each new number of rows, ~0.6 ms per weight shape,
        cached for the process: build them now for 1 … ``max_rows`` rows (a verify step of one sequence
        has 1 + γ), so that the first verify steps do not carry that cost (it would also mislead the
        timings ``num_speculative_tokens="auto"`` decides by)."""
        shapes = {(tuple(w.shape), b is not None): (w, b) for w, b in self._weights()}
        with torch.inference_mode():
            for rows in range(1, max_rows + 1):
                for w, b in shapes.values():
                    _packed_linear(torch.zeros(rows, w.shape[1], dtype=torch.float32), w, b)

    def _weights(self):
        for _, _, _, w_qkv, b_qkv, w_o, b_o, _, w_gate_up, w_down in self.layers:
            yield from ((w_qkv, b_qkv), (w_o, b_o), (w_gate_up, None), (w_down, None))
        yield self.head, None

    @staticmethod
    def _reorder(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)

    def _stamp(self) -> list[tuple[int, int]]:
        return [(w.data_ptr(), w._version) for w in self._sources]

    def current(self) -> bool:
        """Whether the packs still match the model's weights (same storage, no in-place update since)."""
        return self._stamp() == self._stamps

    def __call__(self, input_ids, positions, attention, logits_indices=None):
        model = self._model()
        if model.components is not self._components or model.fused_kernels:
            # The model's components were replaced (the user's functions must run) or it went fused.
            return model(input_ids, positions, attention=attention, logits_indices=logits_indices)
        if not self.current():
            self._pack()
        return super().__call__(input_ids, positions, attention, logits_indices)


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedVerifyForward


def verify_forward_for(model: nn.Module):
    """The callable a verify step runs: :class:`PackedVerifyForward` where it applies (one per model, shared
    by the engines built on it), else the model."""
    if not PackedVerifyForward.supports(model):
        return model
    forward = _PACKED.get(model)
    if forward is not None and forward._components is model.components:
        return forward
    try:
        forward = _PACKED[model] = PackedVerifyForward(model)
    except RuntimeError:  # a oneDNN build that cannot pack these weights: the model's own forward
        return model
    return forward
