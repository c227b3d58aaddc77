"""Chapter 12: ``LLM(tensor_parallel_size=2)`` and ``LLM(pipeline_parallel_size=2)`` (and expert parallel for
the MoE) start their own worker process and give the same tokens as one process (greedy, seeded sampling, n=2
with copy-on-write)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
from miniinfer import LLM, SamplingParams
import miniinfer
tp, pp, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
path = miniinfer.bundled_model_path(name)
prompts = ["ROMEO.\n", "JULIET.\nO Romeo", "KING.\nWhat news?"]
params = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(temperature=0.8, seed=3, max_tokens=10),
          SamplingParams(temperature=0.0, max_tokens=8, n=2, seed=1)]
def run(**kwargs):
    llm = LLM(path, num_kv_blocks=96, **kwargs)
    outs = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    if hasattr(llm.model, "shutdown"):
        llm.model.shutdown()
    return outs
parallel = run(tensor_parallel_size=tp, pipeline_parallel_size=pp)
single = run()
print("PARALLEL", parallel)
print("SINGLE", single)
assert parallel == single, "parallel outputs differ from one process"
print("OK")
"""


@pytest.mark.parametrize("tp,pp,name", [(2, 1, "shakespeare"), (1, 2, "shakespeare"), (2, 1, "shakespeare-moe")],
                         ids=["tensor", "pipeline", "expert"])
def test_parallel_llm_equals_one_process(tp, pp, name):
    """shakespeare-moe with tensor_parallel_size=2 runs expert parallel (4 experts per rank)."""
    # A subprocess: the LLM makes this process rank 0 of a process group (one per process).
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tp), str(pp), name], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
