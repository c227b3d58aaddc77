"""The top-p threshold paths (Triton kernel through the interpreter, CPU sort) against the torch radix select.

Contract: on rows whose cumulative masses are well separated from top_p (no prefix sum of the sorted row
within 1e-5 of it) every path returns exactly the reference's bits; on every row the kept set
{v : bits(p_v) >= t} is a valid nucleus under float32 rounding: its mass (float64) is >= top_p - 1e-5,
it stays below top_p + 1e-5 without its smallest value (minimal), and it is closed under ties.
"""

from __future__ import annotations

import pytest
import torch

import miniinfer.kernels  # noqa: F401  (sets TRITON_INTERPRET on a machine without a GPU)
from miniinfer.kernels import triton_available
from miniinfer.sampler import _top_p_threshold_sort, top_p_threshold, top_p_threshold_radix

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

MARGIN = 1e-5


def triton_threshold(probs, top_p):
    from miniinfer.kernels.top_p_triton import top_p_threshold_triton
    return top_p_threshold_triton(probs, top_p)


PATHS = {"triton": triton_threshold, "sort": _top_p_threshold_sort, "dispatch": top_p_threshold}


def margin(row: torch.Tensor, top_p: float) -> float:
    """Distance from top_p to the nearest prefix sum of the row sorted in descending order."""
    return (row.sort(descending=True).values.double().cumsum(0) - top_p).abs().min().item()


def well_separated(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """top_p per row drawn in [0.01, 0.999], redrawn until no prefix sum is within MARGIN of it."""
    top_p = []
    for row in probs:
        while True:
            t = torch.empty(1).uniform_(0.01, 0.999, generator=generator).item()
            if margin(row, t) > MARGIN:
                break
        top_p.append(t)
    return torch.tensor(top_p, dtype=torch.float32)


def assert_valid_nucleus(probs: torch.Tensor, top_p: torch.Tensor, threshold: torch.Tensor) -> None:
    keep = probs.view(torch.int32) >= threshold.unsqueeze(1)
    for i in range(len(probs)):
        p = probs[i].double()
        total = p.sum().item()
        if top_p[i].item() > total + MARGIN:  # rounding left the row below top_p: everything is kept
            assert keep[i].all(), f"row {i}"
            continue
        kept = p[keep[i]]
        assert kept.numel() > 0, f"row {i}: nothing kept"
        mass = kept.sum().item()
        assert mass >= top_p[i].item() - MARGIN, f"row {i}: kept mass {mass} < top_p {top_p[i].item()}"
        smallest = kept.min()
        assert keep[i][p == smallest].all(), f"row {i}: a tie of the threshold dropped"
        # minimal: without the tokens tied at the threshold, the mass no longer reaches top_p
        assert mass - kept[kept == smallest].sum().item() < top_p[i].item() + MARGIN, f"row {i}: not minimal"


def rows(N: int, V: int, generator: torch.Generator) -> torch.Tensor:
    """Softmax rows from peaked to near-uniform, with zeros (top-k) in some rows."""
    scale = torch.tensor([0.05, 0.5, 2.0, 4.0, 8.0, 1.0, 3.0])[torch.arange(N) % 7].unsqueeze(1)
    logits = torch.randn(N, V, generator=generator) * scale
    if N > 1 and V > 5:
        k = max(1, V // 7)
        kth = logits[1].topk(k).values[-1]
        logits[1] = logits[1].masked_fill(logits[1] < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("N,V", [(1, 13), (7, 13), (7, 1000), (1, 5000), (7, 5000)])
def test_equal_to_the_radix_select_when_well_separated(path, N, V, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = rows(N, V, generator)
    top_p = well_separated(probs, generator)
    got = PATHS[path](probs, top_p)
    assert got.dtype == torch.int32 and got.shape == (N,)
    expected = top_p_threshold_radix(probs, top_p)
    assert torch.equal(got, expected), f"{path}: {got} vs {expected}"
    assert_valid_nucleus(probs, top_p, got)


@pytest.mark.parametrize("path", list(PATHS))
def test_valid_nucleus_on_knife_edges_and_ties(path, seed):
    """top_p exactly at prefix sums (either decision is right), and rows of tied probabilities."""
    generator = torch.Generator().manual_seed(seed)
    V = 1000
    probs = rows(7, V, generator)
    top_p = torch.empty(7)
    for i in range(7):
        cdf = probs[i].sort(descending=True).values.double().cumsum(0)
        top_p[i] = cdf[torch.randint(0, 50, (), generator=generator)].item()
    assert_valid_nucleus(probs, top_p, PATHS[path](probs, top_p))
    # ties: quantised probabilities, many equal values
    levels = torch.tensor([1.0, 2.0, 4.0, 4.0, 8.0])
    tied = levels[torch.randint(0, 5, (7, V), generator=generator)]
    tied = tied / tied.sum(dim=-1, keepdim=True)
    top_p = torch.empty(7).uniform_(0.05, 0.95, generator=generator)
    assert_valid_nucleus(tied, top_p, PATHS[path](tied, top_p))


@pytest.mark.parametrize("path", list(PATHS))
def test_edge_cases_bit_for_bit(path):
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1],
                          [0.25, 0.25, 0.25, 0.25, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0],
                          [0.2, 0.2, 0.2, 0.2, 0.2],
                          [0.0, 0.0, 1.0, 0.0, 0.0],
                          [0.5, 0.5, 0.0, 0.0, 0.0],
                          [0.1, 0.2, 0.3, 0.15, 0.25]])
    top_p = torch.tensor([0.2, 0.3, 0.5, 0.999999, 1.0, 0.7, 1.5])  # 1.5: above the total -> keep all
    got = PATHS[path](probs, top_p)
    expected = top_p_threshold_radix(probs, top_p)
    assert torch.equal(got, expected), f"{got} vs {expected}"
    keep = probs.view(torch.int32) >= got.unsqueeze(1)
    assert keep.tolist()[:3] == [[False, True, True, False, False], [True, True, True, True, False],
                                 [True, False, False, False, False]]
    assert keep[3].all() and keep[6].all() and keep[4].tolist() == [False, False, True, False, False]
    # top_p <= 0 (never from SamplingParams): the radix select's all-ones digits, reproduced
    zero = PATHS[path](probs[:2], torch.zeros(2))
    assert torch.equal(zero, top_p_threshold_radix(probs[:2], torch.zeros(2)))
