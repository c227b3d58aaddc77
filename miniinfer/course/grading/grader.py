"""Grade one student notebook: run it in a throwaway kernel, run the checks in the grader's process.

For each submission the :class:`Grader`

1. builds the grading program (:mod:`.program`): the canonical chapter with the student's exercise
   code spliced in, and scans each exercise's code (:mod:`.scan`);
2. starts a kernel in a fresh copy of the course (:mod:`.sandbox`, :mod:`.kernel`) and runs the
   program's cells in order, each with a deadline, under a wall limit for the whole notebook;
3. at each check, connects to the kernel and runs the check **here**, in the grader's process, with
   the check functions it imported before any submission ran; the student's functions are called
   through proxies (:mod:`.rpc`) and only data comes back (:mod:`.wire`). Whatever the student's code
   does in its own kernel (patch the checks, install exception handlers, print ✅ lines, rewrite
   files) cannot change a verdict;
4. scores each exercise: its points when every check passed and its code was not flagged (unless
   ``allow_flagged``), else 0, with the cause.

Exercise statuses: ``passed``, ``failed``, ``not implemented``, ``timeout``, ``error`` (the exercise
cell itself raised, e.g. ``SyntaxError``, and defined nothing), ``missing`` (no cell for it, nothing
defining its function), ``crashed`` (the kernel died during its check), ``not run`` (the kernel died or
the wall limit was reached before it). Notebook statuses: ``graded``, ``unreadable``, ``timeout``,
``crashed``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import nbformat

from miniinfer.course.grading import rpc, wire
from miniinfer.course.grading.kernel import StudentKernel, clean_environment
from miniinfer.course.grading.program import Program, Step, build_program, exercise_id_order, find_chapter
from miniinfer.course.grading.sandbox import Snapshot, Workspace
from miniinfer.course.grading.scan import chapter_rules, scan_exercise

__all__ = ["ExerciseResult", "NotebookGrade", "Grader", "score"]

CONNECT_TIMEOUT_S = 60.0  # how long the kernel has to connect back for a check


@dataclass
class ExerciseResult:
    exercise: str
    status: str = "not run"
    message: str = ""  # the cause of every lost point; the ✅ line when passed
    points: float = 0.0
    max_points: float = 0.0
    flagged: str = ""  # what the scanner found in the exercise's code ("" = clean)
    location: str = "cell"  # "cell" | "moved" (found in an untagged cell) | "missing"


@dataclass
class NotebookGrade:
    student: str
    chapter: str
    path: str = ""
    status: str = "graded"  # graded | unreadable | timeout | crashed
    message: str = ""
    flagged: str = ""  # notebook-wide findings (a submission that changed the package it was given)
    exercises: list[ExerciseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.max_points for e in self.exercises)


def score(grade: NotebookGrade, allow_flagged: bool = False) -> None:
    """Give each exercise its points when it passed and, unless ``allow_flagged``, nothing was flagged."""
    for result in grade.exercises:
        flagged = result.flagged or grade.flagged
        earned = result.status == "passed" and (allow_flagged or not flagged)
        result.points = result.max_points if earned else 0.0


class _GraderPeer(rpc.Peer):
    """The grader's end: serves the student's requests on objects the grader handed out, and only those."""

    def __init__(self, connection):
        super().__init__(connection, own="G")

    def perform(self, op, args):
        target = args[0] if args else None
        number = self._number_of.get(id(target))
        if number is None or self._exported.get(number) is not target:
            raise TypeError("the grader only answers requests about objects it handed to your code")
        if op == "call":
            return target(*args[1], **args[2]), None
        if op == "getattr":
            name = args[1]
            if not isinstance(name, str) or name.startswith("_"):
                raise AttributeError(f"{name!r} is not readable from your code")
            return getattr(target, name), None
        if op == "getitem":
            return target[args[1]], None
        if op == "len":
            return len(target), None
        if op == "iter":
            return list(target), None
        if op == "contains":
            return args[1] in target, None
        if op == "bool":
            return bool(target), None
        if op == "repr":
            return repr(target)[:2000], None
        raise ValueError(f"unknown request {op!r}")


class _SessionFailed(Exception):
    """The kernel could not serve a check (it did not connect back)."""


def _load_checks() -> dict[str, object]:
    """Every check function, imported now, before any submission runs, with what they import lazily."""
    import miniinfer.course.check  # noqa: F401  (imports every chapter's module)

    checks: dict[str, object] = {}
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("miniinfer.course.check.ch"):
            continue
        for export in getattr(module, "__all__", []):
            checks[export] = getattr(module, export)
        # Imports inside check functions happen at grading time: make them now, from today's files.
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module]
            for target in targets:
                try:
                    importlib.import_module(target)
                except Exception:  # optional dependencies (transformers, triton) may be absent
                    pass
    return checks


class Grader:
    """Grades notebooks one by one; create one per batch (it reads the course and the checks once)."""

    def __init__(self, cell_timeout: float = 300, wall_timeout: float = 1800, allow_flagged: bool = False,
                 chapters_dir: Path | None = None):
        import miniinfer
        from miniinfer.course.notebooks import chapters_dir as default_chapters_dir

        self.cell_timeout, self.wall_timeout, self.allow_flagged = cell_timeout, wall_timeout, allow_flagged
        package_dir = Path(miniinfer.__file__).resolve().parent
        root = package_dir.parent
        self.chapters_dir = chapters_dir or (root / "chapters" if (root / "chapters").is_dir()
                                             else default_chapters_dir())
        self.checks = _load_checks()
        self.snapshot = Snapshot(package_dir, {"csrc": root / "csrc",
                                               "benchmarks/results": root / "benchmarks" / "results"})
        self.warnings: list[str] = []

    # -- one notebook ---------------------------------------------------------------------------------
    def grade(self, path: Path | str, chapter: str | None = None) -> NotebookGrade:
        """Grade one notebook. Never raises for anything the notebook holds or does."""
        path = Path(path)
        started = time.monotonic()
        grade = NotebookGrade(student=path.stem, chapter=str(chapter or "?"), path=str(path))
        try:
            student = nbformat.read(path, as_version=4)
            canonical_path = find_chapter(student, path, chapter, self.chapters_dir)
            canonical = nbformat.read(canonical_path, as_version=4)
            program = build_program(student, canonical, canonical_path.stem)
        except Exception as error:  # not JSON, not a notebook, no such chapter, …
            grade.status, grade.message = "unreadable", f"{type(error).__name__}: {error}"[:400]
            grade.seconds = time.monotonic() - started
            return grade
        grade.chapter = program.chapter
        results = self._empty_results(program)
        grade.exercises = [results[k] for k in sorted(results, key=exercise_id_order)]
        self._scan(program, results)
        drift = self.snapshot.changed_on_disk("miniinfer/course/check")
        if drift and not self.warnings:
            self.warnings.append("the check modules on disk changed since the grader started "
                                 f"({', '.join(drift)}); grading uses the copies read at start")
        guarded = self._grader_files_on_disk()
        try:
            with Workspace(self.snapshot) as box:
                _Run(self, program, results, grade, box, started).run()
                tampered = box.tampered_files()
        except Exception as error:  # the grader's own trouble (no kernel could start, …): this notebook only
            grade.status, grade.message = "crashed", f"grading failed: {type(error).__name__}: {error}"[:400]
            tampered = []
        tampered += self._restore_grader_files(guarded)
        if tampered:
            grade.flagged = "changed the grader's files: " + ", ".join(tampered[:6])
        score(grade, self.allow_flagged)
        grade.seconds = time.monotonic() - started
        return grade

    def _grader_files_on_disk(self) -> dict[Path, bytes]:
        """The installed ``miniinfer/course`` files (the grader and its checks) as they are now."""
        course = self.snapshot.package_dir / "course"
        return {p: p.read_bytes() for p in course.rglob("*.py") if "__pycache__" not in p.parts}

    def _restore_grader_files(self, before: dict[Path, bytes]) -> list[str]:
        """Put back any installed grader file a submission reached and changed (by absolute path); name them."""
        changed = []
        after = self._grader_files_on_disk()
        for path in sorted(set(before) | set(after)):
            if before.get(path) != after.get(path):
                changed.append(f"{path.relative_to(self.snapshot.package_dir.parent)} (on disk, restored)")
                if path in before:
                    path.write_bytes(before[path])
                else:
                    path.unlink()
        return changed

    def _empty_results(self, program: Program) -> dict[str, ExerciseResult]:
        results = {}
        for exercise_id, exercise in program.exercises.items():
            results[exercise_id] = ExerciseResult(exercise_id, location=exercise.location)
        for step in program.steps:
            if step.kind == "check":
                results.setdefault(step.exercise_id, ExerciseResult(step.exercise_id)).max_points += step.points
        return results

    def _scan(self, program: Program, results: dict[str, ExerciseResult]) -> None:
        check_names = {c.check_name for s in program.steps if s.kind == "check" for c in s.checks}
        files = {f"miniinfer/course/check/{Path(sys.modules[self.checks[n].__module__].__file__).name}"
                 for n in check_names if n in self.checks}
        sources = [self.snapshot.files[f].data.decode() for f in sorted(files) if f in self.snapshot.files]
        names = {n for e in program.exercises.values() for n in e.names}
        rules = chapter_rules(sources, names, program.chapter_cells)
        for exercise_id, exercise in program.exercises.items():
            if exercise.source:
                results[exercise_id].flagged = "; ".join(scan_exercise(exercise.source, rules))


class _Run:
    """One submission's kernel session: runs the program's steps, fills in the results."""

    def __init__(self, grader: Grader, program: Program, results: dict[str, ExerciseResult],
                 grade: NotebookGrade, box: Workspace, started: float):
        self.grader, self.program, self.results, self.grade, self.box = grader, program, results, grade, box
        self.deadline = started + grader.wall_timeout
        self.cell_outcomes: dict[str, object] = {}  # exercise id -> the exercise cell's CellOutcome
        self.sessions = 0

    def run(self) -> None:
        env = clean_environment(self.box.course)
        with StudentKernel(self.box.course, env, self.box.private / "kernel.log") as kernel:
            self.kernel = kernel
            halted = self._run_steps()
        if halted:
            for result in self.results.values():
                if result.status == "not run":
                    result.message = halted

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _run_steps(self) -> str:
        """Run every step; return why the run stopped early ("" when it did not)."""
        for step in self.program.steps:
            if self.kernel.dead:
                self.grade.status = "crashed" if self.grade.status == "graded" else self.grade.status
                return self.grade.message or "the kernel died before this exercise"
            if self._remaining() <= 0:
                self.grade.status = "timeout"
                self.grade.message = f"the notebook's wall limit ({self.grader.wall_timeout:g} s) was reached"
                return self.grade.message
            timeout = min(self.grader.cell_timeout, self._remaining())
            if step.kind == "cell":
                outcome = self.kernel.run(step.source, timeout)
                if outcome.status == "dead":
                    self.grade.message = "the kernel died in a cell of the chapter (after the student's code ran)"
            elif step.kind == "exercise":
                if step.source:
                    outcome = self.cell_outcomes[step.exercise_id] = self.kernel.run(step.source, timeout)
                    if outcome.status == "dead":
                        self.grade.message = f"the kernel died while running exercise {step.exercise_id}'s cell"
            else:
                self._check(step, timeout)
        return ""

    # -- checks ---------------------------------------------------------------------------------------
    def _check(self, step: Step, timeout: float) -> None:
        result = self.results[step.exercise_id]
        exercise = self.program.exercises.get(step.exercise_id)
        if exercise is None or exercise.location == "missing":
            names = ", ".join(f"`{n}`" for n in (exercise.names if exercise else []))
            self._set(result, "missing", f"no exercise cell {step.exercise_id} and no cell defining {names}")
            return
        names = sorted({name for call in step.checks for name in call.arguments})
        try:
            peer, finish = self._open_session(timeout)
        except _SessionFailed as error:
            self._set(result, "crashed", f"the kernel could not run the check: {error}")
            return
        verdict = None
        try:
            peer.deadline = time.monotonic() + timeout
            found = peer.request("lookup", names)[0]
            absent = [n for n in names if not isinstance(found, dict) or n not in found]
            if absent:
                verdict = self._absent(step.exercise_id, absent)
            else:
                verdict = self._run_checks(step, [found[n] for n in names], names, timeout)
        except rpc.StudentTimeout:
            verdict = ("timeout", f"the student's code did not return within {timeout:.0f} s")
        except rpc.StudentGone:
            verdict = ("crashed", "the kernel died (or hung up) while the check ran")
        except wire.WireError as error:
            verdict = ("failed", f"the kernel sent something the grader does not accept: {error}")
        except Exception as error:  # the kernel answered the lookup with nonsense
            verdict = ("failed", f"the check could not start: {type(error).__name__}: {error}")
        finally:
            killed = finish(verdict is not None and verdict[0] in ("timeout", "crashed"))
        if killed and verdict[0] == "timeout":
            verdict = (verdict[0], verdict[1] + "; the kernel did not stop when interrupted and was killed")
            self.grade.status = "timeout"
            self.grade.message = f"the kernel was killed after exercise {step.exercise_id} timed out"
        elif self.kernel.dead:
            self.grade.status = "crashed"
            self.grade.message = f"the kernel died during exercise {step.exercise_id}'s check"
        self._set(result, *verdict)

    def _absent(self, exercise_id: str, absent: list[str]) -> tuple[str, str]:
        outcome = self.cell_outcomes.get(exercise_id)
        if outcome is not None and outcome.status == "error":
            return "error", f"the exercise cell raised {outcome.error}"
        if outcome is not None and outcome.status == "timeout":
            return "timeout", f"the exercise cell {outcome.error}"
        return "missing", f"`{absent[0]}` is not defined (renamed or deleted?)"

    def _run_checks(self, step: Step, objects: list, names: list[str], timeout: float) -> tuple[str, str]:
        from miniinfer.course.checking import CheckFailed, NotImplementedYet

        by_name = dict(zip(names, objects))
        lines = []
        for call in step.checks:
            check = self.grader.checks.get(call.check_name)
            if check is None:
                return "failed", f"the grader has no check called {call.check_name}"
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    check(*[by_name[a] for a in call.arguments])
            except NotImplementedYet as error:
                return "not implemented", str(error)
            except CheckFailed as error:
                return "failed", str(error)
            except (rpc.StudentTimeout, rpc.StudentGone):
                raise
            except Exception as error:  # e.g. a value the proxy cannot stand in for
                return "failed", f"the check could not finish: {type(error).__name__}: {error}"
            lines.append(printed.getvalue().strip().splitlines()[-1:] or [""])
        return "passed", " ".join(line[0] for line in lines).strip()

    def _open_session(self, timeout: float):
        """Start the serving line in the kernel, accept its connection: (peer, finish(kill_first) -> killed)."""
        self.sessions += 1
        address = str(self.box.private / f"check-{self.sessions}.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(1)
        server.settimeout(min(CONNECT_TIMEOUT_S, max(timeout, 1.0)))
        msg_id = self.kernel.begin(f"__import__('miniinfer.course.grading.worker', fromlist=['serve'])"
                                   f".serve({address!r}, globals())", silent=True)
        try:
            client, _ = server.accept()
        except (TimeoutError, OSError):
            server.close()
            outcome = self.kernel.finish(msg_id, 5.0)
            raise _SessionFailed(outcome.error or "it did not connect back") from None
        server.close()
        client.settimeout(None)
        connection = Connection(client.detach())
        peer = _GraderPeer(connection)

        def finish(stop_now: bool) -> bool:
            if not stop_now:
                try:
                    peer.deadline = time.monotonic() + 10
                    peer.request("bye")
                except (rpc.StudentTimeout, rpc.StudentGone, Exception):
                    stop_now = True
            connection.close()
            was_dead = self.kernel.dead
            self.kernel.finish(msg_id, 0.0 if stop_now else 10.0)
            return self.kernel.dead and not was_dead

        return peer, finish

    @staticmethod
    def _set(result: ExerciseResult, status: str, message: str) -> None:
        result.status, result.message = status, message
