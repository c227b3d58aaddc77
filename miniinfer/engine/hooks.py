"""Engine internals a chapter lets you replace with your own function (chapters 05–08).

    llm = LLM(hooks=EngineHooks(slot_mapping=my_slot_mapping))

Every field defaults to None, meaning "the package's own implementation". A hook has exactly the
signature of the package function it replaces (documented on each field), so the chapter's stub,
the reference and the check agree. The engine passes this object to the parts that use it
(model runner, block manager, radix cache, attention context); nothing is monkey-patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineHooks:
    """Replaceable engine functions; None = the package's implementation."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is not None and not callable(value):
                raise ValueError(f"EngineHooks.{name} must be a function or None, got {type(value).__name__}")

    def get(self, name: str, default: Callable) -> Callable:
        """The hook ``name`` if set, else ``default``."""
        value = getattr(self, name, None)
        return default if value is None else value
