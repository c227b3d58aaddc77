"""The ``miniinfer`` command: ``generate``, ``grade`` (and later ``serve``, ``bench``)."""

from __future__ import annotations

import argparse
import sys


def _grade(args) -> int:
    from miniinfer.course import grade

    return grade.main(args)


def _generate(args) -> int:
    from miniinfer.llm import LLM
    from miniinfer.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    except (ValueError, OSError, ImportError) as e:  # bad arguments, missing/corrupt model: one line, no traceback
        print(f"miniinfer generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + output.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniinfer", description="MiniInfer: a small LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt with a model")
    generate.add_argument("--model", help="checkpoint folder or hub id (default: the bundled shakespeare model)")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    generate.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    generate.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    generate.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on "
                                                        "CPU, bfloat16 on CUDA)")
    generate.set_defaults(run=_generate)

    grade = commands.add_parser("grade", help="grade student notebooks against the canonical chapter")
    grade.add_argument("notebooks", nargs="+", help="student .ipynb files")
    grade.add_argument("--chapter", help="chapter name or number (default: from each notebook)")
    grade.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell (default 300)")
    grade.add_argument("--out", help="folder for grades.csv and grades.json")
    grade.add_argument("-v", "--verbose", action="store_true", help="print why each exercise failed")
    grade.set_defaults(run=_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
