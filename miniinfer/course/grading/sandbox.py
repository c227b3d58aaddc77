"""Every submission runs in a throwaway copy of the course, made from files the grader read at start.

At start the grader reads the package (``miniinfer/``, with the check modules and bundled models),
``csrc/`` and ``benchmarks/results/`` into memory, with a SHA-256 of each file: a :class:`Snapshot`.
For each submission a :class:`Workspace` writes that snapshot to a new temporary folder, which becomes
the kernel's working directory and the first entry of its ``sys.path``: the student's kernel imports
*this* copy of ``miniinfer``, there is no ``solutions/`` next to it, and nothing the submission writes
there outlives it. After the submission the copy is compared with the snapshot: a submission that
changed the package it was given (a check module, a reference) is reported, and the folder deleted.

Before each submission the grader also compares the snapshot with the files on disk, so changes to
the installed check modules while a batch runs are reported; grading always uses the copies read at
start (the grader imported its checks from them before any submission ran).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snapshot", "Workspace"]

_SKIPPED_PARTS = {"__pycache__", ".ipynb_checkpoints"}


@dataclass(frozen=True)
class _File:
    data: bytes
    sha256: str
    mtime_ns: int


class Snapshot:
    """The course files a submission's kernel needs, read once into memory (relative path -> file)."""

    def __init__(self, package_dir: Path, extra_dirs: dict[str, Path]):
        self.package_dir = package_dir
        self.files: dict[str, _File] = {}
        self.sources: dict[str, Path] = {}
        self._read(package_dir, package_dir.name)
        for name, folder in extra_dirs.items():
            if folder.is_dir():
                self._read(folder, name)

    def _read(self, folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if not path.is_file() or _SKIPPED_PARTS & set(relative.parts) or path.suffix == ".pyc":
                continue
            data = path.read_bytes()
            key = f"{prefix}/{relative.as_posix()}"
            self.files[key] = _File(data, hashlib.sha256(data).hexdigest(), path.stat().st_mtime_ns)
            self.sources[key] = path

    def changed_on_disk(self, prefix: str) -> list[str]:
        """Files under ``prefix`` whose content on disk is no longer what the snapshot holds."""
        changed = []
        for key, file in self.files.items():
            if key.startswith(prefix):
                try:
                    digest = hashlib.sha256(self.sources[key].read_bytes()).hexdigest()
                except OSError:
                    digest = ""
                if digest != file.sha256:
                    changed.append(key)
        return changed

    def write_to(self, root: Path) -> None:
        for key, file in self.files.items():
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(file.data)
            os.utime(path, ns=(file.mtime_ns, file.mtime_ns))  # keeps Python's bytecode caches valid

    def differences(self, root: Path, prefix: str) -> list[str]:
        """Files under ``root/prefix`` added, changed or deleted relative to the snapshot."""
        found = {}
        for path in (root / prefix).rglob("*"):
            relative = path.relative_to(root)
            if path.is_file() and not (_SKIPPED_PARTS & set(relative.parts)) and path.suffix != ".pyc":
                found[relative.as_posix()] = path
        expected = {k: f for k, f in self.files.items() if k.startswith(prefix + "/")}
        changed = sorted(set(found) ^ set(expected))
        for key in set(found) & set(expected):
            if hashlib.sha256(found[key].read_bytes()).hexdigest() != expected[key].sha256:
                changed.append(key)
        return sorted(changed)


class Workspace:
    """A temporary folder holding a fresh copy of the snapshot; deleted on exit.

    ``course`` is the kernel's working directory and ``sys.path`` entry; ``private`` holds the kernel's
    log and the socket the grader listens on.
    """

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.root = Path(tempfile.mkdtemp(prefix="miniinfer-grade-"))
        self.course = self.root / "course"
        self.private = self.root / "private"

    def __enter__(self) -> Workspace:
        self.course.mkdir()
        self.private.mkdir()
        self.snapshot.write_to(self.course)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def tampered_files(self) -> list[str]:
        """Files of the package copy the submission added, changed or deleted."""
        return self.snapshot.differences(self.course, self.snapshot.package_dir.name)
