"""Write miniinfer-dashboard.json (the Grafana dashboard) next to this file: python deploy/grafana/make_dashboard.py

Every query is also evaluated against a real Prometheus scraping a test server
(tests/test_server.py::test_prometheus_scrapes_and_every_dashboard_query_returns_data).
"""

import json
from pathlib import Path


def q(expr, legend):
    return {"expr": expr, "legendFormat": legend, "refId": None, "datasource": {"type": "prometheus", "uid": "${datasource}"}}

def hist(metric, title, unit="s"):
    targets = [q(f'histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{job=~"$job"}}[$__rate_interval])))', f"p{int(p*100)}")
               for p in (0.5, 0.9, 0.99)]
    return title, targets, unit

panels_spec = [
    hist("miniinfer_time_to_first_token_seconds", "Time to first token"),
    hist("miniinfer_inter_token_latency_seconds", "Inter-token latency"),
    hist("miniinfer_e2e_request_latency_seconds", "End-to-end request latency"),
    hist("miniinfer_request_queue_time_seconds", "Queue time"),
    ("Token throughput", [q('sum(rate(miniinfer_generation_tokens_total{job=~"$job"}[$__rate_interval]))', "generated tok/s"),
                          q('sum(rate(miniinfer_prompt_tokens_total{job=~"$job"}[$__rate_interval]))', "prompt tok/s")], "short"),
    ("Finished requests by reason", [q('sum by (finished_reason) (rate(miniinfer_request_success_total{job=~"$job"}[$__rate_interval]))', "{{finished_reason}}"),
                                     q('sum(rate(miniinfer_requests_rejected_total{job=~"$job"}[$__rate_interval]))', "rejected (503)")], "reqps"),
    ("Requests running / waiting", [q('sum(miniinfer_num_requests_running{job=~"$job"})', "running"),
                                    q('sum(miniinfer_num_requests_waiting{job=~"$job"})', "waiting")], "short"),
    ("KV-cache use", [q('avg(miniinfer_kv_cache_usage_ratio{job=~"$job"})', "KV pool used")], "percentunit"),
    ("Prefix-cache hit rate", [q('sum(rate(miniinfer_prefix_cache_hit_tokens_total{job=~"$job"}[$__rate_interval])) / '
                                 'clamp_min(sum(rate(miniinfer_prompt_tokens_total{job=~"$job"}[$__rate_interval])), 1e-9)', "hit tokens / prompt tokens")], "percentunit"),
    ("Preemptions", [q('sum(rate(miniinfer_num_preemptions_total{job=~"$job"}[$__rate_interval]))', "preemptions/s")], "short"),
    ("Engine busy", [q('sum(rate(miniinfer_engine_busy_seconds_total{job=~"$job"}[$__rate_interval]))', "busy fraction")], "percentunit"),
    ("GPU memory and utilization (GPU servers)", [q('miniinfer_gpu_memory_bytes{job=~"$job", kind="used"}', "used {{device}}"),
                                                   q('miniinfer_gpu_utilization_ratio{job=~"$job"}', "util {{device}}")], "bytes"),
]
panels = []
for i, (title, targets, unit) in enumerate(panels_spec):
    for j, t in enumerate(targets):
        t["refId"] = "ABCDEFGH"[j]
    panels.append({"id": i + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
                   "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
                   "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                   "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                   "targets": targets})
dashboard = {
    "title": "MiniInfer serving", "uid": "miniinfer-serving", "schemaVersion": 39, "version": 1, "editable": True,
    "tags": ["miniinfer", "llm"], "time": {"from": "now-30m", "to": "now"}, "refresh": "10s",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "job", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": "label_values(miniinfer_engine_steps_total, job)", "includeAll": True, "multi": True,
         "current": {"text": "All", "value": "$__all"}, "allValue": ".*", "refresh": 2},
    ]},
    "panels": panels,
}
out = Path(__file__).resolve().parent / "miniinfer-dashboard.json"
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out} ({len(panels)} panels)")
