"""The answers a chapter's exercise cells define, for the check-module tests of chapters 10-13."""

from __future__ import annotations

from pathlib import Path

from miniinfer.course.notebooks import read_py


def exercise_answers(path: Path, preamble: str = "", namespace: dict | None = None) -> dict:
    """Run ``preamble`` and then every code cell tagged ``exercise`` of the jupytext file at ``path`` in one
    namespace (the solution's answers, or the student chapter's stubs), and return that namespace."""
    namespace = {} if namespace is None else dict(namespace)
    exec(preamble, namespace)
    for cell in read_py(path).cells:
        if cell.cell_type == "code" and "exercise" in cell.metadata.get("tags", []):
            exec(cell.source, namespace)
    return namespace
