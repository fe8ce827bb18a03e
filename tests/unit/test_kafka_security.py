"""Broker security settings (WORKER_KAFKA__SECURITY_PROTOCOL, SASL, TLS files) as kafka-python gets them.

No broker here speaks SASL or TLS (the test broker is plaintext), so these check our mapping and our
start-up errors; the arguments are kafka-python's documented ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from captionfleet.core.settings import KafkaSettings
from captionfleet.worker.connectors import kafka as connector
from captionfleet.worker.connectors.kafka import KafkaSecurityError, consumer_config, security_config

REPO = Path(__file__).resolve().parents[2]


def test_plaintext_by_default() -> None:
    config = consumer_config(KafkaSettings(bootstrap="a:9092"), "w")
    assert config["security_protocol"] == "PLAINTEXT"
    assert not [key for key in config if key.startswith(("sasl_", "ssl_"))]


def test_sasl_ssl_with_scram_and_a_private_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = KafkaSettings(
        bootstrap="b-1.msk:9096",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="captioner",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile=ca,
    )
    config = consumer_config(settings, "w")
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "captioner" and config["sasl_plain_password"] == "s3cret"
    assert config["ssl_cafile"] == str(ca)
    assert "s3cret" not in repr(settings)  # the password stays out of logs and error messages


def test_the_producer_gets_the_same_security(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(connector, "KafkaProducer", lambda **kwargs: seen.update(kwargs))
    settings = KafkaSettings(
        bootstrap="a:9092", security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password=SecretStr("p")
    )
    connector.make_producer(settings, "w")
    assert {k: seen[k] for k in security_config(settings)} == security_config(settings)
    assert seen["sasl_plain_password"] == "p"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "WORKER_KAFKA__SASL_PASSWORD"),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "WORKER_KAFKA__SASL_PASSWORD"),
        ({"security_protocol": "PLAINTEXT", "ssl_cafile": "ca.pem"}, "set the protocol to SSL or SASL_SSL"),
        ({"security_protocol": "SSL", "ssl_cafile": "missing.pem"}, "WORKER_KAFKA__SSL_CAFILE=.* is not a readable"),
        ({"security_protocol": "SSL", "ssl_certfile": "cert.pem"}, "both WORKER_KAFKA__SSL_CERTFILE"),
    ],
)
def test_settings_that_do_not_fit_name_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("ca.pem").write_text("ca")
    Path("cert.pem").write_text("cert")
    with pytest.raises(KafkaSecurityError, match=message):
        security_config(KafkaSettings(bootstrap="a:9092", **fields))  # type: ignore[arg-type]


def test_the_worker_refuses_to_start_without_sasl_credentials() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "WORKER_KAFKA__BOOTSTRAP": "127.0.0.1:9",
        "WORKER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "WORKER_MODEL__REF": "builtin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet.worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "WORKER_KAFKA__SASL_USERNAME" in done.stderr
