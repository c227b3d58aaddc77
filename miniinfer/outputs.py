"""What generation returns: one :class:`RequestOutput` per prompt, holding ``n`` completions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a prompt: the generated part only."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" (EOS or a stop string), "length", "abort"; None while running
    new_text: str = ""                 # streaming: text added by the latest step
    new_token_ids: list[int] = field(default_factory=list)  # streaming: tokens added by the latest step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A prompt and its completions (``outputs``); ``.text``/``.token_ids`` are those of the first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0         # prompt tokens served by the prefix cache

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
