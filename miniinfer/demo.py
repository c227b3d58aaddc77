"""`make demo`: what this machine can run, then the bundled model writing a scene.

    python -m miniinfer.demo [--prompt TEXT] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import time

import torch


def kernel_demo() -> None:
    """Chapter 00 in one breath: vector addition by torch, by the Triton kernel, and by CUDA if possible."""
    import miniinfer.kernels  # noqa: F401
    from miniinfer.kernels.build import cuda_kernels_available
    from miniinfer.kernels.vector_add import vector_add

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1_000_003, device=device)
    y = torch.randn_like(x)
    backends = ["torch", "triton"] + (["cuda"] if device == "cuda" and cuda_kernels_available() else [])
    for backend in backends:
        started = time.perf_counter()
        out = vector_add(x, y, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(f"vector_add[{backend:6}] on {device}: {x.numel():,} elements, equal to x + y: "
              f"{torch.equal(out, x + y)}  ({seconds * 1e3:.1f} ms, first call)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="ROMEO.\n")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args(argv)

    from miniinfer.env import report

    print(report(), end="\n\n")
    kernel_demo()
    try:
        from miniinfer import LLM, SamplingParams, bundled_model_path

        bundled_model_path("shakespeare")
    except (ImportError, FileNotFoundError) as missing:
        print(f"\n(the text-generation demo needs the bundled model and the engine: {missing})")
        return
    llm = LLM()
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    started = time.perf_counter()
    output = llm.generate([args.prompt], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - started
    print(f"\n--- miniinfer, bundled 'shakespeare' model, temperature 0.8, seed 0 ---\n{args.prompt}{output.text}")
    print(f"--- {len(output.token_ids)} tokens in {seconds:.2f} s ({len(output.token_ids) / seconds:.0f} tokens/s) ---")


if __name__ == "__main__":
    main()
