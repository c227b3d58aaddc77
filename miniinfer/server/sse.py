"""Server-sent events (SSE): the streaming format of OpenAI's API (the WHATWG ``text/event-stream``).

An event is a few ``field: value`` lines ended by a blank line. ``data`` carries the payload; a
payload with line breaks becomes one ``data:`` line per line (the reader joins them back with
``\\n``); an optional ``event:`` line names the event type. OpenAI streams one JSON object per event
and ends with the payload ``[DONE]``::

    data: {"id": "cmpl-1", "choices": [{"index": 0, "text": " my"}]}

    data: [DONE]

"""

from __future__ import annotations

import re

__all__ = ["format_sse", "parse_sse"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def format_sse(data: str, event: str | None = None) -> str:
    """One event: an optional ``event:`` line, one ``data:`` line per line of ``data``, a blank line."""
    if event is None and "\n" not in data and "\r" not in data:
        # The common case, once per streamed chunk: a JSON payload (json.dumps escapes line breaks).
        return f"data: {data}\n\n"
    lines = [] if event is None else [f"event: {event}"]
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return "\n".join(lines) + "\n\n"


def parse_sse(text: str) -> list[tuple[str, str]]:
    """``(event type, data)`` of each event in a stream (the WHATWG rules, without ids and retry)."""
    events, data, event = [], [], "message"
    for line in _LINE_BREAK.split(text):
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            data, event = [], "message"
            continue
        if line.startswith(":"):  # a comment (keep-alive)
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    return events
