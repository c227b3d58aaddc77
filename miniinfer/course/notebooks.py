"""The chapter pipeline: solutions/NN_slug.py is the source of truth; everything else is derived.

* ``solutions/NN_slug.py`` (jupytext percent format) is written by hand.
* ``solutions/NN_slug.ipynb`` is the same notebook, executed, with outputs kept (``execute``).
* ``chapters/NN_slug.{py,ipynb}`` are generated (``sync``): every ``### BEGIN SOLUTION`` …
  ``### END SOLUTION`` block becomes a stub raising ``NotImplementedError("Exercise N.k: …")``,
  cells tagged ``solution-only`` are dropped, outputs are stripped.

Cell conventions (jupytext cell header metadata)::

    # %% tags=["exercise"] exercise="2.1"     the student's cell, holds solution blocks
    # %% tags=["check"] exercise="2.1"        the check of that exercise
    # %% tags=["skip-grading"]                 slow measurement cell; the grader skips it
    # %% tags=["nbval-ignore-output"]          timings: nbval runs it but does not compare output
    # %% tags=["solution-only"]                instructor material left out of the chapter

Command line: ``python -m miniinfer.course.notebooks {sync,check,execute} [NAMES...]``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import re
import sys
from pathlib import Path

import nbformat

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CHAPTER_NAME = re.compile(r"^(\d\d)_[a-z0-9_]+$")
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
JUPYTEXT_METADATA = {
    "formats": "ipynb,py:percent",
    # Keep the jupytext version out of the .py header so that regeneration is byte-stable.
    "notebook_metadata_filter": "-jupytext.text_representation.jupytext_version",
}


def repo_root() -> Path:
    """The repository root: the folder above the package when it holds ``solutions/``, else cwd."""
    here = Path(__file__).resolve().parents[2]
    if (here / "solutions").is_dir():
        return here
    return Path.cwd()


def solutions_dir() -> Path:
    return repo_root() / "solutions"


def chapters_dir() -> Path:
    return repo_root() / "chapters"


def solution_sources(names: list[str] | None = None) -> list[Path]:
    """All ``solutions/NN_slug.py`` files (or those whose name starts with one of ``names``)."""
    paths = sorted(p for p in solutions_dir().glob("*.py") if CHAPTER_NAME.match(p.stem))
    if names:
        paths = [p for p in paths if any(p.stem.startswith(n) or p.stem == Path(n).stem for n in names)]
    return paths


# ------------------------------------------------------------------------------------------------
# Reading and writing
# ------------------------------------------------------------------------------------------------

def read_py(path: Path) -> nbformat.NotebookNode:
    import jupytext

    return jupytext.read(str(path), fmt="py:percent")


def _normalise(nb: nbformat.NotebookNode, chapter: str) -> nbformat.NotebookNode:
    """Stable metadata and cell ids, so that regenerated files are byte-identical."""
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.NotebookNode(
        kernelspec=dict(KERNELSPEC),
        language_info={"name": "python"},
        jupytext=dict(JUPYTEXT_METADATA),
        miniinfer_chapter=chapter,
    )
    for index, cell in enumerate(nb.cells):
        cell.id = hashlib.sha1(f"{chapter}:{index}".encode()).hexdigest()[:12]
        cell.metadata.pop("lines_to_next_cell", None)
        cell.metadata.pop("execution", None)
    return nb


def write_py_text(nb: nbformat.NotebookNode) -> str:
    import jupytext

    return jupytext.writes(nb, fmt="py:percent")


def write_ipynb_text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


# ------------------------------------------------------------------------------------------------
# Solution -> chapter
# ------------------------------------------------------------------------------------------------

class PipelineError(ValueError):
    """A solution file breaks a convention (unbalanced markers, missing exercise ids, ...)."""


def _stub_block(lines: list[str], exercise_id: str, begin_index: int) -> list[str]:
    """The lines replacing one solution block: a comment and the NotImplementedError."""
    indent = re.match(r"\s*", lines[begin_index]).group(0)
    function = None
    for line in reversed(lines[:begin_index]):
        match = re.match(r"\s*def\s+(\w+)\s*\(", line)
        if match:
            function = match.group(1)
            break
    what = f"implement `{function}`" if function else "write this part"
    return [
        f"{indent}# YOUR CODE HERE (Exercise {exercise_id})",
        f'{indent}raise NotImplementedError("Exercise {exercise_id}: {what}")',
    ]


def strip_solutions(source: str, exercise_id: str) -> str:
    """Replace every BEGIN/END SOLUTION block of a cell's source by a stub."""
    lines = source.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.strip() == BEGIN:
            end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == END), None)
            if end is None:
                raise PipelineError(f"exercise {exercise_id}: '{BEGIN}' without '{END}'")
            if any(lines[j].strip() == BEGIN for j in range(index + 1, end)):
                raise PipelineError(f"exercise {exercise_id}: nested '{BEGIN}'")
            out.extend(_stub_block(lines, exercise_id, index))
            index = end + 1
            continue
        if line.strip() == END:
            raise PipelineError(f"exercise {exercise_id}: '{END}' without '{BEGIN}'")
        out.append(line)
        index += 1
    return "\n".join(out)


def exercise_cells(nb: nbformat.NotebookNode, tag: str = "exercise") -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def validate(nb: nbformat.NotebookNode, chapter: str) -> list[str]:
    """Check the conventions; return the exercise ids in order."""
    number = int(chapter[:2])
    ids: list[str] = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        has_markers = BEGIN in cell.source or END in cell.source
        if has_markers and "exercise" not in tags:
            raise PipelineError(f"{chapter}: a cell with solution markers lacks the 'exercise' tag:\n"
                                f"{cell.source[:200]}")
        if "exercise" in tags or "check" in tags:
            exercise_id = cell.metadata.get("exercise")
            if not exercise_id or not re.fullmatch(rf"{number}\.\d+", str(exercise_id)):
                raise PipelineError(f"{chapter}: cell tagged {tags} needs metadata exercise=\"{number}.k\"")
        if "exercise" in tags:
            if not has_markers:
                raise PipelineError(f"{chapter}: exercise {cell.metadata['exercise']} has no solution block")
            if cell.metadata["exercise"] in ids:
                raise PipelineError(f"{chapter}: exercise {cell.metadata['exercise']} appears twice")
            ids.append(cell.metadata["exercise"])
    checked = {c.metadata["exercise"] for c in exercise_cells(nb, "check")}
    missing = [i for i in ids if i not in checked]
    if missing:
        raise PipelineError(f"{chapter}: exercises without a check cell: {missing}")
    unknown = sorted(checked - set(ids))
    if unknown:
        raise PipelineError(f"{chapter}: check cells for unknown exercises: {unknown}")
    return ids


def make_chapter(solution: nbformat.NotebookNode, chapter: str) -> nbformat.NotebookNode:
    """The student's chapter: solution blocks stubbed, solution-only cells dropped, no outputs."""
    validate(solution, chapter)
    nb = copy.deepcopy(solution)
    cells = []
    for cell in nb.cells:
        if "solution-only" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            if "exercise" in cell.metadata.get("tags", []):
                cell.source = strip_solutions(cell.source, cell.metadata["exercise"])
        cells.append(cell)
    nb.cells = cells
    return _normalise(nb, chapter)


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------

def _expected_files(solution_py: Path) -> dict[Path, str]:
    chapter = solution_py.stem
    solution = _normalise(read_py(solution_py), chapter)
    student = make_chapter(solution, chapter)
    out = chapters_dir()
    return {
        out / f"{chapter}.py": write_py_text(student),
        out / f"{chapter}.ipynb": write_ipynb_text(student),
    }


def sync(names: list[str] | None = None, check_only: bool = False) -> list[str]:
    """Regenerate chapters from solutions. With ``check_only``, return the files that would change."""
    changed: list[str] = []
    chapters_dir().mkdir(exist_ok=True)
    for solution_py in solution_sources(names):
        for path, text in _expected_files(solution_py).items():
            current = path.read_text() if path.exists() else None
            if current != text:
                changed.append(str(path.relative_to(repo_root())))
                if check_only:
                    diff = difflib.unified_diff((current or "").splitlines(), text.splitlines(),
                                                "committed", "regenerated", lineterm="", n=1)
                    print("\n".join(list(diff)[:40]))
                else:
                    path.write_text(text)
    if check_only:
        known = {p.stem for p in solution_sources()}
        for path in chapters_dir().glob("*.*"):
            if path.suffix in (".py", ".ipynb") and path.stem not in known:
                changed.append(f"{path.relative_to(repo_root())} (no solution for it)")
    return changed


def stale_solutions(names: list[str] | None = None) -> list[str]:
    """Solutions whose executed .ipynb does not hold the cells of their .py (re-run `make execute`)."""
    stale = []
    for solution_py in solution_sources(names):
        ipynb = solution_py.with_suffix(".ipynb")
        if not ipynb.exists():
            stale.append(f"{ipynb.name}: missing")
            continue
        executed = nbformat.read(ipynb, as_version=4)
        expected = _normalise(read_py(solution_py), solution_py.stem)
        got = [(c.cell_type, c.source, sorted(c.metadata.get("tags", []))) for c in executed.cells]
        want = [(c.cell_type, c.source, sorted(c.metadata.get("tags", []))) for c in expected.cells]
        if got != want:
            stale.append(f"{ipynb.name}: its cells differ from {solution_py.name}")
            continue
        unrun = [i for i, c in enumerate(executed.cells) if c.cell_type == "code" and c.source.strip()
                 and c.execution_count is None]
        if unrun:
            stale.append(f"{ipynb.name}: cells {unrun[:5]} were never executed")
    return stale


def execute(names: list[str] | None = None, timeout: int = 900) -> None:
    """Execute each solution top to bottom in a fresh kernel and store it with outputs."""
    from nbclient import NotebookClient

    for solution_py in solution_sources(names):
        chapter = solution_py.stem
        nb = _normalise(read_py(solution_py), chapter)
        print(f"executing {solution_py.name} ...", flush=True)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(solutions_dir())}})
        client.execute()
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        solution_py.with_suffix(".ipynb").write_text(write_ipynb_text(nb))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miniinfer.course.notebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sync", "check", "execute"])
    parser.add_argument("names", nargs="*", help="chapter names or number prefixes (default: all)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        changed = sync(args.names)
        print(f"regenerated {len(changed)} file(s)" + "".join(f"\n  {c}" for c in changed))
        return 0
    if args.command == "execute":
        execute(args.names)
        sync(args.names)
        return 0
    problems = [f"{c} would change: run `make sync`" for c in sync(args.names, check_only=True)]
    problems += [f"{s}: run `make execute`" for s in stale_solutions(args.names)]
    for problem in problems:
        print("✗", problem)
    if not problems:
        print(f"chapters and solutions are in sync ({len(solution_sources(args.names))} chapter(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
