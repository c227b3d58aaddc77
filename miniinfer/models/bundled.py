"""The small models that ship inside the package, so that every chapter runs offline on a CPU.

They are trained by ``scripts/bundled_models/`` on Shakespeare's works and stored as ordinary
Hugging Face folders (config.json, model.safetensors, tokenizer files, a model card) under
``miniinfer/data/models/<name>``.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODELS = {
    "shakespeare": "Qwen2ForCausalLM, ~4.4 M parameters: the course's main model",
    "shakespeare-draft": "Qwen2ForCausalLM, ~0.5 M parameters: a speculative-decoding draft for `shakespeare`",
    "shakespeare-moe": "Qwen2MoeForCausalLM, ~4 M parameters: a tiny mixture of experts",
}

_DATA = Path(__file__).resolve().parent.parent / "data" / "models"


def bundled_model_path(name: str = "shakespeare") -> Path:
    """The folder of a bundled model: ``"shakespeare"``, ``"shakespeare-draft"`` or ``"shakespeare-moe"``."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {sorted(BUNDLED_MODELS)}")
    path = _DATA / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"bundled model {name!r} is missing from {path}; reinstall miniinfer or run "
                                "scripts/bundled_models (see its README) to rebuild it")
    return path
