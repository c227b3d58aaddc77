"""The student's own copies of the chapters: ``work/NN_slug.ipynb``, made once, never overwritten.

``make lab`` opens JupyterLab on ``work/`` (git-ignored), not on ``chapters/``: saving a notebook never
rewrites a tracked file, and ``make sync`` / ``make execute`` (which regenerate ``chapters/``) never
touch your answers. Each run copies the chapters that are not in ``work/`` yet (a chapter added to the
course appears there the next time); to start a chapter afresh, delete its copy and run ``make lab``.

The copies drop jupytext's pairing metadata (so saving writes only the ``.ipynb``) and keep
``miniinfer_chapter``, which tells the grader which chapter a notebook is.

``python -m miniinfer.course.workspace [--chapters DIR] [--work DIR]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from miniinfer.course.notebooks import CHAPTER_NAME, chapters_dir, repo_root

__all__ = ["prepare_work"]


def prepare_work(chapters: Path, work: Path) -> list[Path]:
    """Copy every chapter notebook missing from ``work``; return the new copies (existing ones untouched)."""
    work.mkdir(parents=True, exist_ok=True)
    created = []
    for source in sorted(chapters.glob("*.ipynb")):
        target = work / source.name
        if not CHAPTER_NAME.match(source.stem) or target.exists():
            continue
        nb = nbformat.read(source, as_version=4)
        nb.metadata.pop("jupytext", None)
        nbformat.write(nb, target)
        created.append(target)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miniinfer.course.workspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", type=Path, default=chapters_dir())
    parser.add_argument("--work", type=Path, default=repo_root() / "work")
    args = parser.parse_args(argv)
    created = prepare_work(args.chapters, args.work)
    where = args.work.relative_to(Path.cwd()) if args.work.is_relative_to(Path.cwd()) else args.work
    if created:
        print(f"copied {len(created)} chapter(s) into {where}/: " + ", ".join(p.name for p in created))
    print(f"Your notebooks live in {where}/ (never overwritten). To start a chapter afresh: "
          f"rm {where}/NN_slug.ipynb, then make lab.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
