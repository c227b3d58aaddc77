"""Check functions for every exercise, one module per chapter; call them from check cells.

``check.<exercise_function_name>(student_function)`` — each one prints a ✅ line or raises
:class:`~miniinfer.course.checking.CheckFailed` with a message you can act on.
"""

from miniinfer.course.check.ch00_setup import *  # noqa: F401,F403
from miniinfer.course.check.ch01_building_blocks import *  # noqa: F401,F403
from miniinfer.course.check.ch02_rope import *  # noqa: F401,F403
from miniinfer.course.check.ch03_attention import *  # noqa: F401,F403
from miniinfer.course.check.ch04_qwen2 import *  # noqa: F401,F403
from miniinfer.course.check.ch05_kv_cache import *  # noqa: F401,F403
from miniinfer.course.check.ch06_continuous_batching import *  # noqa: F401,F403
from miniinfer.course.check.ch07_paged_attention import *  # noqa: F401,F403
from miniinfer.course.check.ch08_radix_cache import *  # noqa: F401,F403
from miniinfer.course.check.ch09_flash_attention import *  # noqa: F401,F403
from miniinfer.course.check.ch10_speculative_decoding import *  # noqa: F401,F403
from miniinfer.course.check.ch11_quantization import *  # noqa: F401,F403
from miniinfer.course.check.ch12_parallelism import *  # noqa: F401,F403
from miniinfer.course.check.ch13_serving import *  # noqa: F401,F403
