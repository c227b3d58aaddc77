"""Grade student notebooks against the canonical chapter.

For each student notebook the grader

1. keeps only the student's **exercise cells** (tagged ``exercise``, matched by exercise id),
2. splices them into a fresh copy of the canonical chapter, so edited or deleted check cells and
   anything else the student changed do not count,
3. executes the result in a separate kernel, cell by cell, with a per-cell timeout, skipping cells
   tagged ``skip-grading`` (slow measurements that grade nothing),
4. scores each exercise by its canonical check cell(s): passed, not implemented, failed, timeout.

Exercise cells that reach into the checking machinery (``miniinfer.course``, ``sys.modules``, …)
are flagged in the report for the instructor to look at.

``miniinfer grade [--chapter 02_rope] student1.ipynb student2.ipynb … [--out results]``
"""

from __future__ import annotations

import copy
import csv
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from miniinfer.course.notebooks import CHAPTER_NAME, chapters_dir

SUSPICIOUS = re.compile(r"miniinfer\.course|\bcheck\.|CheckFailed|set_custom_exc|sys\.modules|__builtins__"
                        r"|importlib|get_ipython")


@dataclass
class ExerciseResult:
    exercise: str
    status: str  # passed | not implemented | failed | timeout | error before check | missing
    message: str = ""
    points: float = 0.0
    max_points: float = 1.0
    flagged: str = ""


@dataclass
class NotebookGrade:
    student: str
    chapter: str
    exercises: list[ExerciseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.max_points for e in self.exercises)


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def find_chapter(student_nb: nbformat.NotebookNode, student_path: Path, chapter: str | None) -> Path:
    """The canonical chapter notebook: named explicitly, from the notebook's metadata, or its name."""
    name = chapter or student_nb.metadata.get("miniinfer_chapter")
    if not name:
        match = re.match(r"(\d\d)", student_path.stem)
        name = match.group(1) if match else None
    if not name:
        raise ValueError(f"{student_path}: cannot tell which chapter this is; pass --chapter NN")
    candidates = [p for p in chapters_dir().glob("*.ipynb")
                  if CHAPTER_NAME.match(p.stem) and (p.stem == name or p.stem.startswith(str(name)[:2]))]
    if len(candidates) != 1:
        raise ValueError(f"no single canonical chapter matches {name!r} in {chapters_dir()}")
    return candidates[0]


def splice(student: nbformat.NotebookNode, canonical: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, dict]:
    """The canonical notebook with its exercise cells replaced by the student's ones."""
    by_id: dict[str, list[str]] = {}
    for cell in student.cells:
        if cell.cell_type == "code" and "exercise" in _tags(cell) and cell.metadata.get("exercise"):
            by_id.setdefault(str(cell.metadata["exercise"]), []).append(cell.source)
    merged = copy.deepcopy(canonical)
    flags: dict[str, str] = {}
    for cell in merged.cells:
        if cell.cell_type == "code" and "exercise" in _tags(cell):
            exercise_id = str(cell.metadata["exercise"])
            if exercise_id in by_id:
                cell.source = "\n\n".join(by_id[exercise_id])
                hits = sorted(set(SUSPICIOUS.findall(cell.source)))
                if hits:
                    flags[exercise_id] = "exercise cell mentions " + ", ".join(hits)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return merged, flags


def _error_text(cell) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.get("traceback", [])]
            text = "\n".join(lines).strip() or f"{output.get('ename')}: {output.get('evalue')}"
            # The course's exception handler prints just the verdict; otherwise keep the last line.
            return text if len(text) < 2000 else text[-2000:]
    return None


def execute(nb: nbformat.NotebookNode, workdir: Path, cell_timeout: int) -> dict[int, str]:
    """Run the notebook cell by cell; return {cell index: 'timeout' | 'dead kernel'} for cells that never finished."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})
    unfinished: dict[int, str] = {}
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or "skip-grading" in _tags(cell):
                continue
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                unfinished[index] = "timeout"
            except DeadKernelError:
                for later in range(index, len(nb.cells)):
                    unfinished[later] = "dead kernel"
                break
    return unfinished


def grade_notebook(student_path: Path, chapter: str | None = None, cell_timeout: int = 300) -> NotebookGrade:
    student = nbformat.read(student_path, as_version=4)
    canonical_path = find_chapter(student, Path(student_path), chapter)
    canonical = nbformat.read(canonical_path, as_version=4)
    merged, flags = splice(student, canonical)
    started = time.perf_counter()
    unfinished = execute(merged, canonical_path.parent, cell_timeout)
    grade = NotebookGrade(student=Path(student_path).stem, chapter=canonical_path.stem,
                          seconds=time.perf_counter() - started)

    results: dict[str, ExerciseResult] = {}
    for index, cell in enumerate(merged.cells):
        if cell.cell_type != "code" or "check" not in _tags(cell):
            continue
        exercise_id = str(cell.metadata["exercise"])
        points = float(cell.metadata.get("points", 1))
        error = _error_text(cell)
        if index in unfinished:
            result = ExerciseResult(exercise_id, unfinished[index], f"the check cell did not finish ({unfinished[index]})")
        elif error is None and cell.execution_count is None:
            result = ExerciseResult(exercise_id, "not run", "the check cell was not executed")
        elif error is None:
            result = ExerciseResult(exercise_id, "passed", "", points)
        elif "not implemented yet" in error:
            result = ExerciseResult(exercise_id, "not implemented", error.splitlines()[-1])
        else:
            last = [line for line in error.splitlines() if line.strip()]
            result = ExerciseResult(exercise_id, "failed", "\n".join(last[:6]))
        result.max_points = points
        result.flagged = flags.get(exercise_id, "")
        previous = results.get(exercise_id)
        if previous is None:
            results[exercise_id] = result
        elif result.status != "passed" and previous.status == "passed":  # several checks: all must pass
            result.max_points = previous.max_points + points
            results[exercise_id] = result
        else:
            previous.max_points += points
            previous.points += result.points
    grade.exercises = [results[k] for k in sorted(results, key=lambda s: [int(p) for p in s.split(".")])]
    return grade


def report(grades: list[NotebookGrade], out_dir: Path | None = None) -> str:
    exercise_ids = sorted({e.exercise for g in grades for e in g.exercises}, key=lambda s: [int(p) for p in s.split(".")])
    header = ["student", "chapter"] + [f"ex {i}" for i in exercise_ids] + ["score", "max", "flags"]
    rows = []
    for grade in grades:
        by_id = {e.exercise: e for e in grade.exercises}
        cells = [by_id[i].status if i in by_id else "-" for i in exercise_ids]
        flags = "; ".join(f"{e.exercise}: {e.flagged}" for e in grade.exercises if e.flagged)
        rows.append([grade.student, grade.chapter, *cells, f"{grade.score:g}", f"{grade.max_score:g}", flags])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    table = "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "grades.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        (out_dir / "grades.json").write_text(json.dumps(
            [{**asdict(g), "score": g.score, "max_score": g.max_score} for g in grades], indent=2))
    return table


def main(args) -> int:
    grades = []
    for path in args.notebooks:
        print(f"grading {path} ...", flush=True)
        grade = grade_notebook(Path(path), args.chapter, args.timeout)
        for result in grade.exercises:
            if result.status != "passed" and args.verbose:
                print(f"  {result.exercise}: {result.status}: {result.message}")
        grades.append(grade)
    print(report(grades, Path(args.out) if args.out else None))
    return 0
