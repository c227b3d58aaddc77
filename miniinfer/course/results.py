"""Recorded benchmark results (``benchmarks/results/*.json``) for chapters that show GPU numbers on a CPU."""

from __future__ import annotations

import json

from miniinfer.course.notebooks import repo_root


def results_dir():
    return repo_root() / "benchmarks" / "results"


def load_results(benchmark: str) -> list[dict]:
    """All recorded runs of ``benchmark`` (GPU runs first, then by date, newest first)."""
    records = [json.loads(p.read_text()) for p in sorted(results_dir().glob(f"{benchmark}_*.json"))]
    records = [r for r in records if r.get("benchmark") == benchmark]
    records.sort(key=lambda r: r.get("date", ""), reverse=True)
    records.sort(key=lambda r: r.get("device") != "cuda")
    return records


def load_result(benchmark: str, device: str = "cuda") -> dict | None:
    """The newest recorded run of ``benchmark`` on ``device`` ("cuda" or "cpu"), or None."""
    for record in load_results(benchmark):
        if record.get("device") == device:
            return record
    return None


def caption(record: dict) -> str:
    """'NVIDIA H100 80GB HBM3 · 2026-11-26 · python benchmarks/x.py' for figure titles and notes."""
    return f"{record['card']} · {record['date'][:10]} · {record['command']}"
