"""Course helpers: the checks a chapter's check cells call, the chapter pipeline and the grader.

In a notebook::

    from miniinfer.course import check
    check.vector_add_kernel(vector_add_kernel)

Importing this package inside IPython/Jupyter installs a small exception handler:

* a failed check shows its message (❌ …), not a wall of traceback; the cell still counts as failed;
* an exercise that is not written yet — its check, or a plug-in cell that runs the stub inside the
  engine — prints one line (⏳ Exercise 3.2 is not implemented yet …) and does **not** count as an
  error, so "Run All" on a fresh chapter reaches the end;
* every other error shows IPython's usual traceback.
"""

import re

from miniinfer.course.checking import CheckFailed, NotImplementedYet, _is_stub_error

__all__ = ["CheckFailed", "NotImplementedYet"]


def unfinished_exercise(error: BaseException | None) -> str | None:
    """The exercise id ("3.2") when ``error`` comes from an exercise still holding its stub, else None."""
    if error is None or not (isinstance(error, NotImplementedYet) or _is_stub_error(error)):
        return None
    seen = 0
    while error is not None and seen < 10:
        match = re.search(r"Exercise (\d+\.\d+)", str(error))
        if match:
            return match.group(1)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _install_ipython_handler() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show_course_error(self, etype, value, tb, tb_offset=None):
        exercise = unfinished_exercise(value)
        if isinstance(value, NotImplementedYet):
            print(f"⏳ {value}")
        elif exercise is not None:
            print(f"⏳ Exercise {exercise} is not implemented yet: this cell needs it. Write it, run its check, "
                  "then run this cell again.")
        elif isinstance(value, CheckFailed):
            # IPython's run_code calls this handler but does not display what it returns, so we send the
            # error ourselves: a one-entry "traceback" holding only the verdict. The cell still fails.
            self._showtraceback(etype, value, [f"❌ {value}"])
        else:
            self.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return []

    def forgive_unfinished_exercises(result) -> None:
        # An exercise not written yet is not an error of the cell that needs it: the kernel reports the
        # cell as successful, so "Run All" goes on to the end of the chapter.
        if result is not None and unfinished_exercise(result.error_in_exec) is not None:
            result.error_in_exec = None

    shell.set_custom_exc((Exception,), show_course_error)
    if forgive_unfinished_exercises.__name__ not in {f.__name__ for f in shell.events.callbacks["post_run_cell"]}:
        shell.events.register("post_run_cell", forgive_unfinished_exercises)
    # trio (pulled in by some HTTP libraries) warns on import when any custom handler is installed;
    # ours only formats errors, so the warning is noise in every notebook that imports it.
    import warnings

    warnings.filterwarnings("ignore", message="IPython detected, but you already have a custom exception handler")


_install_ipython_handler()
