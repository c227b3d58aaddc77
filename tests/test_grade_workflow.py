"""The student's workflow: work/ copies, the student edition, and "Run All" past unfinished exercises."""

from __future__ import annotations

import nbformat
import pytest

from miniinfer.course.edition import write_edition
from miniinfer.course.notebooks import chapters_dir, repo_root
from miniinfer.course.workspace import prepare_work


def test_work_copies_are_made_once_and_never_overwritten(tmp_path):
    work = tmp_path / "work"
    created = prepare_work(chapters_dir(), work)
    assert {p.name for p in created} == {p.name for p in chapters_dir().glob("*.ipynb")}
    mine = work / created[0].name
    nb = nbformat.read(mine, 4)
    assert "jupytext" not in nb.metadata  # saving in JupyterLab writes no paired .py
    assert nb.metadata["miniinfer_chapter"] == mine.stem  # the grader still knows the chapter
    nb.cells[0].source = "my notes"
    nbformat.write(nb, mine)
    (work / created[1].name).unlink()  # "start this chapter afresh"
    assert [p.name for p in prepare_work(chapters_dir(), work)] == [created[1].name]
    assert nbformat.read(mine, 4).cells[0].source == "my notes"


def test_student_edition_has_no_answer_key(tmp_path):
    out = tmp_path / "edition"
    written = write_edition(out, repo_root())
    assert not (out / "solutions").exists() and not any(w.startswith("solutions/") for w in written)
    assert (out / "GRADING.md").exists() and "miniinfer grade" in (out / "GRADING.md").read_text()
    makefile = (out / "Makefile").read_text()
    assert "book.py serve --solutions chapters" in makefile and "scripts/test.sh" not in makefile
    for notebook in (out / "chapters").glob("*.ipynb"):
        nb = nbformat.read(notebook, 4)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert not any("### BEGIN SOLUTION" in c.source for c in nb.cells)
    with pytest.raises(FileExistsError):
        write_edition(out, repo_root())


def test_an_unfinished_exercise_prints_one_line_and_does_not_stop_run_all():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def run(code):
            printed = []
            reply = kc.execute_interactive(code, timeout=120, output_hook=lambda m: printed.append(
                m["content"].get("text", m["content"].get("ename", ""))))
            return reply["content"]["status"], "".join(printed)

        assert run("import miniinfer.course")[0] == "ok"
        status, printed = run("def f():\n    raise NotImplementedError('Exercise 3.2: implement `f`')\n\n"
                              "try:\n    f()\nexcept NotImplementedError as e:\n    raise RuntimeError('engine') from e")
        assert status == "ok" and printed.strip().startswith("⏳ Exercise 3.2 is not implemented yet")
        assert "Traceback" not in printed
        status, printed = run("1 / 0")
        assert status == "error" and "ZeroDivisionError" in printed  # real errors still stop Run All
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
