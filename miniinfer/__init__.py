"""MiniInfer: a small, readable, fast LLM inference engine, built chapter by chapter.

    from miniinfer import LLM, SamplingParams
    llm = LLM()                                          # the bundled Shakespeare model
    outs = llm.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=64))
    print(outs[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from miniinfer.models.bundled import bundled_model_path

__all__ = ["__version__", "bundled_model_path", "LLM", "SamplingParams", "load_model"]

# Imported on first use, so that `import miniinfer` (and the course helpers) stay quick.
_LAZY = {"LLM": "miniinfer.llm", "SamplingParams": "miniinfer.sampling", "load_model": "miniinfer.loader"}

if TYPE_CHECKING:
    from miniinfer.llm import LLM
    from miniinfer.loader import load_model
    from miniinfer.sampling import SamplingParams


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'miniinfer' has no attribute {name!r}")
