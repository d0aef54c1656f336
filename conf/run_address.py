"""HOST:PORT addresses, one parser for the config check and the launchers."""

from __future__ import annotations


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); ValueError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must be HOST:PORT (port 1-65535)")
    return host.strip("[]"), int(port)
