"""Chapter 10's checks: the solution's answers pass, the chapter's stubs say "not implemented yet", and
wrong answers fail with a message that names the problem (resampling from p instead of the residual,
accepting past the first rejection, E without the bonus token, a transposed or causal-only tree mask,
a rollback that forgets the newest token)."""

from __future__ import annotations

import pytest
import torch

from miniinfer.course import CheckFailed, NotImplementedYet
from miniinfer.course import check as checks
from miniinfer.course.notebooks import chapters_dir, solutions_dir
from miniinfer.speculative.acceptance import accept_draft as package_accept
from miniinfer.speculative.acceptance import draw_from
from tests.chapter_answers import exercise_answers

CHAPTER = "10_speculative_decoding"
EXERCISES = ["accept_draft", "expected_tokens_per_step", "rollback_blocks", "tree_attention_mask"]


def _answers(path) -> dict:
    return exercise_answers(path, "import torch\nfrom miniinfer.speculative.acceptance import draw_from\n")


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_and_stub_is_not_implemented(name):
    getattr(checks, name)(_answers(solutions_dir() / f"{CHAPTER}.py")[name])
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        getattr(checks, name)(_answers(chapters_dir() / f"{CHAPTER}.py")[name])


def _resample_from_p(p, q, draft, num_draft, u_accept, u_sample):
    num_accepted, _ = package_accept(p, q, draft, num_draft, u_accept, u_sample)
    return num_accepted, draw_from(p[torch.arange(p.shape[0]), num_accepted], u_sample)


def _accept_every_match(p, q, draft, num_draft, u_accept, u_sample):
    K = draft.shape[1]
    accepted = (u_accept * q.gather(-1, draft[..., None])[..., 0] < p[:, :K].gather(-1, draft[..., None])[..., 0])
    accepted &= torch.arange(K)[None] < num_draft[:, None]
    return accepted.sum(-1), package_accept(p, q, draft, num_draft, u_accept, u_sample)[1]


WRONG = [
    ("accept_draft", _resample_from_p, "next_token"),
    ("accept_draft", _accept_every_match, "num_accepted"),
    ("expected_tokens_per_step", lambda alpha, gamma: sum(alpha ** i for i in range(1, gamma + 1)), "expected"),
    ("rollback_blocks", lambda bt, n, k, a, P: (n + a, bt[:-(-(n + a) // P)], bt[-(-(n + a) // P):]),
     "new computed count"),
    ("tree_attention_mask", lambda parents: torch.ones(len(parents), len(parents), dtype=torch.bool).tril(), "mask"),
]


@pytest.mark.parametrize("name, wrong, message", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_wrong_answers_fail_with_a_message(name, wrong, message):
    with pytest.raises(CheckFailed, match=message):
        getattr(checks, name)(wrong)
