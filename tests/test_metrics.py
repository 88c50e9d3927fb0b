"""The metrics endpoint every daemon shares (`service.metrics`): off by default, localhost when on,
TLS with client certificates, basic auth; the bus client's counters as metrics."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from service.metrics import BusClientCollector, MetricsServer, MetricsSettings, free_port
from service.settings import ConfigError
from support import requires_openssl, scrape


def _registry() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    return registry, Counter("demo_batches", "batches", registry=registry)


def test_the_endpoint_is_off_by_default_and_binds_localhost_when_on():
    settings = MetricsSettings()
    assert settings.metrics_port is None and settings.metrics_host == "127.0.0.1"
    with pytest.raises(ValueError, match="no endpoint"):
        MetricsServer(CollectorRegistry(), settings)


def test_half_a_pair_of_settings_is_refused(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    with pytest.raises(ValueError, match="go together"):
        MetricsSettings(metrics_port=9100, metrics_username="prom")
    with pytest.raises(ValueError, match="go together"):
        MetricsSettings(metrics_port=9100, metrics_password_file=str(secret))
    with pytest.raises(ValueError, match="does not exist"):
        MetricsSettings(metrics_port=9100, metrics_tls_cert=str(tmp_path / "missing.crt"), metrics_tls_key=str(secret))
    with pytest.raises(ValueError, match="needs metrics_tls_cert"):
        MetricsSettings(metrics_port=9100, metrics_client_ca=str(secret))


def test_serves_its_own_registry_until_stopped():
    registry, batches = _registry()
    batches.inc(3)
    server = MetricsServer(registry, MetricsSettings(metrics_port=free_port())).start()
    try:
        assert scrape(server.url)["demo_batches_total"] == 3.0
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_a_port_in_use_is_a_config_error():
    registry, _ = _registry()
    first = MetricsServer(registry, MetricsSettings(metrics_port=free_port())).start()
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            MetricsServer(registry, MetricsSettings(metrics_port=first.port)).start()
    finally:
        first.stop()


def test_basic_auth_refuses_a_scraper_without_the_password(tmp_path):
    secret = tmp_path / "metrics.pw"
    secret.write_text("s3cret\n")
    registry, _ = _registry()
    settings = MetricsSettings(metrics_port=free_port(), metrics_username="prom", metrics_password_file=str(secret))
    server = MetricsServer(registry, settings).start()

    def get(user: str | None, password: str = "s3cret") -> int:
        request = urllib.request.Request(server.url)
        if user is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            return urllib.request.urlopen(request, timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert get(None) == 401
        assert get("prom", "wrong") == 401
        assert get("other") == 401
        assert get("prom") == 200
    finally:
        server.stop()


@requires_openssl
def test_tls_with_client_certificates(tmp_path):
    from broker.certs import generate

    certs = generate(tmp_path / "certs", roles=["operator"], broker_key_owner=None)
    registry, batches = _registry()
    batches.inc()
    settings = MetricsSettings(
        metrics_port=free_port(), metrics_tls_cert=str(certs.server_cert), metrics_tls_key=str(certs.server_key), metrics_client_ca=str(certs.ca)
    )
    server = MetricsServer(registry, settings).start()
    try:
        assert server.url.startswith("https://")
        anonymous = ssl.create_default_context(cafile=str(certs.ca))
        anonymous.check_hostname = False
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(server.url, context=anonymous)
        with_cert = ssl.create_default_context(cafile=str(certs.ca))
        with_cert.check_hostname = False
        with_cert.load_cert_chain(str(certs.cert("operator")), str(certs.key("operator")))
        assert scrape(server.url, context=with_cert)["demo_batches_total"] == 1.0
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_bus_client_counters_are_read_at_scrape_time(mosquitto, make_client, unique_id):
    client = make_client(mosquitto, client_id=unique_id)
    assert client.wait_connected(10)
    registry = CollectorRegistry()
    registry.register(BusClientCollector(client, "clue_demo"))
    server = MetricsServer(registry, MetricsSettings(metrics_port=free_port())).start()
    try:
        before = scrape(server.url)
        assert before["clue_demo_mqtt_connected"] == 1.0
        assert before["clue_demo_mqtt_reconnects_total"] == 0.0
        client.publish(f"test/{unique_id}", b"x" * 100, qos=1).wait_for_publish(5)
        after = scrape(server.url)
        assert after['clue_demo_mqtt_payload_bytes_total{direction="out",topic_class="other"}'] >= 100
        assert after['clue_demo_mqtt_messages_refused_total{reason="undecodable"}'] == 0.0
        client.stop()
        assert scrape(server.url)["clue_demo_mqtt_connected"] == 0.0
    finally:
        server.stop()
