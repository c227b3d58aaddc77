"""The ``miniinfer`` command: ``generate``, ``grade`` (and later ``serve``, ``bench``)."""

from __future__ import annotations

import argparse
import sys


def _grade(args) -> int:
    from miniinfer.course import grade

    return grade.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniinfer", description="MiniInfer: a small LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

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
