"""Chapter 09's checks: the solution's answers pass, the chapter's stubs say "not implemented yet", and
wrong or cheating answers fail with a message that names the problem.

The answers and stubs are the exercise cells of ``solutions/09_flash_attention.py`` and
``chapters/09_flash_attention.py`` themselves, written to a module file (Triton needs a kernel's source
file) and imported. The cheats are the ones a student might try: a plain average in the merge, full
softmax attention that reports tiles sliced from the whole score matrix, torch's fused attention, one
query at a time over every key, a tiled answer that never reports its tiles, visiting every key tile,
a Triton loop that forgets the causal mask or the sequence's end.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

import miniinfer.kernels  # noqa: F401  (TRITON_INTERPRET=1 on a machine without a GPU, before Triton loads)
from miniinfer.course import CheckFailed, NotImplementedYet
from miniinfer.course import check as checks
from miniinfer.course.notebooks import chapters_dir, read_py, solutions_dir
from miniinfer.kernels import triton_available

CHAPTER = "09_flash_attention"
HEADER = "import math\n\nimport torch\n\n"


def _exercise_module(source_py, name: str, tmp_path_factory):
    """The exercise cells of a chapter file, as an imported module."""
    nb = read_py(source_py)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]
    path = tmp_path_factory.mktemp(name) / f"{name}.py"
    path.write_text(HEADER + "\n\n".join(cells) + "\n")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def solution(tmp_path_factory):
    return _exercise_module(solutions_dir() / f"{CHAPTER}.py", "ch09_solution_answers", tmp_path_factory)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return _exercise_module(chapters_dir() / f"{CHAPTER}.py", "ch09_chapter_stubs", tmp_path_factory)


EXERCISES = ["merge_partials", "blocked_attention", "causal_key_tiles",
             pytest.param("attention_kernel", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes(solution, name, capsys):
    getattr(checks, name)(getattr(solution, name))
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", EXERCISES)
def test_stub_is_not_implemented_yet(stubs, name):
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        getattr(checks, name)(getattr(stubs, name))


def _fails(check, fn, *fragments):
    with pytest.raises(CheckFailed) as failure:
        check(fn)
    assert not isinstance(failure.value, NotImplementedYet)
    message = str(failure.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------
# 9.1
# ------------------------------------------------------------------------------------------------

def test_merge_plain_average_is_refused():
    def average(o1, m1, l1, o2, m2, l2):
        return (o1 + o2) / 2, torch.maximum(m1, m2), l1 + l2

    _fails(checks.merge_partials, average, "Hint:")


def test_merge_without_empty_parts_gives_nan_hint():
    def careless(o1, m1, l1, o2, m2, l2):
        m = torch.maximum(m1, m2)
        w1, w2 = l1 * torch.exp(m1 - m), l2 * torch.exp(m2 - m)
        return (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None], m, w1 + w2

    _fails(checks.merge_partials, careless, "empty part")


# ------------------------------------------------------------------------------------------------
# 9.2
# ------------------------------------------------------------------------------------------------

def _full_scores(q, k, scale):
    G = q.shape[1] // k.shape[1]
    return torch.einsum("lhd,shd->hls", q, k.repeat_interleave(G, dim=1)) * scale  # [H, L, S]


def test_full_softmax_that_reports_sliced_tiles_is_caught():
    def cheat(q, k, v, causal, scale, block_m, block_n, on_score_tile=None):
        L, S = q.shape[0], k.shape[0]
        scores = _full_scores(q, k, scale)
        if on_score_tile is not None:
            for qt in range(math.ceil(L / block_m)):
                for kt in range(math.ceil(S / block_n)):
                    on_score_tile(qt, kt, scores[:, qt * block_m:(qt + 1) * block_m, kt * block_n:(kt + 1) * block_n])
        if causal:
            visible = torch.arange(S)[None, :] <= (torch.arange(L) + S - L)[:, None]
            scores = scores.masked_fill(~visible, -math.inf)
        G = q.shape[1] // k.shape[1]
        return torch.einsum("hls,shd->lhd", torch.softmax(scores, -1), v.repeat_interleave(G, dim=1))

    _fails(checks.blocked_attention, cheat, "The full score matrix would be [H, L, S]")


def test_fused_attention_is_caught():
    def cheat(q, k, v, causal, scale, block_m, block_n, on_score_tile=None):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale,
            attn_mask=(torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0]) + k.shape[0] - q.shape[0])[:, None])
            if causal else None, enable_gqa=True)
        return out[0].transpose(0, 1)

    _fails(checks.blocked_attention, cheat, "Exercise 9.2")


def test_one_query_at_a_time_over_all_keys_is_caught(solution):
    """Rows of S scores: small, but more than one tile wide. Reports the right tiles (from the solution)."""
    def cheat(q, k, v, causal, scale, block_m, block_n, on_score_tile=None):
        solution.blocked_attention(q, k, v, causal, scale, block_m, block_n, on_score_tile=on_score_tile)
        L, S = q.shape[0], k.shape[0]
        G = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        rows = []
        for i in range(L):
            s = torch.einsum("hd,shd->hs", q[i], kk) * scale  # [H, S]: a whole row
            if causal:
                s = s.masked_fill(torch.arange(S)[None, :] > S - L + i, -math.inf)
            rows.append(torch.einsum("hs,shd->hd", torch.softmax(s, -1), vv))
        return torch.stack(rows)

    _fails(checks.blocked_attention, cheat, "Exercise 9.2")


def test_attention_in_numpy_is_caught(solution):
    """NumPy allocations escape torch's dispatcher; the check counts the scores torch computed."""
    def cheat(q, k, v, causal, scale, block_m, block_n, on_score_tile=None):
        import numpy as np

        L, S = q.shape[0], k.shape[0]
        G = q.shape[1] // k.shape[1]
        qn, kn, vn = q.numpy(), np.repeat(k.numpy(), G, axis=1), np.repeat(v.numpy(), G, axis=1)
        scores = np.einsum("lhd,shd->hls", qn, kn) * scale
        if on_score_tile is not None:
            for qt in range(math.ceil(L / block_m)):
                for kt in range(math.ceil(S / block_n)):
                    on_score_tile(qt, kt, torch.from_numpy(
                        np.ascontiguousarray(scores[:, qt * block_m:(qt + 1) * block_m, kt * block_n:(kt + 1) * block_n])))
        if causal:
            scores = np.where(np.arange(S)[None, :] <= (np.arange(L) + S - L)[:, None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return torch.from_numpy(np.ascontiguousarray(np.einsum("hls,shd->lhd", weights, vn)).astype(qn.dtype))

    _fails(checks.blocked_attention, cheat, "not NumPy")


def test_tiles_must_be_reported():
    from miniinfer.kernels.online_softmax import blocked_attention as package

    def silent(q, k, v, causal, scale, block_m, block_n, on_score_tile=None):
        return package(q, k, v, causal, scale, block_m, block_n)

    _fails(checks.blocked_attention, silent, "on_score_tile was never called")


# ------------------------------------------------------------------------------------------------
# 9.3
# ------------------------------------------------------------------------------------------------

def test_visiting_every_tile_is_refused():
    def everything(q_start, q_end, q_offset, S, block_n):
        return 0, math.ceil(S / block_n)

    _fails(checks.causal_key_tiles, everything, "expected (full_tiles, visited_tiles)")


def test_unmasked_tiles_from_the_last_query_are_refused(solution):
    def last_query(q_start, q_end, q_offset, S, block_n):
        _, visited = solution.causal_key_tiles(q_start, q_end, q_offset, S, block_n)
        return visited, visited  # "every visited tile is full": wrong on the diagonal

    _fails(checks.causal_key_tiles, last_query, "sees its last key")


# ------------------------------------------------------------------------------------------------
# 9.4
# ------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def no_causal_mask_kernel(q_ptr, k_ptr, v_ptr, out_ptr, L, S, G, scale_log2,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
                              CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              NUM_KV_TILES: tl.constexpr):
        """Masks the sequence's end but ignores CAUSAL."""
        tile = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // G
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        d = tl.arange(0, D)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        k_head = k_ptr + kv_head * stride_kh
        v_head = v_ptr + kv_head * stride_kh
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for t in range(0, NUM_KV_TILES):
            keys = t * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = keys < S
            k = tl.load(k_head + keys[:, None] * stride_kt + d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_head + keys[:, None] * stride_kt + d[None, :], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out, mask=row_ok[:, None])


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_kernel_without_causal_mask_fails():
    _fails(checks.attention_kernel, no_causal_mask_kernel, "causal=True", "Hint:")
