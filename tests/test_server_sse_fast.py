"""The streamed chunks of the common case (one prompt, n = 1, no logprobs) are written from a template
(``miniinfer.server.api._ChunkTemplate``) instead of ``json.dumps`` of the whole chunk: the bytes must be
the same, whatever the text, the finish reason and the usage field. And the streamed response itself
(``_EventStreamResponse``, no anyio task group): a disconnect, seen by ``receive`` (ASGI 2.3 servers) or as
an OSError from ``send`` (2.4), reaches ``on_disconnect``; a stream that ends leaves no task behind."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from miniinfer.server.api import _ChunkTemplate, _EventStreamResponse  # noqa: E402
from miniinfer.server.tracing import random_hex  # noqa: E402

TEXTS = ["", " my", 'say "hi"\n\tand \\ go', "ünïcödé — 漢字 🙂", "\x00\x1f\u2028", "</script>"]
FIXED = {"id": "cmpl-0123abc", "object": "text_completion", "created": 1700000000, "model": 'mo"del ü'}


@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("reason", [None, "length", "stop", "abort"])
def test_completion_chunk_template_writes_what_json_dumps_writes(usage, reason):
    trailer = {"usage": None} if usage else {}
    template = _ChunkTemplate(FIXED, "text", trailer)
    for text in TEXTS:
        expected = json.dumps({**FIXED, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": reason}], **trailer}, ensure_ascii=False)
        assert template(json.dumps(text, ensure_ascii=False), reason) == expected


@pytest.mark.parametrize("usage", [True, False])
def test_chat_chunk_template_writes_what_json_dumps_writes(usage):
    fixed = {**FIXED, "object": "chat.completion.chunk"}
    trailer = {"usage": None} if usage else {}
    template = _ChunkTemplate(fixed, "delta", trailer)

    def expected(delta, reason=None):
        return json.dumps({**fixed, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": reason}], **trailer}, ensure_ascii=False)

    assert template('{"role": "assistant", "content": ""}') == expected({"role": "assistant", "content": ""})
    for text in TEXTS:
        assert template('{"content": ' + json.dumps(text, ensure_ascii=False) + "}") == expected({"content": text})
    assert template("{}", "stop") == expected({}, "stop")


def test_random_ids_are_hex_of_the_right_length_and_differ():
    ids = {random_hex(128) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) > 0 for i in ids)
    assert all(len(random_hex(64)) == 16 for _ in range(100))


def _serve_events(send_fails_after: int | None, disconnect_after: float | None):
    """Run an _EventStreamResponse of an endless event stream (one event per 2 ms, ended by
    on_disconnect) against a fake ASGI server; return (events sent, on_disconnect calls, error)."""
    sent, calls = [], []

    async def main():
        stop = asyncio.Event()

        async def events():
            for i in range(500):
                if stop.is_set():
                    yield "data: [DONE]\n\n"
                    return
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.002)

        def on_disconnect():
            calls.append(True)
            stop.set()

        async def receive():
            if disconnect_after is None:
                await asyncio.Event().wait()  # never: the client stays
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}

        async def send(message):
            if send_fails_after is not None and len(sent) >= send_fails_after:
                raise OSError("connection reset")
            sent.append(message)

        response = _EventStreamResponse(events(), on_disconnect, media_type="text/event-stream")
        error = None
        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except Exception as raised:  # noqa: BLE001 - the test looks at it
            error = raised
        await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        return error, leftover

    error, leftover = asyncio.run(main())
    return sent, calls, error, leftover


def test_event_stream_response_ends_the_stream_when_the_client_disconnects():
    sent, calls, error, leftover = _serve_events(send_fails_after=None, disconnect_after=0.05)
    assert calls == [True] and error is None and not leftover
    bodies = [m.get("body", b"") for m in sent]
    assert 2 <= len(bodies) < 400 and b"data: [DONE]\n\n" in bodies and sent[-1]["more_body"] is False


def test_event_stream_response_treats_a_failed_send_as_a_disconnect():
    from starlette.requests import ClientDisconnect

    sent, calls, error, leftover = _serve_events(send_fails_after=3, disconnect_after=None)
    assert calls == [True] and isinstance(error, ClientDisconnect) and len(sent) == 3 and not leftover


def test_event_stream_response_leaves_no_watcher_behind_when_the_stream_ends():
    sent, calls, error, leftover = _serve_events(send_fails_after=None, disconnect_after=None)
    # 500 events and the final empty body: the client never left, so nothing was aborted
    assert calls == [] and error is None and not leftover and len(sent) == 1 + 500 + 1
