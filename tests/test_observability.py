"""docs/observability: the Grafana dashboard and the alert rules use metrics Kernex exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from kernex.ingest.metrics import IngestMetrics
from tests.fixtures.auth import api_settings, running_api

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability"
METRIC = re.compile(r"\bkernex_[a-z_]+\b")


def _exported(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


async def _known(tmp_path: Path, database_url: str) -> set[str]:
    """Every metric and sample name ingest registers and the API's /metrics serves."""
    names = _exported(IngestMetrics().registry)
    async with running_api(api_settings(tmp_path, database_url)) as (_, client):
        await client.get("/healthz")  # so the request metrics have samples
        body = (await client.get("/metrics")).text
    names |= {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}
    names |= {m.group(0) for m in re.finditer(r"^kernex_[a-z_]+", body, re.MULTILINE)}
    return names


def _metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


async def test_every_dashboard_query_uses_exported_metrics(tmp_path: Path, sqlite_url: str) -> None:
    known = await _known(tmp_path, sqlite_url)
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "kernex-fleet"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names, expr
        assert names <= known, (expr, names - known)
        used |= names
    # Every ingest metric family appears on the dashboard.
    for family in IngestMetrics().registry.collect():
        assert any(name.startswith(family.name) for name in used), family.name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


async def test_alert_rules_are_well_formed_and_use_exported_metrics(tmp_path: Path, sqlite_url: str) -> None:
    known = await _known(tmp_path, sqlite_url)
    rules = yaml.safe_load((DOCS / "alerts.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for required in ("KernexDevicesOfflineRatioHigh", "KernexIngestRejectsHigh", "KernexDeploymentFailures"):
        assert required in alerts
    for name, rule in alerts.items():
        assert {"expr", "for", "labels", "annotations"} <= rule.keys(), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        names = _metric_names(rule["expr"])
        assert names, name
        assert names <= known, (name, names - known)
