"""MiniInfer: a small, readable, fast LLM inference engine, built chapter by chapter.

    from miniinfer import LLM, SamplingParams
    llm = LLM()                                          # the bundled Shakespeare model
    outs = llm.generate(["ROMEO:"], SamplingParams(temperature=0.0, max_tokens=64))
    print(outs[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

from miniinfer.models.bundled import bundled_model_path

__all__ = ["__version__", "bundled_model_path"]
