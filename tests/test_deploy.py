"""deploy/: the Docker, compose, Kubernetes and Helm files parse and agree with each other and with the server
(port 8000, probes on /health, the HPA's custom metric served by the adapter rule from a real gauge), the
entrypoint builds the right `miniinfer serve` command, and the health check script tells 200 from 503.

Tools that are absent are skipped (yamllint, promtool, kubectl, kubernetes-validate, helm or helm_python);
the YAML parsing and cross-checks with PyYAML always run. CPU only, a few seconds."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PORT = 8000
YAML_FILES = sorted(p for p in DEPLOY.rglob("*.y*ml") if "templates" not in p.parts)


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def by_kind(docs: list, kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    assert load_all(path), path


def test_yamllint():
    if shutil.which("yamllint") is None:
        pytest.skip("yamllint not installed (Debian: apt-get install yamllint)")
    config = "{extends: default, rules: {line-length: {max: 130}, document-start: disable, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}}}"
    ours = [p for p in YAML_FILES if p.relative_to(DEPLOY).parts[0] in ("compose", "k8s", "helm")]
    result = subprocess.run(["yamllint", "-s", "-d", config, *map(str, ours)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Docker ------------------------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text(encoding="utf-8")


def stage(name: str) -> str:
    text = dockerfile()
    start = re.search(rf"^FROM \S+ AS {name}$", text, re.M)
    assert start, f"no stage {name}"
    end = re.search(r"^FROM ", text[start.end():], re.M)
    return text[start.start(): start.end() + end.start() if end else len(text)]


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_dockerfile_final_stages(name):
    text = stage(name)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "the image must run as a non-root user"
    assert re.search(r"^HEALTHCHECK .*CMD \[\"miniinfer-healthcheck\"\]", text, re.M)
    assert f"EXPOSE {PORT}" in text and f"MINIINFER_PORT={PORT}" in text
    assert 'ENTRYPOINT ["miniinfer-entrypoint"]' in text
    if name == "cuda":
        assert re.search(r"^FROM \$\{CUDA_RUNTIME_IMAGE\} AS cuda$", text, re.M)  # runtime base, not devel
        assert "build_kernels.py" in stage("cuda-build") and "/opt/miniinfer/kernels" in stage("cuda-build")


def test_dockerfile_copies_exist_and_are_not_ignored():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    assert ignore[0] == "*"
    for source in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", dockerfile(), re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY {item}: not in the repository"
            assert any(item == a or item.startswith(a + "/") for a in allowed), f"COPY {item} is excluded by .dockerignore"


def run_entrypoint(*args, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MINIINFER_")}
    environment |= {"MINIINFER_DRY_RUN": "1"} | env
    result = subprocess.run(["sh", str(DEPLOY / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                            env=environment, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_entrypoint_builds_the_serve_command():
    from miniinfer.cli import build_parser

    command = run_entrypoint()
    assert command == ["miniinfer", "serve", "--host", "0.0.0.0", "--port", str(PORT)]
    command = run_entrypoint("--max-num-seqs", "16", MINIINFER_MODEL="/models/qwen.gguf", MINIINFER_DEVICE="cpu",
                             MINIINFER_MAX_WAITING="64", MINIINFER_PORT="9000", MINIINFER_DTYPE="")
    args = build_parser().parse_args(command[1:])  # the command is one our own CLI accepts
    assert (args.command, args.host, args.port, args.model, args.device) == ("serve", "0.0.0.0", 9000,
                                                                              "/models/qwen.gguf", "cpu")
    assert (args.max_num_seqs, args.max_waiting, args.dtype) == (16, 64, None)
    # A first argument that is not an option is a command of its own.
    result = subprocess.run(["sh", str(DEPLOY / "docker" / "entrypoint.sh"), "echo", "hello"], capture_output=True,
                            text=True, timeout=10)
    assert result.stdout.strip() == "hello"


def test_healthcheck_script():
    status = {"/health": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status.get(self.path, 404))
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    script = DEPLOY / "docker" / "healthcheck.py"

    def check(**env):
        return subprocess.run([sys.executable, str(script)], env={**os.environ, **env}, capture_output=True,
                              timeout=10).returncode

    try:
        assert check(MINIINFER_PORT=str(port)) == 0
        status["/health"] = 503  # starting or draining
        assert check(MINIINFER_PORT=str(port)) == 1
    finally:
        server.shutdown()
    assert check(MINIINFER_PORT=str(port)) == 1  # nothing listening


# -- compose and Prometheus ------------------------------------------------------------------------------


def test_compose_ports_dashboard_and_scrape_targets():
    compose_dir = DEPLOY / "compose"
    compose = load_all(compose_dir / "compose.yaml")[0]
    server = compose["services"]["miniinfer"]
    assert server["ports"] == [f"{PORT}:{PORT}"] and server["environment"]["MINIINFER_PORT"] == str(PORT)
    assert server["build"]["target"] == "cpu" and compose["services"]["miniinfer-gpu"]["build"]["target"] == "cuda"
    assert (compose_dir / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert server["healthcheck"]["test"] == ["CMD", "miniinfer-healthcheck"]
    for service in ("prometheus", "grafana"):
        for volume in compose["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_dir / source).exists(), f"{service} mounts missing {source}"
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("../grafana/miniinfer-dashboard.json:") for m in mounts)  # the serving dashboard
    provider = load_all(compose_dir / "grafana/provisioning/dashboards/miniinfer.yaml")[0]
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = load_all(compose_dir / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prometheus = load_all(compose_dir / "prometheus/prometheus.yml")[0]
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"miniinfer:{PORT}"] and prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_alert_rules_use_metrics_the_server_exports():
    source = (ROOT / "miniinfer/server/metrics.py").read_text()
    exported = set(re.findall(r'"(miniinfer_[a-z_]+)"', source))
    rules = load_all(DEPLOY / "compose/prometheus/alerts.yml")[0]["groups"][0]["rules"]
    for rule in rules:
        for name in re.findall(r"miniinfer_[a-z_]+", rule["expr"]):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert base in exported, f"alert {rule['alert']} uses {name}, which the server does not export"


def test_promtool_checks(tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    rules = DEPLOY / "compose/prometheus/alerts.yml"
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    config = (DEPLOY / "compose/prometheus/prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml",
                                                                               str(rules))
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes and Helm --------------------------------------------------------------------------------


def kustomize(overlay: str) -> list:
    if shutil.which("kubectl") is None:
        if overlay != "base":
            pytest.skip("kubectl not installed: the overlay is not rendered")
        return [doc for p in sorted((DEPLOY / "k8s/base").glob("*.yaml")) if p.name != "kustomization.yaml"
                for doc in load_all(p)]
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def check_workload(docs: list, gpu: bool, port_key: str = "MINIINFER_PORT") -> None:
    config = [d for d in docs if d["kind"] == "ConfigMap" and port_key in d.get("data", {})]
    assert len(config) == 1
    deployment, service, config = by_kind(docs, "Deployment"), by_kind(docs, "Service"), config[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["ports"] == [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert service["spec"]["ports"][0]["targetPort"] == "http" and service["spec"]["ports"][0]["port"] == PORT
    selector = service["spec"]["selector"]
    assert all(deployment["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert config["data"][port_key] == str(PORT)
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
    assert config["data"]["MINIINFER_DEVICE"] == ("cuda" if gpu else "cpu")
    assert container["image"].endswith(":cuda" if gpu else ":cpu")
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "miniinfer_requests_waiting"


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_manifests(overlay):
    docs = kustomize(overlay)
    check_workload(docs, gpu=overlay == "gpu")
    try:
        import kubernetes_validate
    except ImportError:
        return
    for doc in docs:  # schema validation against the Kubernetes OpenAPI schemas, strict (no unknown fields)
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_adapter_rule_serves_the_hpa_metric():
    config = by_kind(load_all(DEPLOY / "k8s/monitoring/prometheus-adapter-rules.yaml"), "ConfigMap")
    rule = yaml.safe_load(config["data"]["config.yaml"])["rules"][0]
    assert rule["name"]["as"] == "miniinfer_requests_waiting"
    assert "miniinfer_num_requests_waiting" in rule["seriesQuery"]
    assert '"miniinfer_num_requests_waiting"' in (ROOT / "miniinfer/server/metrics.py").read_text()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def helm_render(values: dict | None) -> list:
    chart = DEPLOY / "helm/miniinfer"
    if shutil.which("helm"):
        extra = []
        if values:
            file = Path(os.environ.get("TMPDIR", "/tmp")) / f"miniinfer-values-{os.getpid()}.yaml"
            file.write_text(yaml.safe_dump(values))
            extra = ["-f", str(file)]
        lint = subprocess.run(["helm", "lint", "--strict", str(chart), *extra], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        out = subprocess.run(["helm", "template", "mi", str(chart), *extra], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    try:  # Helm's own Go SDK through ctypes (PyPI helm-python-sdk), where the helm binary is absent
        from helm_python.chart import Chart, lint
    except ImportError:
        pytest.skip("neither the helm binary nor helm_python (pip install helm-python-sdk): chart not rendered")
    report = lint(str(chart), values, strict=True)
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report
    rendered = Chart.load(str(chart)).render(values, name="mi", namespace="default")
    return [d for name, text in rendered.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_helm_chart(variant):
    chart = DEPLOY / "helm/miniinfer"
    values = load_all(chart / "values.yaml")[0]
    assert values["server"]["port"] == PORT and values["service"]["port"] == PORT
    gpu_values = load_all(chart / "values-gpu.yaml")[0] if variant == "gpu" else None
    if gpu_values is not None:
        gpu_values = gpu_values | {"metrics": {"serviceMonitor": {"enabled": True}, "adapterRules": {"enabled": True},
                                               "prometheusRule": {"enabled": True}}}
    docs = helm_render(gpu_values)
    check_workload(docs, gpu=variant == "gpu")
    if variant == "gpu":
        monitor = by_kind(docs, "ServiceMonitor")
        assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "5s"}
        assert by_kind(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
        adapter = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
        assert len(adapter) == 1
        rules = yaml.safe_load(adapter[0]["data"]["config.yaml"])
        assert rules["rules"][0]["name"]["as"] == "miniinfer_requests_waiting"
