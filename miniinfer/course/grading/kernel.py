"""A student's Jupyter kernel: started in a throwaway folder with a clean environment, run cell by cell
with a deadline, interrupted when a cell runs too long, killed when an interrupt does not help.

Outputs are not kept (a submission may print gigabytes); only each cell's own exception is, as one
line (``SyntaxError: invalid syntax (line 4)``), so the grader can name the cause of a lost point.
"""

from __future__ import annotations

import os
import queue
import re
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CellOutcome", "StudentKernel", "clean_environment"]

# Environment variables a kernel may inherit: where programs and caches live, locale, thread counts,
# the GPU it may use. Nothing else (tokens, credentials, the grader's own settings) reaches it.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL",
              "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "TRITON_INTERPRET", "TRITON_CACHE_DIR")
INTERRUPT_GRACE_S = 5.0  # after an interrupt, how long a kernel has to become idle before it is killed


def clean_environment(python_path: Path) -> dict[str, str]:
    """The kernel's environment: the inherited allowlist, and ``python_path`` first on ``sys.path``."""
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env["PYTHONPATH"] = str(python_path)
    env["PYTHONNOUSERSITE"] = "1"
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


@dataclass
class CellOutcome:
    status: str  # "ok" | "error" (the cell raised) | "timeout" (interrupted) | "dead" (the kernel died)
    error: str = ""  # the cell's own exception, one line


def _error_line(content: dict) -> str:
    name, value = content.get("ename", "Error"), str(content.get("evalue", "")).strip()
    text = f"{name}: {value}" if value else name
    if name in ("SyntaxError", "IndentationError", "TabError"):
        # IPython's traceback names the cell line ("Cell In[3], line 4"); keep just the line number.
        for line in content.get("traceback", []):
            match = re.search(r"line (\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            if match and "line" not in value:
                text += f" (line {match.group(1)})"
                break
    return text[:500]


class StudentKernel:
    """A python3 kernel whose working directory is ``cwd`` and whose environment is ``env``."""

    def __init__(self, cwd: Path, env: dict[str, str], log_path: Path):
        self.cwd, self.env, self.log_path = cwd, env, log_path
        self.km = self.kc = None
        self.dead = False
        self._log = None

    def __enter__(self) -> StudentKernel:
        from jupyter_client.manager import KernelManager

        self._log = open(self.log_path, "wb")
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(self.cwd), env=self.env, stdout=self._log, stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=120)
        except RuntimeError:
            self.dead = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # already gone
                pass
        if self._log is not None:
            self._log.close()
        self.km = self.kc = self._log = None

    # -- running code ---------------------------------------------------------------------------------
    def begin(self, code: str, silent: bool = False) -> str:
        """Send ``code`` for execution and return at once (its message id)."""
        return self.kc.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                               stop_on_error=False)

    def finish(self, msg_id: str, timeout: float) -> CellOutcome:
        """Wait for ``msg_id`` to finish; on timeout interrupt (then kill) the kernel."""
        outcome = self._wait(msg_id, time.monotonic() + max(timeout, 0.0))
        if outcome is not None:
            return outcome
        self.interrupt()
        if self._wait(msg_id, time.monotonic() + INTERRUPT_GRACE_S) is None:
            self.kill()
        return CellOutcome("timeout", f"did not finish within {timeout:.0f} s")

    def run(self, code: str, timeout: float) -> CellOutcome:
        if self.dead:
            return CellOutcome("dead", "the kernel is not running")
        return self.finish(self.begin(code), timeout)

    def _wait(self, msg_id: str, deadline: float) -> CellOutcome | None:
        """Drain the kernel's output until ``msg_id`` is idle: its outcome, or None at the deadline."""
        error = ""
        while True:
            if self.dead:
                return CellOutcome("dead", "the kernel died")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                message = self.kc.get_iopub_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.km.is_alive():
                    self.dead = True
                continue
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "error":
                error = _error_line(content)
            elif kind == "status" and content.get("execution_state") == "idle":
                return CellOutcome("error" if error else "ok", error)

    def interrupt(self) -> None:
        if not self.dead:
            try:
                self.km.interrupt_kernel()
            except Exception:
                self.dead = not self.km.is_alive()

    def kill(self) -> None:
        try:
            self.km.shutdown_kernel(now=True)
        except Exception:
            pass
        self.dead = True
