"""Chapter 12: ``LLM(tensor_parallel_size=2)`` and ``LLM(pipeline_parallel_size=2)`` (and expert parallel for
the MoE: ``tensor_parallel_size=2`` on shakespeare-moe) start their own worker process and give the same tokens
as one process (greedy, seeded sampling, n=2 with copy-on-write). One subprocess runs the three in turn (the
LLM makes its process rank 0 of a process group; each shuts its group down before the next starts)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import miniinfer
from miniinfer import LLM, SamplingParams
prompts = ["ROMEO.\n", "JULIET.\nO Romeo", "KING.\nWhat news?"]
params = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(temperature=0.8, seed=3, max_tokens=10),
          SamplingParams(temperature=0.0, max_tokens=8, n=2, seed=1)]
def run(name, **kwargs):
    llm = LLM(miniinfer.bundled_model_path(name), num_kv_blocks=96, **kwargs)
    outs = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    if hasattr(llm.model, "shutdown"):
        llm.model.shutdown()
    return outs
single = {name: run(name) for name in ("shakespeare", "shakespeare-moe")}
for what, name, kwargs in (("tensor", "shakespeare", dict(tensor_parallel_size=2)),
                           ("pipeline", "shakespeare", dict(pipeline_parallel_size=2)),
                           ("expert", "shakespeare-moe", dict(tensor_parallel_size=2))):
    parallel = run(name, **kwargs)
    print(what, "PARALLEL", parallel, "SINGLE", single[name])
    assert parallel == single[name], f"{what} parallel outputs differ from one process"
print("OK")
"""


def test_parallel_llm_equals_one_process():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
