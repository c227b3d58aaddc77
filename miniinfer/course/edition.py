"""The student edition: the course without its answer key, for courses that grade.

``python -m miniinfer.course.edition OUT`` (``make student-edition OUT=…``) writes the repository's
tracked files to ``OUT`` except

* ``solutions/`` (the answer keys, source and executed) and the tests that need them;

and adapts what referred to them:

* the book renders the student chapters (``chapters/``, no outputs) instead of the executed answer
  keys, so no answer-key page is built;
* ``make execute`` / ``make sync`` explain that they belong to the instructors' repository, and
  ``make test`` runs the linter and the unit tests;
* ``GRADING.md`` tells instructors how to grade submissions (run the grader from this edition: then no
  answer key exists on the grading machine at all).

Give students the edition; keep the full repository for yourself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from miniinfer.course.notebooks import repo_root

__all__ = ["write_edition", "ANSWER_KEY_PATHS"]

# What a student edition leaves out: the answer keys and the tests that grade or execute them.
ANSWER_KEY_PATHS = ("solutions/", "tests/test_course_pipeline.py", "tests/test_grade_hostile.py",
                    "tests/test_book.py", ".ci/")

MAKEFILE_RECIPES = {
    "test": "\t$(VENV)/bin/ruff check .\n\t$(PY) -m pytest -q tests",
    "book": "\t$(PY) scripts/book.py serve --solutions chapters",
    "execute": "\t@echo \"The student edition has no answer key: 'make execute' belongs to the instructors' repository.\"",
    "sync": "\t@echo \"The student edition has no answer key: 'make sync' belongs to the instructors' repository.\"",
}

GRADING = """# Grading (instructors)

This is the **student edition** of MiniInfer: the chapters without their answer keys. Students work in
`make lab` (their notebooks live in `work/`) and hand in `work/NN_slug.ipynb`.

Grade from this edition, so that no answer key exists on the grading machine:

```bash
make install
.venv/bin/miniinfer grade submissions/*.ipynb --out grades/          # or: --chapter 02_rope
```

* Each notebook runs in its own throwaway kernel, in a fresh copy of the course (no `solutions/`, a
  clean environment). The checks run in the grader's own process and call the student's functions
  through proxies into that kernel: patching the checks, printing ✅ lines or installing exception
  handlers in the notebook changes nothing.
* Only each student's exercise cells count (edited check cells and text do not); an answer written in
  a new, untagged cell is found by its function's name ("moved"); a deleted exercise is "missing".
* Exercise cells are scanned: importing the package's reference answers or the checks, `exec`/`eval`/
  `open`/`__import__`, IPython internals are flagged, and a flagged exercise scores 0 unless you pass
  `--allow-flagged` (read the flag first).
* `--timeout S` (per cell and per check, default 300; runaway code is interrupted, then killed) and
  `--wall-timeout S` (per notebook, default 1800). A batch never stops: every notebook gets a status
  (`graded`, `unreadable`, `timeout`, `crashed`), `grades.csv` and `grades.json` are rewritten after
  each one, and the report names the cause of every lost point.

Isolation is a folder and a process, not a container: a submission runs as the user who runs the
grader and can still write wherever that user can. Grade as an unprivileged user (or in a container)
if that matters to you.
"""


def tracked_files(root: Path) -> list[str]:
    """The repository's tracked files (``git ls-files``), or every file when git is not available."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return sorted(name for name in listing.decode().split("\0") if name)
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", "work", "site", "build", ".pytest_cache", ".ruff_cache"}
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(root).parts))


def _rewrite_recipes(makefile: str) -> str:
    """Replace the recipe of each target in :data:`MAKEFILE_RECIPES` (a target line, then tab lines)."""
    for target, recipe in MAKEFILE_RECIPES.items():
        pattern = re.compile(rf"^({re.escape(target)}:[^\n]*\n)(?:\t[^\n]*\n)+", re.MULTILINE)
        makefile, count = pattern.subn(lambda m, recipe=recipe: m.group(1) + recipe + "\n", makefile)
        if count != 1:
            raise ValueError(f"the Makefile has no single '{target}:' target to adapt")
    return makefile


def write_edition(out: Path, root: Path | None = None) -> list[str]:
    """Write the student edition to ``out`` (which must not exist yet); return the files written."""
    root = root or repo_root()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    written = []
    for name in tracked_files(root):
        if name.startswith(ANSWER_KEY_PATHS) or not (root / name).is_file():
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
        written.append(name)
    if (out / "Makefile").exists():
        (out / "Makefile").write_text(_rewrite_recipes((out / "Makefile").read_text()))
    (out / "GRADING.md").write_text(GRADING)
    written.append("GRADING.md")
    readme = out / "README.md"
    if readme.exists():
        readme.write_text("> **Student edition**: the chapters without their answer keys. Instructors: see "
                          "[GRADING.md](GRADING.md).\n\n" + readme.read_text())
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miniinfer.course.edition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        written = write_edition(args.out)
    except (FileExistsError, ValueError) as error:
        print(f"student edition: {error}", file=sys.stderr)
        return 2
    print(f"wrote the student edition ({len(written)} files) to {args.out}; instructors: {args.out}/GRADING.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
