"""The streamed chunks of the common case (one prompt, n = 1, no logprobs) are written from a template
(``miniinfer.server.api._ChunkTemplate``) instead of ``json.dumps`` of the whole chunk: the bytes must be
the same, whatever the text, the finish reason and the usage field."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from miniinfer.server.api import _ChunkTemplate  # noqa: E402
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
