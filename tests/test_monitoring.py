"""Monitoring (issue 13/13): a real Prometheus scrapes a running agent and MdS; the alert rules pass
promtool and their unit tests; the Grafana dashboards load in the compose file's provisioning
layout; rules and dashboards name only metrics the daemons export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from broker import topics
from service.metrics import free_port
from support import wait_until

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
COMPOSE_FILE = ROOT / "deploy" / "compose" / "docker-compose.yml"
PROMETHEUS_MISSING = "needs Prometheus and promtool (Debian package 'prometheus'; scripts/setup.sh installs it)"
requires_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None, reason=PROMETHEUS_MISSING
)


# --- the files ------------------------------------------------------------------------------------


@requires_prometheus
def test_alert_rules_pass_promtool_and_their_unit_tests():
    check = subprocess.run(["promtool", "check", "rules", "clue-alerts.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    tests = subprocess.run(["promtool", "test", "rules", "clue-alerts.test.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert tests.returncode == 0, tests.stdout + tests.stderr


@requires_prometheus
def test_promtool_catches_a_broken_rule(tmp_path):
    """The check above means something: a rule with a bad expression fails it."""
    broken = (PROMETHEUS_DIR / "clue-alerts.yml").read_text().replace("clue_agent_drift_unhelped_batches > 20", "clue_agent_drift_unhelped_batches >", 1)
    (tmp_path / "clue-alerts.yml").write_text(broken)
    done = subprocess.run(["promtool", "check", "rules", "clue-alerts.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


@requires_prometheus
def test_compose_prometheus_config_passes_promtool():
    done = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts (relative to the compose file)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE_FILE.parent / source).resolve()
    return out


def _host_path(mounts: dict[str, Path], container_path: str) -> Path:
    for target, source in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is mounted from nowhere")


def _dashboards() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((GRAFANA_DIR / "dashboards").glob("*.json"))]


def test_dashboards_load_in_the_compose_grafana_provisioning_layout():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = _host_path(mounts, "/etc/grafana/provisioning")
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.yml")) for d in yaml.safe_load(f.read_text())["datasources"]]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"] and "prometheus" in compose["services"]
    uids = {d["uid"] for d in datasources}
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml")) for p in yaml.safe_load(f.read_text())["providers"]]
    folders = [_host_path(mounts, p["options"]["path"]) for p in providers]
    loaded = [json.loads(f.read_text()) for folder in folders for f in sorted(folder.glob("*.json"))]
    assert {d["uid"] for d in loaded} == {"clue-fleet", "clue-node"}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert json.loads(_host_path(mounts, home).read_text())["uid"] == "clue-fleet"
    for dashboard in loaded:
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), dashboard["title"]
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in uids and target["expr"], panel["title"]
    node = next(d for d in loaded if d["uid"] == "clue-node")
    assert [v["name"] for v in node["templating"]["list"]] == ["node"]


def _exported_names(tmp_path: Path) -> set[str]:
    """Every sample name the four daemons' registries export (built in-process, not connected)."""
    from agent.daemon import RunningMean
    from agent.metrics import AgentMetrics
    from broker.client import MqttClient
    from broker.relay import RelaySettings
    from broker.relay import build as build_relay
    from broker.wire import NodeMeta
    from edge_sim.aggregator import AggregatorSettings
    from edge_sim.aggregator import build as build_aggregator
    from mds.service import MetadataService
    from mds.store import NodeStore

    client = MqttClient.from_url("mqtt://127.0.0.1:1", client_id="names")
    agent = AgentMetrics(
        client=client, timings={"batch": RunningMean(), "pick": RunningMean()}, checkpoint_path=tmp_path / "none.ckpt.npz",
        pool_size=lambda: 0, info={"arch_id": "a", "lineage": "b"},
    )
    store = NodeStore(":memory:")
    store.upsert_meta(NodeMeta(node_id="n", arch_id="a", lineage="b", hist=[1.0, 0.0]))
    mds = MetadataService(client, store)
    relay = build_relay(RelaySettings.load(None, metrics_port=free_port()))
    aggregator = build_aggregator(AggregatorSettings.load(None, job="j", members=["n"], every=1, per_round=1, metrics_port=free_port()))
    names = set()
    for registry in (agent.registry, mds.metrics.registry, relay.metrics.registry, aggregator.metrics.registry):
        names |= {s.name for family in registry.collect() for s in family.samples}
    store.close()
    return names


def test_rules_and_dashboards_name_only_metrics_the_daemons_export(tmp_path):
    names = _exported_names(tmp_path) | {"up"}
    texts = {p.name: p.read_text() for p in [PROMETHEUS_DIR / "clue-alerts.yml", *sorted((GRAFANA_DIR / "dashboards").glob("*.json"))]}
    for name, text in texts.items():
        used = set(re.findall(r"\b(clue_[a-z_]+)\b", text))
        assert used, name
        assert used <= names, f"{name} names metrics no daemon exports: {sorted(used - names)}"


# --- a real Prometheus ----------------------------------------------------------------------------


class Prometheus:
    """`/usr/bin/prometheus` on a free loopback port, scraping every second, storing under `tmp_path`."""

    def __init__(self, tmp_path: Path, scrape: dict[str, list[tuple[str, dict[str, str]]]]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "clue-alerts.yml")],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target], "labels": labels} for target, labels in targets]}
                for job, targets in scrape.items()
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp_path / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        reply = json.load(urllib.request.urlopen(url, timeout=10))
        assert reply["status"] == "success", reply
        return reply["data"]

    def value(self, query: str) -> float | None:
        """The one value `query` gives now, or None (no data yet, or Prometheus not up)."""
        try:
            result = self.api("query", query=query)["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@requires_prometheus
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_prometheus_reads_what_an_agent_and_the_mds_did(fleet, tmp_path):
    from support.fleet import Clusters, wait_online

    mds_port, agent_ports = free_port(), {"edge-a": free_port(), "edge-b": free_port()}
    fleet.mds("--metrics-port", str(mds_port))
    for node, port in agent_ports.items():
        fleet.agent(node, metrics_port=port)
    feeder, collector = fleet.observer()
    wait_online(fleet, agent_ports)
    prometheus = Prometheus(tmp_path, {
        "clue-agent": [(f"127.0.0.1:{port}", {"node": node}) for node, port in agent_ports.items()],
        "clue-mds": [(f"127.0.0.1:{mds_port}", {})],
    })
    try:
        data = Clusters()
        fed = {"edge-a": 6, "edge-b": 3}
        for t in range(max(fed.values())):
            ok = feeder.step(t, [(node, *data.batch(range(8))) for node, n in fed.items() if t < n], timeout=60)
            assert ok, f"batch {t} not answered"
        # A batch that is not msgpack: refused, counted by the bus client and by the agent.
        feeder.client.publish(topics.node_batch("edge-a"), b"\xc1 not msgpack", qos=1).wait_for_publish(5)
        wait_until(lambda: collector.events_of("edge-a", "rejected"), 30, what="edge-a's rejected event")

        def reads(query: str, expected: float) -> bool:
            return prometheus.value(query) == expected

        for node, n in fed.items():
            wait_until(lambda: reads(f'clue_agent_batches_served_total{{node="{node}"}}', n), 60, what=f"Prometheus to read {n} batches of {node}", interval=0.5)
            assert prometheus.value(f'clue_agent_batches_trained_total{{node="{node}"}}') == n
        wait_until(lambda: reads('clue_agent_messages_refused_total{node="edge-a", reason="decode"}', 1), 30, what="the refusal", interval=0.5)
        assert prometheus.value('clue_agent_mqtt_messages_refused_total{node="edge-a", reason="undecodable"}') == 1
        assert prometheus.value('clue_agent_messages_refused_total{node="edge-b", reason="decode"}') == 0
        served_error = prometheus.value('clue_agent_served_error_ratio{node="edge-a"}')
        assert served_error is not None and 0.0 <= served_error <= 1.0
        assert prometheus.value('sum(clue_agent_mqtt_connected)') == 2
        # The MdS: both nodes, online, under one architecture and lineage.
        wait_until(lambda: reads("sum(clue_mds_nodes_online)", 2), 30, what="the MdS's online count", interval=0.5)
        assert prometheus.value("count(clue_mds_nodes)") == 1 and prometheus.value("sum(clue_mds_nodes)") == 2
        assert prometheus.value('up{job="clue-mds"}') == 1
        # A helper query, asked for the architecture and lineage the agents' info metric names, is
        # answered and timed.
        info = prometheus.api("query", query='clue_agent_info{node="edge-a"}')["result"][0]["metric"]
        fleet.wait_offered(agent_ports, arch_id=info["arch_id"], lineage=info["lineage"], classes=(0, 1))
        wait_until(lambda: (prometheus.value("clue_mds_query_duration_seconds_count") or 0) >= 1, 30, what="the query's latency", interval=0.5)
        answered = prometheus.value('clue_mds_queries_total{outcome="answered"}')
        assert answered is not None and answered >= 1
        assert prometheus.value("clue_mds_query_duration_seconds_count") == prometheus.value('sum(clue_mds_queries_total{outcome=~"answered|rejected"})')
        # The alert rules load in a real Prometheus too, and none fires on a healthy fleet.
        groups = prometheus.api("rules")["groups"]
        assert sum(len(g["rules"]) for g in groups) == 8
        assert prometheus.api("alerts")["alerts"] == []
    finally:
        prometheus.close()
