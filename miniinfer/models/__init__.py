"""Model definitions (Qwen2; Qwen2-MoE later) and the bundled checkpoints."""

from miniinfer.models.bundled import BUNDLED_MODELS, bundled_model_path

__all__ = ["BUNDLED_MODELS", "bundled_model_path"]
