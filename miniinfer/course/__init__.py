"""Course helpers: the checks a chapter's check cells call, the chapter pipeline and the grader.

In a notebook::

    from miniinfer.course import check
    check.vector_add_kernel(vector_add_kernel)

Importing this package inside IPython/Jupyter installs a small exception handler so that a failed
check shows its message, not a wall of traceback (the cell still counts as failed).
"""

from miniinfer.course.checking import CheckFailed, NotImplementedYet

__all__ = ["CheckFailed", "NotImplementedYet"]


def _install_ipython_handler() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show_check_failure(self, etype, value, tb, tb_offset=None):
        marker = "⏳" if issubclass(etype, NotImplementedYet) else "❌"
        # IPython's run_code calls this handler but does not display what it returns, so we send
        # the error ourselves: a one-entry "traceback" holding only the verdict. The cell still
        # fails (the kernel reports an error), which is what nbval and the grader look for.
        self._showtraceback(etype, value, [f"{marker} {value}"])
        return []

    shell.set_custom_exc((CheckFailed,), show_check_failure)
    # trio (pulled in by some HTTP libraries) warns on import when any custom handler is installed;
    # ours only touches CheckFailed, so the warning is noise in every notebook that imports it.
    import warnings

    warnings.filterwarnings("ignore", message="IPython detected, but you already have a custom exception handler")


_install_ipython_handler()

