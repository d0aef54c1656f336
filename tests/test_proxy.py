"""The nginx configuration `fedguard server` runs (server/proxy.py), checked by nginx itself."""

from __future__ import annotations

import subprocess

import pytest

from fedguard.clients.deployment.key_material import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, create_certificates
from fedguard.server.proxy import ProxyError, ProxySettings, certificate_dns_name, proxy_command, proxy_config


def _settings(tmp_path, hosts=("127.0.0.1", "fl.example.org")) -> ProxySettings:
    certs = tmp_path / "certs"
    create_certificates(certs, list(hosts))
    return ProxySettings(listen="0.0.0.0:9092", upstream="127.0.0.1:9093",
                         upstream_name=certificate_dns_name(certs / SERVER_CERT_FILE),
                         certificate=certs / SERVER_CERT_FILE, certificate_key=certs / SERVER_KEY_FILE,
                         ca_certificate=certs / CA_CERT_FILE, state_dir=tmp_path / "proxy")


def test_nginx_accepts_the_config_and_it_forwards_only_fleet_and_health(tmp_path):
    settings = _settings(tmp_path)
    command = proxy_command(settings)
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    config = proxy_config(settings)
    forwarded = [block.split("{")[0].strip() for block in config.split("location ")[1:] if "proxy_pass" in block]
    assert forwarded == ["/v1/fleet/", "= /health"]
    assert "proxy_ssl_name fl.example.org;" in config and "proxy_ssl_verify on;" in config
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in config


def test_superlink_must_be_on_loopback_and_cert_must_name_a_host(tmp_path):
    settings = _settings(tmp_path)
    with pytest.raises(ProxyError, match="loopback"):
        ProxySettings(**{**settings.__dict__, "upstream": "0.0.0.0:9093"})
    ip_only = tmp_path / "ip"
    ip_only.mkdir()
    create_certificates(ip_only / "certs", ["10.0.0.1"])
    with pytest.raises(ProxyError, match="names no DNS host"):
        certificate_dns_name(ip_only / "certs" / SERVER_CERT_FILE)
