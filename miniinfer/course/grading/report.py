"""The grades as a table for the terminal, and as ``grades.csv`` / ``grades.json`` for a gradebook.

The table has one row per notebook and one column per exercise; below it, one line per lost point
(or flag) says why: the check's first lines, the exercise cell's own exception, the scanner's finding.
The files are rewritten after every notebook (to a temporary name, then renamed), so a batch that is
interrupted still leaves the grades of every notebook it finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

from miniinfer.course.grading.grader import ExerciseResult, NotebookGrade
from miniinfer.course.grading.program import exercise_id_order

__all__ = ["table", "lost_points", "write_results"]


def _cell(result: ExerciseResult) -> str:
    text = result.status
    if result.location == "moved":
        text += " (moved)"
    if result.flagged:
        text += " [flagged]"
    return text


def _rows(grades: list[NotebookGrade]) -> tuple[list[str], list[list[str]]]:
    exercise_ids = sorted({e.exercise for g in grades for e in g.exercises}, key=exercise_id_order)
    header = ["student", "chapter", "status", *[f"ex {i}" for i in exercise_ids], "score", "max", "flags"]
    rows = []
    for grade in grades:
        by_id = {e.exercise: e for e in grade.exercises}
        flags = [f"{e.exercise}: {e.flagged}" for e in grade.exercises if e.flagged]
        if grade.flagged:
            flags.insert(0, grade.flagged)
        rows.append([grade.student, grade.chapter, grade.status,
                     *[_cell(by_id[i]) if i in by_id else "-" for i in exercise_ids],
                     f"{grade.score:g}", f"{grade.max_score:g}", "; ".join(flags)])
    return header, rows


def table(grades: list[NotebookGrade]) -> str:
    """The grades as an aligned text table (the flags column is left to :func:`lost_points`)."""
    header, rows = _rows(grades)
    header, rows = header[:-1], [r[:-1] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _first_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[:count])


def lost_points(grades: list[NotebookGrade]) -> str:
    """One line per lost point or flag: ``student  exercise  status: cause``."""
    lines = []
    for grade in grades:
        if grade.status != "graded":
            lines.append(f"{grade.student}  {grade.status}: {grade.message}")
        if grade.flagged:
            lines.append(f"{grade.student}  flagged: {grade.flagged}")
        for result in grade.exercises:
            if result.status != "passed":
                lines.append(f"{grade.student}  {result.exercise}  {result.status}: {_first_lines(result.message)}")
            elif result.points < result.max_points:
                lines.append(f"{grade.student}  {result.exercise}  passed, scored 0 (flagged)")
            if result.flagged:
                lines.append(f"{grade.student}  {result.exercise}  flagged: {result.flagged}")
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results(grades: list[NotebookGrade], out_dir: Path) -> None:
    """``grades.csv`` (one row per notebook) and ``grades.json`` (everything) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = _rows(grades)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    _write_atomically(out_dir / "grades.csv", buffer.getvalue())
    records = [{**asdict(g), "score": g.score, "max_score": g.max_score} for g in grades]
    _write_atomically(out_dir / "grades.json", json.dumps(records, indent=2, ensure_ascii=False) + "\n")
