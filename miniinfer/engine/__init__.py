"""The continuous-batching engine: sequences, scheduler, paged KV blocks, radix cache, model runner."""

from miniinfer.engine.config import EngineConfig
from miniinfer.engine.engine import LLMEngine

__all__ = ["EngineConfig", "LLMEngine"]
