"""`fedguard bench deployment`'s reading of the proxy log (simulations/bench_deployment.py): how
often a site asked for an object not uploaded yet, and how long it then waited."""

from __future__ import annotations

from fedguard.server.proxy import ProxySettings, proxy_config
from fedguard.simulations.bench_deployment import PROXY_LINE, object_pull_retries


def _line(end: float, port: int, path: str, size: int, seconds: float) -> str:
    return (f'2026-12-02T07:33:40+00:00 127.0.0.1:{port} "POST {path} HTTP/1.1" 200 {size} '
            f"upstream=127.0.0.1:53993 {seconds:.3f} msec={end:.3f} in=210 upstream_s={seconds:.3f} conn_req=7")


def test_not_yet_answers_and_the_wait_after_each():
    log = "\n".join([
        _line(100.00, 5001, "/v1/fleet/pull-object", 2, 0.01),       # not yet: next pull starts 1.0 s later
        _line(101.02, 5001, "/v1/fleet/pull-object", 32922, 0.02),
        _line(100.50, 5002, "/v1/fleet/pull-messages", 2, 0.01),     # an idle poll, not an object
        _line(100.60, 5002, "/v1/fleet/pull-object", 2, 0.01),       # not yet: next pull 0.05 s later
        _line(100.70, 5002, "/v1/fleet/pull-object", 407, 0.05),
        _line(100.80, 5003, "/v1/fleet/push-object", 2, 0.01),       # a push answer is 2 bytes too: not counted
        _line(100.90, 5003, "/v1/fleet/pull-object", 2, 0.01),       # not yet, and nothing after it: no wait known
    ])
    assert object_pull_retries(log) == {"not_yet_answers": 3, "median_wait_after_s": 0.525}
    assert object_pull_retries("") == {"not_yet_answers": 0, "median_wait_after_s": 0.0}


def test_the_pattern_reads_the_format_the_proxy_writes(tmp_path):
    """The bench parses what server/proxy.py's log_format writes: fails if one changes alone."""
    config = proxy_config(ProxySettings(listen="0.0.0.0:9092", upstream="127.0.0.1:9093", upstream_name="localhost",
                                        certificate=tmp_path / "s.pem", certificate_key=tmp_path / "s.key",
                                        ca_certificate=tmp_path / "ca.pem", state_dir=tmp_path / "proxy"))
    fmt = config.split("log_format fedguard ", 1)[1].split(";", 1)[0]
    fmt = "".join(part.strip().strip("'") for part in fmt.splitlines())
    values = {"$time_iso8601": "2026-12-02T07:33:40+00:00", "$remote_addr": "127.0.0.1", "$remote_port": "5001",
              "$request": "POST /v1/fleet/pull-object HTTP/1.1", "$status": "200", "$body_bytes_sent": "2",
              "$upstream_addr": "127.0.0.1:9093", "$request_time": "0.012", "$msec": "1796196820.123",
              "$request_length": "210", "$upstream_response_time": "0.010", "$connection_requests": "3"}
    for name in sorted(values, key=len, reverse=True):
        fmt = fmt.replace(name, values[name])
    match = PROXY_LINE.match(fmt)
    assert match is not None, fmt
    assert (match["path"], match["bytes"], match["seconds"], match["end"]) == (
        "/v1/fleet/pull-object", "2", "0.012", "1796196820.123")
