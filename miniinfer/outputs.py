"""What generation returns: one :class:`RequestOutput` per prompt, holding ``n`` completions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a prompt: the generated part only."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" (EOS, a stop token or string), "length", "abort", "error"; None while running
    new_text: str = ""                 # streaming: text added by the latest step
    new_token_ids: list[int] = field(default_factory=list)  # streaming: tokens added by the latest step
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it (None for EOS)
    error: str | None = None           # finish_reason "error": what went wrong
    logprobs: list[dict[int, float]] | None = None  # per token: {chosen and top-N token ids: logprob}
    cumulative_logprob: float | None = None         # sum of the chosen tokens' logprobs (with logprobs)

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
    finished: bool = False             # every completion has ended
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with SamplingParams.prompt_logprobs

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
    def num_new_tokens(self) -> int:
        """Tokens the latest step added, over all completions (streaming)."""
        if len(self.outputs) == 1:  # the common case, once per streamed token: no generator
            return len(self.outputs[0].new_token_ids)
        return sum(len(c.new_token_ids) for c in self.outputs)

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated so far, over all completions."""
        if len(self.outputs) == 1:
            return len(self.outputs[0].token_ids)
        return sum(len(c.token_ids) for c in self.outputs)

