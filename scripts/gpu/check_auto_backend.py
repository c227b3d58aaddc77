"""Which decode backend does ``attention_backend="auto"`` pick on this GPU, and how fast is a batch-1
decode after a 32k-token prompt with it? (Qwen2.5-0.5B shape, random bf16 weights.)

    python scripts/gpu/check_auto_backend.py      # prints the relative kernel times and the decode rate
"""

from __future__ import annotations

import json
import os
import time

import torch

from miniinfer.engine import EngineConfig, LLMEngine
from miniinfer.engine.attention_backends import measure_decode_backends
from miniinfer.models.config import Qwen2Config
from miniinfer.models.qwen2 import Qwen2ForCausalLM
from miniinfer.sampling import SamplingParams


def main() -> None:
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=33024,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    relative = measure_decode_backends("cuda", torch.bfloat16, 14, 2, 64, 16, long_context=32768, capacity=33024)
    result = {"relative_kernel_time (1x2k, 1x32k, 64x1k)": relative}
    for backend in ("auto", "triton", "cuda"):
        engine = LLMEngine(model, None, EngineConfig(max_model_len=33024, max_num_seqs=8, attention_backend=backend))
        prompt = torch.randint(0, 151936, (32000,)).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True))
        times = []
        while engine.has_unfinished_requests():
            engine.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter())
        decode = 128 / (times[-1] - times[-129])
        result[backend] = {"chosen": engine.attention_backend, "decode_tok_s_at_32k": round(decode, 1)}
        print(backend, result[backend], flush=True)
        del engine
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "auto_backend.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
