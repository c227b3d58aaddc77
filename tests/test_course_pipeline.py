"""The chapter pipeline and the grader: regeneration is stable, every check fails on the stub and
passes on the solution, and edited check cells cannot fool the grader."""

from __future__ import annotations

import copy

import nbformat
import pytest

from miniinfer.course import grade, notebooks


def _chapters():
    return [p.stem for p in notebooks.solution_sources()]


def test_chapters_are_regenerated_from_solutions():
    """`make sync` would change nothing and every solution notebook holds its .py's executed cells."""
    assert notebooks.sync(check_only=True) == [], "run `make sync` (chapters are generated from solutions)"
    assert notebooks.stale_solutions() == [], "run `make execute` (solution notebooks are stale)"


def test_strip_solutions_keeps_indentation_and_names_the_function():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    stub = notebooks.strip_solutions(source, "3.2")
    assert "return x + y" not in stub
    assert '    raise NotImplementedError("Exercise 3.2: implement `f`")' in stub
    assert "    y = 1" in stub


@pytest.mark.parametrize("source", [
    "def f():\n    ### BEGIN SOLUTION\n    pass\n",
    "def f():\n    pass\n    ### END SOLUTION\n",
    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n",
])
def test_unbalanced_markers_are_rejected(source):
    with pytest.raises(notebooks.PipelineError):
        notebooks.strip_solutions(source, "1.1")


def test_validate_requires_a_check_per_exercise():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n")
    cell.metadata.update(tags=["exercise"], exercise="1.1")
    nb.cells = [cell]
    with pytest.raises(notebooks.PipelineError, match="without a check"):
        notebooks.validate(nb, "01_blocks")


@pytest.mark.parametrize("chapter", _chapters())
def test_checks_fail_on_stub_and_pass_on_solution(chapter):
    """Grade the generated chapter (all stubs) and the solution (all answers) with the real grader."""
    stub_grade = grade.grade_notebook(notebooks.chapters_dir() / f"{chapter}.ipynb", cell_timeout=600)
    solution_grade = grade.grade_notebook(notebooks.solutions_dir() / f"{chapter}.ipynb", cell_timeout=600)
    exercise_ids = notebooks.validate(nbformat.read(notebooks.solutions_dir() / f"{chapter}.ipynb", 4), chapter)
    assert [e.exercise for e in stub_grade.exercises] == exercise_ids
    for result in stub_grade.exercises:
        assert result.status == "not implemented", f"{chapter} exercise {result.exercise} on the stub: {result}"
        assert f"Exercise {result.exercise}" in result.message and "not implemented yet" in result.message
    for result in solution_grade.exercises:
        assert result.status == "passed", f"{chapter} exercise {result.exercise} on the solution: {result}"
    assert solution_grade.score == solution_grade.max_score > 0


def test_grader_ignores_edited_checks_and_flags_tampering(tmp_path):
    chapter = _chapters()[0]
    solution = nbformat.read(notebooks.solutions_dir() / f"{chapter}.ipynb", 4)
    student = nbformat.read(notebooks.chapters_dir() / f"{chapter}.ipynb", 4)
    cheat = copy.deepcopy(student)
    exercise_cells = [c for c in cheat.cells if "exercise" in c.metadata.get("tags", [])]
    for cell in cheat.cells:
        if "check" in cell.metadata.get("tags", []):
            cell.source = "print('✅ all good')"  # an edited check must not count
    # The first exercise answered correctly (taken from the solution), with a suspicious extra line.
    first_id = exercise_cells[0].metadata["exercise"]
    answer = next(c for c in solution.cells if c.metadata.get("exercise") == first_id
                  and "exercise" in c.metadata.get("tags", []))
    exercise_cells[0].source = answer.source + "\nimport sys\n_ = sys.modules"
    path = tmp_path / f"{chapter}_student.ipynb"
    nbformat.write(cheat, path)

    result = grade.grade_notebook(path, cell_timeout=600)
    statuses = {e.exercise: e.status for e in result.exercises}
    assert statuses[first_id] == "passed"
    assert all(s == "not implemented" for k, s in statuses.items() if k != first_id)
    flagged = {e.exercise: e.flagged for e in result.exercises}
    assert "sys.modules" in flagged[first_id]
    table = grade.report([result], tmp_path / "out")
    assert "passed" in table and (tmp_path / "out" / "grades.csv").exists()
