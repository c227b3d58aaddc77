"""What the grader runs for one submission: the canonical chapter with the student's exercises in it.

The grading program is the canonical chapter's code cells in order, except that

* each exercise cell holds the **student's** code for that exercise: their cell tagged with its id,
  followed by any untagged cell of theirs that defines one of the exercise's names (an answer written
  in a new cell is "moved", not lost); an exercise with neither is "missing";
* each check cell becomes a **check step**, run by the grader (``check.apply_rope(apply_rope)`` names
  the check and the notebook objects it takes), never by the kernel;
* cells tagged ``skip-grading`` (slow measurements) and the cells after the last check are left out.

Everything else the student changed (edited check cells, text, extra cells) plays no part.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

__all__ = ["Step", "ExerciseSource", "Program", "build_program", "find_chapter", "exercise_id_order"]


@dataclass
class CheckCall:
    check_name: str  # the function of miniinfer.course.check to call
    arguments: list[str]  # the notebook names passed to it, in order


@dataclass
class Step:
    kind: str  # "cell" (canonical code) | "exercise" (the student's code) | "check"
    source: str = ""
    exercise_id: str = ""
    checks: list[CheckCall] = field(default_factory=list)
    points: float = 1.0


@dataclass
class ExerciseSource:
    exercise_id: str
    names: list[str]  # what the canonical exercise cell defines (apply_rope, …)
    source: str | None  # None when missing
    location: str  # "cell" | "moved" | "missing"


@dataclass
class Program:
    chapter: str
    steps: list[Step]
    exercises: dict[str, ExerciseSource]
    chapter_cells: list[str]  # the canonical non-exercise code (for the scanner's view of imports)


def exercise_id_order(exercise_id: str) -> list[int]:
    return [int(part) if part.isdigit() else 0 for part in exercise_id.split(".")]


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _code(cell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def find_chapter(student: nbformat.NotebookNode, student_path: Path, chapter: str | None,
                 chapters_dir: Path) -> Path:
    """The canonical chapter: named explicitly, from the notebook's metadata, or its file name's number."""
    name = chapter or student.get("metadata", {}).get("miniinfer_chapter")
    if not name:
        match = re.match(r"(\d\d)", student_path.stem)
        name = match.group(1) if match else None
    if not name:
        raise ValueError("cannot tell which chapter this is (no miniinfer_chapter metadata, no NN_ file name); "
                         "pass --chapter NN")
    name = str(name)
    candidates = [p for p in sorted(chapters_dir.glob("*.ipynb")) if re.match(r"^\d\d_[a-z0-9_]+$", p.stem)
                  and (p.stem == name or p.stem[:2] == name[:2])]
    if len(candidates) != 1:
        raise ValueError(f"no single canonical chapter matches {name!r} in {chapters_dir}")
    return candidates[0]


def defined_names(source: str) -> set[str]:
    """Top-level names a cell defines (functions, classes, assignments); empty when it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _check_calls(source: str) -> list[CheckCall]:
    """``check.apply_rope(apply_rope)`` -> [CheckCall("apply_rope", ["apply_rope"])]."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "check"):
            arguments = [a.id for a in node.args if isinstance(a, ast.Name)]
            if len(arguments) != len(node.args) or node.keywords:
                raise ValueError(f"a check cell may only pass notebook names: {ast.unparse(node)}")
            calls.append(CheckCall(node.func.attr, arguments))
    return calls


def _student_sources(student: nbformat.NotebookNode, exercise_id: str, names: list[str],
                     canonical_sources: set[str]) -> ExerciseSource:
    cells = [c for c in student.get("cells", []) if c.get("cell_type") == "code"]
    tagged_at = [i for i, c in enumerate(cells) if "exercise" in _tags(c)
                 and str(c.get("metadata", {}).get("exercise", "")) == exercise_id]
    definers = [i for i, c in enumerate(cells) if "exercise" not in _tags(c) and "check" not in _tags(c)
                and _code(c) not in canonical_sources and defined_names(_code(c)) & set(names)]
    if tagged_at:
        # Notebook order: an untagged cell *after* the exercise cell redefines the answer; one before it
        # is overwritten by the exercise cell (a stub still standing there wins, as it would in Jupyter).
        definers = [i for i in definers if i > tagged_at[-1]]
    used = tagged_at + definers
    if not used:
        return ExerciseSource(exercise_id, names, None, "missing")
    source = "\n\n".join(_code(cells[i]) for i in sorted(used))
    return ExerciseSource(exercise_id, names, source, "moved" if definers else "cell")


def build_program(student: nbformat.NotebookNode, canonical: nbformat.NotebookNode, chapter: str) -> Program:
    steps: list[Step] = []
    exercises: dict[str, ExerciseSource] = {}
    chapter_cells: list[str] = []
    canonical_sources = {c.source for c in canonical.cells if c.cell_type == "code"}
    for cell in canonical.cells:
        if cell.cell_type != "code":
            continue
        tags = _tags(cell)
        if "skip-grading" in tags or "solution-only" in tags:
            continue
        exercise_id = str(cell.metadata.get("exercise", ""))
        if "exercise" in tags:
            names = sorted(defined_names(cell.source))
            exercises[exercise_id] = _student_sources(student, exercise_id, names, canonical_sources)
            steps.append(Step("exercise", exercises[exercise_id].source or "", exercise_id))
        elif "check" in tags:
            steps.append(Step("check", cell.source, exercise_id, _check_calls(cell.source),
                              float(cell.metadata.get("points", 1))))
        else:
            steps.append(Step("cell", cell.source))
            chapter_cells.append(cell.source)
    last_check = max((i for i, s in enumerate(steps) if s.kind == "check"), default=-1)
    return Program(chapter, steps[: last_check + 1], exercises, chapter_cells)
