"""Check functions for every exercise, one module per chapter; call them from check cells.

``check.<exercise_function_name>(student_function)`` — each one prints a ✅ line or raises
:class:`~miniinfer.course.checking.CheckFailed` with a message you can act on.
"""

from miniinfer.course.check.ch00_setup import *  # noqa: F401,F403
