"""JSON-lines logs: one JSON object per line, easy to grep and to ship to a log store.

    {"ts": "2026-12-02T11:02:03.123Z", "level": "INFO", "logger": "miniinfer.server.access",
     "msg": "request finished", "request_id": "cmpl-…", "trace_id": "…", "route": "/v1/completions",
     "status": 200, "prompt_tokens": 12, "completion_tokens": 32, "queue_s": 0.001, "ttft_s": 0.04,
     "e2e_s": 0.9, "finish_reason": "length"}

Pass structured fields with ``log.info("…", extra={"fields": {...}})``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "configure_logging"]

LEVELS = ("debug", "info", "warning", "error", "critical")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", stream=None) -> None:
    """JSON lines on stderr for ``miniinfer.*`` and uvicorn's loggers (its access log is replaced by ours)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"--log-level must be one of {LEVELS}, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("miniinfer", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
