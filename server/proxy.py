"""The public face of ``fedguard server``: nginx in front of a loopback-only SuperLink.

Why: Flower 1.41's SuperLink serves every API on one HTTP port: the Fleet API sites use
(``/v1/fleet/...``), the Control API (``/v1/control/...``: start a run, which executes the
submitted ServerApp here; register a node; ...) and the runtime API its own ServerApp processes
use (``/v1/runtime/...``), and the open-source build authenticates no account on the Control
API. So the SuperLink listens on 127.0.0.1 only, and Debian's nginx, run by ``fedguard server``
as the current user with its own files under the state dir, terminates TLS with fedguard's
certificate on the public address and forwards only the Fleet API and ``/health``; the Control
and runtime paths get 403, anything else 404, and each refusal is written to ``denied.log``
(and never reaches the SuperLink: ``$upstream_addr`` is "-" in ``access.log``).

The Control API stays reachable from the server host (``fedguard register``, ``fedguard run``
with the loopback address) or through an SSH tunnel. Not through client certificates at the
proxy: Flower 1.41's CLI connection settings (``root-certificates``, ``insecure``) cannot
present one.

Every setting below is chosen, not inherited from Debian's defaults; ``proxy_config`` is a pure
function of plain values so the tests read exactly what nginx runs.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedguard.conf.run_address import split_host_port

PROXY_DIR = "proxy"
# Sites push and pull model arrays as objects; a large model's object must fit (Flower caps a FAB at 10 MB).
MAX_BODY = "1g"
# A SuperNode's requests (pull messages, push objects) return quickly; a big object on a slow link
# may take minutes, so reads and sends time out after 5 minutes, not nginx's 60 s.
TIMEOUT_SECONDS = 300
# Per site address: a SuperNode makes a few requests a second (heartbeats, pulls, one push per
# object of a reply); bursts of object pushes are allowed, a flood from one address is not.
RATE_PER_SECOND = 50
RATE_BURST = 1000
CONNECTIONS_PER_ADDRESS = 64
# Idle TLS connections to the loopback SuperLink nginx keeps per worker for the next request.
UPSTREAM_IDLE_CONNECTIONS = 32
UPSTREAM_IDLE_SECONDS = 4


class ProxyError(RuntimeError):
    """nginx cannot be set up; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class ProxySettings:
    listen: str  # public HOST:PORT
    upstream: str  # the SuperLink's loopback HOST:PORT
    upstream_name: str  # a DNS name in the server certificate (TLS verification of the loopback hop)
    certificate: Path  # server.pem (leaf + CA chain)
    certificate_key: Path
    ca_certificate: Path
    state_dir: Path  # nginx's prefix: conf, pid, logs, temp files

    def __post_init__(self) -> None:
        split_host_port(self.listen)
        host, _ = split_host_port(self.upstream)
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ProxyError(f"the SuperLink behind the proxy must listen on loopback, not {self.upstream}")


def nginx_executable() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        raise ProxyError("nginx not found: install Debian's nginx (`apt-get install -y nginx`, in the README's setup command)")
    return found


def certificate_dns_name(certificate: Path) -> str:
    """The first DNS name of the server certificate: what nginx verifies the loopback SuperLink against."""
    cert = x509.load_pem_x509_certificates(certificate.read_bytes())[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise ProxyError(f"{certificate} names no DNS host; recreate it with `fedguard certs --host <name> --host localhost`")
    return names[0]


def _listen_directive(listen: str) -> str:
    host, port = split_host_port(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def proxy_config(settings: ProxySettings, user: str | None = None) -> str:
    """nginx.conf for ``settings``; ``user`` only when nginx starts as root (workers keep that user)."""
    state = settings.state_dir.resolve()
    # Through the named upstream, whose idle connections nginx keeps: without it nginx opened a
    # new TCP and TLS connection to the SuperLink for every request (a SuperNode makes several a
    # second: idle polls, one pull or push per object of a message), and each paid the handshake
    # on the shared CPU (`fedguard bench deployment`, README). "Connection" is cleared so a
    # site's own "close" does not end the loopback connection.
    forward = f"""            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_session_reuse on;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {settings.ca_certificate.resolve()};
            proxy_ssl_name {settings.upstream_name};
            proxy_ssl_server_name on;
            proxy_request_buffering off;
            proxy_buffering off;"""
    return f"""# Written by `fedguard server` (server/proxy.py); rewritten at every start.
{f"user {user};" if user else ""}
worker_processes 2;
daemon off;
pid {state}/nginx.pid;
error_log {state}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {state}/tmp/body;
    proxy_temp_path {state}/tmp/proxy;
    fastcgi_temp_path {state}/tmp/fastcgi;
    uwsgi_temp_path {state}/tmp/uwsgi;
    scgi_temp_path {state}/tmp/scgi;
    default_type application/octet-stream;
    server_tokens off;

    # $msec (epoch, ms) and the upstream's own time let a kept run's log be laid beside the other
    # parts' timestamps (`fedguard bench deployment --keep`); $connection_requests > 1 is a reused connection.
    log_format fedguard '$time_iso8601 $remote_addr:$remote_port "$request" $status $body_bytes_sent upstream=$upstream_addr $request_time '
                        'msec=$msec in=$request_length upstream_s=$upstream_response_time conn_req=$connection_requests';
    access_log {state}/access.log fedguard;

    # Per site address (a site behind NAT shares its address with its neighbours).
    limit_req_zone $binary_remote_addr zone=fleet:10m rate={RATE_PER_SECOND}r/s;
    limit_conn_zone $binary_remote_addr zone=perip:10m;
    limit_req_status 429;
    limit_conn_status 429;

    client_max_body_size {MAX_BODY};
    client_body_timeout {TIMEOUT_SECONDS}s;
    send_timeout {TIMEOUT_SECONDS}s;
    keepalive_timeout 75s;

    upstream superlink {{
        server {_listen_directive(settings.upstream)};
        keepalive {UPSTREAM_IDLE_CONNECTIONS};
        # Shorter than the SuperLink's own (uvicorn's 5 s), so nginx drops an idle connection before
        # the SuperLink can close it under a request that nginx would not retry (a POST).
        keepalive_timeout {UPSTREAM_IDLE_SECONDS}s;
    }}

    server {{
        listen {_listen_directive(settings.listen)} ssl;
        ssl_certificate {settings.certificate.resolve()};
        ssl_certificate_key {settings.certificate_key.resolve()};
        # TLS 1.2 with forward-secret AEAD suites only (the certificate is ECDSA P-384), and 1.3.
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256;
        ssl_prefer_server_ciphers on;
        ssl_session_cache shared:fedguard_tls:10m;
        ssl_session_tickets off;

        limit_conn perip {CONNECTIONS_PER_ADDRESS};

        location /v1/fleet/ {{
            limit_req zone=fleet burst={RATE_BURST} nodelay;
            proxy_read_timeout {TIMEOUT_SECONDS}s;
            proxy_send_timeout {TIMEOUT_SECONDS}s;
{forward}
        }}
        location = /health {{
{forward}
        }}
        # The Control API (runs, node registration) and the SuperLink's own runtime API: never from outside.
        location /v1/control/ {{
            access_log {state}/denied.log fedguard;
            return 403;
        }}
        location /v1/runtime/ {{
            access_log {state}/denied.log fedguard;
            return 403;
        }}
        location / {{
            access_log {state}/denied.log fedguard;
            return 404;
        }}
    }}
}}
"""


def write_proxy_files(settings: ProxySettings) -> Path:
    """nginx.conf and its directories under the state dir; returns the conf path."""
    state = settings.state_dir
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    user = getpass.getuser() if os.geteuid() == 0 else None
    conf = state / "nginx.conf"
    conf.write_text(proxy_config(settings, user), encoding="utf-8")
    return conf


def proxy_command(settings: ProxySettings) -> list[str]:
    """nginx in the foreground with its own prefix, conf and error log: no system service, no /etc/nginx."""
    state = settings.state_dir.resolve()
    conf = write_proxy_files(settings).resolve()
    return [nginx_executable(), "-p", str(state), "-c", str(conf), "-e", str(state / "error.log")]


def _group_members(pgid: int) -> list[int]:
    """Live nginx processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and (entry / "cmdline").read_bytes().startswith(b"nginx"):
                members.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return members


def stop_stale_proxy(state_dir: Path) -> list[int]:
    """Kill what is left of this state dir's previous nginx (its pid file names the master, whose
    process group its workers keep): after ``fedguard server`` itself was killed, it would
    otherwise hold the public port. Returns the killed pids."""
    try:
        pgid = int((state_dir / "nginx.pid").read_text().strip())
    except (OSError, ValueError):
        return []
    members = _group_members(pgid)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return members
