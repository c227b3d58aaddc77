"""Grading student notebooks so that no submission can fool the grader or change another's grade.

The verdict is computed in the grader's own process; the student's code runs in a separate Jupyter
kernel, in a throwaway copy of the course, and only data crosses between the two.

======================  ==========================================================================
module                  one idea
======================  ==========================================================================
:mod:`.program`         the canonical chapter with the student's exercise code spliced in
:mod:`.scan`            what an exercise cell imports or calls that it should not (syntax tree)
:mod:`.sandbox`         the course read once into memory; a fresh copy of it per submission
:mod:`.kernel`          the student's kernel: clean environment, deadlines, interrupt, kill
:mod:`.wire`            what may cross between the two processes, and the restricted decoder
:mod:`.rpc`             calls across the wire: proxies both ways, in-place changes written back
:mod:`.worker`          the student's side: serves the grader's calls inside the kernel
:mod:`.grader`          one notebook from start to score
:mod:`.report`          the table, the causes of lost points, ``grades.csv`` and ``grades.json``
======================  ==========================================================================

The command line is :mod:`miniinfer.course.grade` (``miniinfer grade``).
"""

from miniinfer.course.grading.grader import ExerciseResult, Grader, NotebookGrade

__all__ = ["ExerciseResult", "Grader", "NotebookGrade"]
