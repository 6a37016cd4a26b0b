"""Configuration: every mistake is named by key, value and expectation; secrets stay out."""

from __future__ import annotations

import json

import pytest

from appliance import cli, config
from tests.support import write_config


def problems(tmp_path, override=None, environ=None) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.load(write_config(tmp_path, override), environ=environ or {})
    return caught.value.problems


def test_defaults_and_the_embedded_local_config_are_valid():
    local = config.load(config.Path("config/local.toml"), environ={})
    assert local.dicom.storage.port == 4244
    assert local.state_dir.is_absolute()


def test_wrong_type_names_key_and_value(tmp_path):
    assert problems(tmp_path, {"dicom": {"storage": {"port": "4244x"}}}) == [
        "config: dicom.storage.port: expected an integer, got '4244x'"
    ]


def test_boolean_is_not_an_integer(tmp_path):
    assert problems(tmp_path, {"dicom": {"worklist": {"port": True}}}) == [
        "config: dicom.worklist.port: expected an integer, got True"
    ]


def test_out_of_range_value_names_the_key(tmp_path):
    assert problems(tmp_path, {"dicom": {"storage": {"port": 70000}}}) == [
        "config: dicom.storage.port: 70000 is not a TCP port (0-65535)"
    ]


def test_bad_ae_title_names_the_key(tmp_path):
    [line] = problems(tmp_path, {"dicom": {"worklist": {"ae_title": "MUCH_TOO_LONG_AE_TITLE"}}})
    assert line.startswith('config: dicom.worklist.ae_title: "MUCH_TOO_LONG_AE_TITLE" is not')


def test_unknown_key_is_refused(tmp_path):
    assert problems(tmp_path, {"dicom": {"storage": {"prot": 1}}}) == [
        "config: dicom.storage: unknown key(s): prot"
    ]


def test_every_bad_key_gets_its_own_line(tmp_path):
    lines = problems(tmp_path, {"log": {"level": "LOUD"}, "dicom": {"peers": [{"ae_title": "X"}]}})
    assert sorted(lines) == [
        "config: dicom.peers[0].addresses: required key is missing",
        "config: log.level: expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'",
    ]


def test_environment_overrides_file(tmp_path):
    loaded = config.load(
        write_config(tmp_path),
        environ={"APPLIANCE__DICOM__STORAGE__PORT": "11112", "APPLIANCE__LOG__FORMAT": "json"},
    )
    assert (loaded.dicom.storage.port, loaded.log.format) == (11112, "json")


def test_bad_environment_override_is_named(tmp_path):
    assert problems(tmp_path, environ={"APPLIANCE__DICOM__HOST": "not-an-ip"}) == [
        "config: dicom.host: 'not-an-ip' is not an IP address"
    ]


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match=r"cannot read .*missing\.toml"):
        config.load(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[dicom\nhost = 1")
    with pytest.raises(config.ConfigError, match="is not valid TOML"):
        config.load(broken, environ={})


def test_relay_key_comes_from_systemd_credentials_and_is_redacted(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "relay-key").write_text("s3cr3t-key-value\n")
    loaded = config.load(
        write_config(
            tmp_path, {"relay": {"enabled": True, "namespace": "ns", "key_file": "relay-key"}}
        ),
        environ={},
    )
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert config.read_secret("relay-key", "relay.key_file", environ) == b"s3cr3t-key-value"
    shown = json.dumps(config.effective(loaded, environ))
    assert "s3cr3t" not in shown
    assert "<redacted: 16 bytes>" in shown


def test_missing_relay_key_names_the_key(tmp_path):
    enabled = {"relay": {"enabled": True, "namespace": "ns"}}
    loaded = config.load(write_config(tmp_path, enabled), environ={})
    with pytest.raises(config.ConfigError, match=r"relay\.key_file: required"):
        config.effective(loaded, {})


def test_config_check_command_exits_2_with_one_line_per_problem(tmp_path, capsys):
    path = write_config(tmp_path, {"dicom": {"storage": {"port": -1}}})
    assert cli.main(["config", "check", "--config", str(path)]) == 2
    assert capsys.readouterr().err == "config: dicom.storage.port: -1 is not a TCP port (0-65535)\n"
    good = write_config(tmp_path)
    assert cli.main(["--config", str(good), "config", "check"]) == 0
    assert json.loads(capsys.readouterr().out)["dicom"]["storage"]["ae_title"] == "SCREENING_PACS"


def test_relay_needs_a_namespace_and_a_ping_timeout_shorter_than_the_interval(tmp_path):
    assert problems(tmp_path, {"relay": {"enabled": True, "key_file": "k"}}) == [
        "config: relay.namespace: required when the relay is enabled"
    ]
    slow = {"relay": {"ping_interval_s": 10, "ping_timeout_s": 10}}
    assert problems(tmp_path, slow) == [
        "config: relay.ping_timeout_s: 10.0 must be shorter than ping_interval_s"
    ]


def test_run_refuses_to_start_without_a_readable_relay_key(tmp_path, capsys):
    path = write_config(
        tmp_path,
        {"relay": {"enabled": True, "namespace": "ns", "key_file": str(tmp_path / "absent.key")}},
    )
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "relay.key_file: cannot read" in capsys.readouterr().err


def test_worklist_defaults_are_values_a_worklist_answer_can_carry(tmp_path):
    ae = {"station_ae_title": "A VERY LONG AE TITLE"}
    [line] = problems(tmp_path, {"worklist": {"defaults": {"MG": ae}}})
    assert "station_ae_title" in line
    assert "is not an AE title" in line
    [line] = problems(tmp_path, {"worklist": {"defaults": {"MG": {"station_name": "N\\S"}}}})
    assert "station_name" in line
    assert "no backslash" in line
    code = {"procedure_code": ["24623002", "SCT", "x" * 65]}
    [line] = problems(tmp_path, {"worklist": {"defaults": {"MG": code}}})
    assert "procedure_code" in line


def test_worklist_defaults_keys_are_modalities_and_mg_keeps_its_own(tmp_path):
    loaded = config.load(
        write_config(tmp_path, {"worklist": {"defaults": {"ct": {"description": "CT"}}}}),
        environ={},
    )
    assert loaded.worklist.defaults["CT"].description == "CT"
    assert loaded.worklist.defaults["MG"].description == "Screening mammography"
