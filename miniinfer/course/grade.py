"""``miniinfer grade``: grade student notebooks against the canonical chapter.

    miniinfer grade submissions/*.ipynb --out grades/ [--chapter 02_rope] [--timeout 300]
                    [--wall-timeout 1800] [--allow-flagged] [-v]

Each notebook runs in its own throwaway kernel; the checks run in this process (see
:mod:`miniinfer.course.grading`). A batch never stops at a bad notebook: every notebook gets a status
(``graded``, ``unreadable``, ``timeout``, ``crashed``), ``grades.csv`` and ``grades.json`` are rewritten
after each one, and the report names the cause of every lost point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from miniinfer.course.grading import ExerciseResult, Grader, NotebookGrade
from miniinfer.course.grading.report import lost_points, table, write_results

__all__ = ["ExerciseResult", "NotebookGrade", "Grader", "grade_notebook", "grade_all", "report",
           "add_grade_arguments", "run_grade", "main"]


def grade_notebook(path: Path | str, chapter: str | None = None, cell_timeout: float = 300,
                   wall_timeout: float = 1800, allow_flagged: bool = False) -> NotebookGrade:
    """Grade one notebook with a grader of its own (for a batch, use :func:`grade_all`)."""
    return Grader(cell_timeout, wall_timeout, allow_flagged).grade(path, chapter)


def grade_all(paths: list[Path | str], grader: Grader, chapter: str | None = None, out_dir: Path | None = None,
              verbose: bool = False) -> list[NotebookGrade]:
    """Grade every notebook in turn, writing the results after each one."""
    grades = []
    for path in paths:
        print(f"grading {path} ...", flush=True)
        grade = grader.grade(path, chapter)
        grades.append(grade)
        print(f"  {grade.status}: {grade.score:g}/{grade.max_score:g} in {grade.seconds:.0f} s"
              + (f" ({grade.message})" if grade.message else ""), flush=True)
        if verbose:
            for line in lost_points([grade]).splitlines():
                print("   ", line)
        if out_dir is not None:
            write_results(grades, out_dir)
    return grades


def report(grades: list[NotebookGrade], out_dir: Path | None = None) -> str:
    """The table and the causes of lost points; with ``out_dir``, also write the CSV and JSON files."""
    if out_dir is not None:
        write_results(grades, out_dir)
    causes = lost_points(grades)
    return table(grades) + (f"\n\nLost points and flags:\n{causes}" if causes else "")


def add_grade_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``grade`` command's arguments (``miniinfer grade``, ``python -m miniinfer.course.grade``)."""
    parser.add_argument("notebooks", nargs="+", help="student .ipynb files")
    parser.add_argument("--chapter", help="chapter name or number (default: from each notebook)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds allowed per cell and per check (default 300); the kernel is interrupted")
    parser.add_argument("--wall-timeout", type=float, default=1800,
                        help="seconds allowed per notebook in all (default 1800)")
    parser.add_argument("--allow-flagged", action="store_true",
                        help="give points to exercises whose code was flagged (default: they score 0)")
    parser.add_argument("--out", help="folder for grades.csv and grades.json (rewritten after each notebook)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the causes after each notebook")


def run_grade(args: argparse.Namespace) -> int:
    grader = Grader(cell_timeout=args.timeout, wall_timeout=getattr(args, "wall_timeout", 1800),
                    allow_flagged=getattr(args, "allow_flagged", False))
    out_dir = Path(args.out) if args.out else None
    grades = grade_all(args.notebooks, grader, args.chapter, out_dir, args.verbose)
    print(report(grades))
    for warning in grader.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


main = run_grade  # what `miniinfer grade` calls


if __name__ == "__main__":
    command = argparse.ArgumentParser(prog="python -m miniinfer.course.grade", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grade_arguments(command)
    sys.exit(run_grade(command.parse_args()))
