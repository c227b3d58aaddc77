"""The Triton top-p threshold on a CUDA GPU at a real size (N = 256, V = 151 936), with a timing print.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu/test_top_p_gpu.py -q -s``.
"""

from __future__ import annotations

import pytest
import torch

from miniinfer.sampler import _top_p_threshold_sort, top_p_threshold, top_p_threshold_radix

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, V = 256, 151_936
MARGIN = 1e-5
# The torch radix select adds 151 936 float32 values per row with atomics (order unspecified): its own
# rounding reaches ~1e-5 here, so it is compared exactly only where top_p is 1e-4 away from every prefix sum.
RADIX_MARGIN = 1e-4


def make_rows(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half near-uniform rows (random-weight model, hot temperature), half peaked; some after top-k 50."""
    scale = torch.where(torch.arange(N) % 2 == 0, 0.02, torch.linspace(0.5, 6.0, N)).unsqueeze(1)
    logits = torch.randn(N, V, generator=generator) * scale
    topk = torch.arange(N) % 8 == 3
    kth = logits.topk(50, dim=-1).values[:, -1:]
    logits = torch.where(topk.unsqueeze(1) & (logits < kth), float("-inf"), logits)
    probs = torch.softmax(logits.cuda(), dim=-1)
    top_p = torch.empty(N).uniform_(0.05, 0.999, generator=generator).cuda()
    return probs, top_p


def margins(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    cdf = probs.sort(dim=-1, descending=True).values.double().cumsum(dim=-1)
    return (cdf - top_p.double().unsqueeze(1)).abs().amin(dim=-1)


def check_valid_nucleus(probs: torch.Tensor, top_p: torch.Tensor, threshold: torch.Tensor) -> None:
    keep = probs.view(torch.int32) >= threshold.unsqueeze(1)
    p = probs.double()
    mass = (p * keep).sum(-1)
    smallest = torch.where(keep, p, float("inf")).amin(-1, keepdim=True)
    tied = p == smallest
    assert keep.any(-1).all(), "a row keeps nothing"
    assert (keep | ~tied).all(), "a tie of the threshold dropped"
    target = top_p.double()
    assert (mass >= target - MARGIN).all(), "kept mass below top_p"
    assert (mass - (p * tied).sum(-1) < target + MARGIN).all(), "kept set not minimal"


def test_triton_threshold_at_qwen_size(seed):
    generator = torch.Generator().manual_seed(seed)
    probs, top_p = make_rows(generator)
    got = top_p_threshold(probs, top_p)  # the dispatcher: the Triton kernel on CUDA
    assert got.dtype == torch.int32 and got.device == probs.device
    check_valid_nucleus(probs, top_p, got)
    m = margins(probs, top_p)
    # Near-uniform rows have prefix sums ~7e-6 apart: never separated, checked by validity alone.
    exact = _top_p_threshold_sort(probs, top_p)  # float64 prefix sums
    separated = m > MARGIN
    assert torch.equal(got[separated], exact[separated]), "differs from the float64 sort"
    radix = top_p_threshold_radix(probs, top_p)
    separated_radix = m > RADIX_MARGIN
    assert torch.equal(got[separated_radix], radix[separated_radix]), "differs from the torch radix select"
    print(f"\nrows compared exactly: {int(separated.sum())} with the float64 sort, "
          f"{int(separated_radix.sum())} with the radix select; identical on all {N}: "
          f"{int((got == radix).sum())} (radix), {int((got == exact).sum())} (sort)")

    # Edge rows: one-hot, uniform ties, top_p above the total.
    edge = torch.zeros(4, V, device="cuda")
    edge[0, 17] = 1.0
    edge[1] = 1.0 / V
    edge[2, :100] = 0.01
    edge[3] = torch.softmax(torch.randn(V, device="cuda"), -1)
    edge_p = torch.tensor([0.5, 0.3, 0.999, 1.5], device="cuda")
    assert torch.equal(top_p_threshold(edge, edge_p), top_p_threshold_radix(edge, edge_p))

    def timed(fn) -> float:
        for _ in range(3):
            fn(probs, top_p)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn(probs, top_p)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    print(f"\ntop_p_threshold N={N} V={V}: triton {timed(top_p_threshold):.3f} ms, "
          f"torch radix {timed(top_p_threshold_radix):.3f} ms, sort {timed(_top_p_threshold_sort):.3f} ms")
