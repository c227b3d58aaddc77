"""The continuous-batching engine: sequences, scheduler, paged KV blocks, radix cache, model runner."""

from miniinfer.engine.config import EngineConfig
from miniinfer.engine.engine import LLMEngine
from miniinfer.engine.hooks import EngineHooks

__all__ = ["EngineConfig", "EngineHooks", "LLMEngine"]
