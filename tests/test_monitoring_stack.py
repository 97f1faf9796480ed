"""The compose file's monitoring profile, checked without Docker: Prometheus and Grafana start only
with the profile, Prometheus scrapes the API's service, port and route with the token's secret,
Grafana is provisioned with that Prometheus and the dashboard, and every metric the dashboard
queries is one GET /metrics exports (scraped from the app on the real PostgreSQL)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, MetricPoint
from tests.conftest import MakeUser
from tests.test_compose import COMPOSE_FILE, ROOT, SECRETS, interpolate

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "ddpm-jobs.json"
PROFILED = {"prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), SECRETS))


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (./...)."""
    pairs = (volume.split(":")[:2] for volume in service.get("volumes", []))
    return {target: source for source, target in pairs if source.startswith("./")}


def test_the_profile_starts_only_when_asked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiled = {name for name, svc in services.items() if "monitoring" in svc.get("profiles", [])}
    assert profiled == PROFILED
    for name in PROFILED:
        assert services[name]["profiles"] == ["monitoring"], name
    for name, svc in services.items():  # nothing started by default waits for them
        if "profiles" not in svc:
            assert not PROFILED & set(svc.get("depends_on", {})), name
    # Interpolation needs none of the profile's settings: `docker compose up` runs without them.
    assert yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), SECRETS))["services"]["api"]


def test_prometheus_scrapes_the_api_with_the_token(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    prometheus, api = services["prometheus"], services["api"]
    config_path = next(t for t in mounts(prometheus) if t.endswith("prometheus.yml"))
    assert f"--config.file={config_path}" in prometheus["command"]
    config = yaml.safe_load((ROOT / mounts(prometheus)[config_path]).read_text())
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "api" and port == api["environment"]["DDPM_PORT"]
    assert job["metrics_path"] == "/metrics"
    app = create_app(Settings(data_dir=tmp_path))
    assert TestClient(app).get(job["metrics_path"]).status_code == 401  # the route, asking for the token
    # The token: a compose secret from DDPM_METRICS_TOKEN, the same variable the API reads.
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert prometheus["secrets"] == ["metrics_token"]
    assert compose["secrets"]["metrics_token"] == {"environment": "DDPM_METRICS_TOKEN"}
    assert api["environment"]["DDPM_METRICS_TOKEN"] == ""  # unset here: admin keys only
    token = "t" * 40
    with_token = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), SECRETS | {"DDPM_METRICS_TOKEN": token}))
    env = with_token["services"]["api"]["environment"]
    assert Settings(metrics_token=env["DDPM_METRICS_TOKEN"]).metrics_token.get_secret_value() == token


def test_the_api_counts_requests_across_its_processes_in_a_fresh_folder(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    folder = api["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert folder in api["tmpfs"]  # empty at every start


def test_grafana_has_the_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = ROOT / mounts(grafana)["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090" in compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ddpm-jobs.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    assert (ROOT / mounts(grafana)[folder]).resolve() == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def queried_metrics() -> set[str]:
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bddpm_[a-z_]+\b", expr)}


def test_every_metric_the_dashboard_queries_is_exported(clean_db: Settings, make_user: MakeUser) -> None:
    admin, alice = make_user("root", admin=True), make_user("alice")
    settings = clean_db.model_copy(update={"metrics_token": SecretStr("token-" + uuid.uuid4().hex)})
    with TestClient(create_app(settings), headers=alice.headers) as client:
        job_id = uuid.UUID(client.post("/v1/jobs", json={}).json()["id"])
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:  # a running job with a rate
            s.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
            s.add(MetricPoint(job_id=job_id, step=10, loss=0.1, lr=1e-4, images_per_s=3.0))
        for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):  # as Prometheus asks
            text = client.get("/metrics", headers=admin.headers | {"Accept": accept}).text
            exported = {s.name for f in text_string_to_metric_families(text.replace("# EOF\n", "")) for s in f.samples}
            missing = queried_metrics() - exported
            assert not missing, f"{accept}: the dashboard queries {missing}, which /metrics does not export"
    assert len(queried_metrics()) >= 9


def test_the_files_are_where_compose_mounts_them(compose: dict[str, Any]) -> None:
    for name in PROFILED:
        for source in mounts(compose["services"][name]).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    assert Path(MONITORING / "prometheus" / "prometheus.yml").is_file()
