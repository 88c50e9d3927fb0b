"""clue-agent settings: TOML, then CLUE_* variables, then flags; secrets from files; patches."""

import pytest

from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.models import ModelSpec
from agent.settings import DaemonKnobs, load_settings, nest_dotted, split_patch


def test_precedence_toml_env_flags(tmp_path, monkeypatch):
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'node_id = "from-toml"\nbroker = "mqtt://toml:1883"\nlog_level = "DEBUG"\n'
        "[learner]\nz = 0.2\n[learner.drift]\ntype = \"rolling_error\"\nwindow = 7\n[daemon]\nkt_mode = \"relay\"\n"
    )
    s = load_settings(toml)
    assert (s.node_id, s.broker, s.learner.z, s.learner.drift.window, s.daemon.kt_mode) == (
        "from-toml", "mqtt://toml:1883", 0.2, 7, "relay")
    monkeypatch.setenv("CLUE_BROKER", "mqtt://env:1883")
    monkeypatch.setenv("CLUE_LEARNER__Z", "0.4")
    s = load_settings(toml)
    assert s.broker == "mqtt://env:1883" and s.learner.z == 0.4 and s.log_level == "DEBUG"
    s = load_settings(toml, broker="mqtt://flag:1883", node_id="from-flag", device=None)
    assert s.broker == "mqtt://flag:1883" and s.node_id == "from-flag" and s.device == "auto"


@pytest.mark.parametrize(
    "content,flags,match",
    [
        ('node_id = "a"\nz = 0.3\n', {}, "z"),
        ('node_id = "a b"\n', {}, "node_id"),
        ('node_id = "a"\n[learner]\nz = 3\n', {}, "learner.z"),
        ('node_id = "a"\narch = "resnet"\n', {}, "model: .*'resnet' is unknown"),
        ('node_id = "a"\nmodel = "resnet"\n', {}, "model: .*the built-ins are intrusion_dnn, mlp4, mobilenet_s"),
        ('node_id = "a"\nmodel = "pkg.mod:factory"\n', {}, "input_shape: .*required for the import-path model 'pkg.mod:factory'"),
        ('node_id = "a"\ninput_shape = [28, 0]\n', {}, "input_shape: .*1 to 8 positive sizes"),
        ('node_id = "a"\nmodel_args = { layers = { a = 1 } }\n', {}, "model_args: .*'layers' is a dict"),
        ("node_id = [unclosed\n", {}, "settings"),
        ('broker = "mqtt://x"\n', {}, "node_id"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, content, flags, match):
    toml = tmp_path / "agent.toml"
    toml.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_settings(toml, **flags)


def test_the_model_is_a_built_in_or_an_import_path_and_the_old_key_arch_still_works(tmp_path, monkeypatch):
    toml = tmp_path / "agent.toml"
    toml.write_text('node_id = "a"\narch = "intrusion_dnn"\n')
    assert load_settings(toml).model_spec() == ModelSpec(model="intrusion_dnn")
    toml.write_text('node_id = "a"\nmodel = "fixtures.user_models:tiny_mlp"\ninput_shape = [12]\n[model_args]\nhidden = 8\nnames = ["x", "y"]\n')
    spec = load_settings(toml).model_spec()
    assert spec == ModelSpec(model="fixtures.user_models:tiny_mlp", model_args={"hidden": 8, "names": ["x", "y"]}, input_shape=(12,))
    monkeypatch.setenv("ARCH", "mobilenet_s")
    monkeypatch.setenv("MODEL", "mobilenet_s")
    assert load_settings(node_id="a").model == "mlp4", "only CLUE_* variables are settings"
    monkeypatch.setenv("CLUE_ARCH", "intrusion_dnn")
    assert load_settings(node_id="a").model == "intrusion_dnn"
    monkeypatch.setenv("CLUE_MODEL", "mobilenet_s")
    assert load_settings(node_id="a").model == "mobilenet_s"
    assert load_settings(node_id="a", model="mlp4").model == "mlp4"


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/agent.toml", node_id="a")


def test_the_agent_takes_the_shared_broker_settings(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tls-key").write_text("secret")
    with pytest.raises(ConfigError, match="tls_key: .*does not exist"):
        load_settings(node_id="a", tls_key="tls-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(node_id="a", tls_key="tls-key", broker="/run/mosquitto.sock")
    assert settings.client_kwargs()["tls_key"] == creds / "tls-key"
    assert settings.broker == "unix:///run/mosquitto.sock"


def test_dotted_keys_nest():
    assert nest_dotted({"drift.window": 5, "drift.margin": 0.2, "z": 0.3}) == {"drift": {"window": 5, "margin": 0.2}, "z": 0.3}
    with pytest.raises(ConfigError, match="too deep"):
        nest_dotted({"a.b.c": 1})
    with pytest.raises(ConfigError, match="conflicts"):
        nest_dotted({"drift": 1, "drift.window": 2})


def test_split_patch_validates_both_parts_before_applying_either():
    learner, daemon = LearnerConfig(), DaemonKnobs()
    new_l, new_d = split_patch({"z": 0.3, "kt_mode": "relay", "drift.window": 4}, learner, daemon)
    assert new_l.z == 0.3 and new_l.drift.window == 4 and new_d.kt_mode == "relay"
    assert learner.z == 0.5 and daemon.kt_mode == "direct"
    with pytest.raises(ConfigError, match="kt_mode"):
        split_patch({"z": 0.3, "kt_mode": "carrier-pigeon"}, learner, daemon)
    with pytest.raises(ConfigError, match="z"):
        split_patch({"z": 2.0, "kt_mode": "relay"}, learner, daemon)
    with pytest.raises(ConfigError):
        split_patch({"operator": {"type": "median"}}, learner, daemon)


def test_trainable_prefixes_are_part_of_the_model_spec(tmp_path, monkeypatch):
    toml = tmp_path / "agent.toml"
    toml.write_text('node_id = "a"\nmodel = "fixtures.user_models:backbone_and_head"\ninput_shape = [12]\ntrainable = ["head."]\n')
    assert load_settings(toml).model_spec().trainable == ["head."]
    assert load_settings(node_id="a").model_spec().trainable is None
    monkeypatch.setenv("CLUE_TRAINABLE", '["head.2.", "head.0."]')
    assert load_settings(toml).model_spec().trainable == ["head.2.", "head.0."]
    monkeypatch.setenv("CLUE_TRAINABLE", "[]")
    with pytest.raises(ConfigError, match="trainable: .*at least 1 item"):
        load_settings(toml)
