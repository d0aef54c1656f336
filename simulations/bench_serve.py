"""``fedguard bench serve``: requests/s and latency of ``fedguard serve`` on loopback.

A real uvicorn process (as users run it) answers HTTP clients on loopback; each cell
(batch size x concurrent clients) sends a bounded number of requests after a warm-up. Latency is the client's
wall time per request, so it includes JSON encoding, HTTP, validation and the model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.server.model_card import load_card

WARMUP_REQUESTS = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _example_batch(card: dict[str, Any], batch: int) -> list:
    contract = card["contract"]
    low, high = contract.get("raw_range") or (0.0, 1.0)
    rng = np.random.default_rng(0)
    return rng.uniform(low, high, size=(batch, *contract["input_shape"])).round(3).tolist()


def _start(model_dir: Path, port: int, max_batch: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedguard.simulations.cli", "serve", str(model_dir), "--port", str(port),
               "--max-batch", str(max_batch), "--log-level", "warning"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _measure(base_url: str, body: dict[str, Any], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """(elapsed seconds, per-request latencies) for ``requests`` requests from ``concurrency``
    clients at once, each on its own connection, sending one after another."""
    import httpx

    share = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]

    def one_client(count: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for _ in range(count):
                t0 = time.perf_counter()
                client.post("/predict", json=body).raise_for_status()
                latencies.append(time.perf_counter() - t0)
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = [t for part in pool.map(one_client, share) for t in part]
    return time.perf_counter() - started, latencies


def run_serve_benchmark(
    model_dir: Path, batch_sizes: list[int], requests: int, concurrency: tuple[int, ...] = (1,)
) -> dict[str, Any]:
    import httpx

    card = load_card(model_dir)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = _start(model_dir, port, max(batch_sizes))
    cells = []
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("fedguard serve did not start") from None
                    time.sleep(0.2)
            for batch in batch_sizes:
                body = {"inputs": _example_batch(card, batch)}
                for _ in range(WARMUP_REQUESTS):
                    client.post("/predict", json=body).raise_for_status()
                for clients in concurrency:
                    elapsed, latencies = _measure(base_url, body, requests, clients)
                    cell = {"batch": batch, "concurrency": clients, "requests": requests,
                            "requests_per_s": requests / elapsed, "examples_per_s": requests * batch / elapsed,
                            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
                            "p99_ms": float(np.percentile(latencies, 99) * 1e3)}
                    print(f"batch {batch:4d} x {clients} clients: {cell['requests_per_s']:8.1f} req/s  "
                          f"p50 {cell['p50_ms']:.2f} ms  p99 {cell['p99_ms']:.2f} ms", file=sys.stderr)
                    cells.append(cell)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"model_dir": str(model_dir), "task": card["task"], "format": card["export"]["format"],
            "input_shape": card["contract"]["input_shape"], "parameters": card["parameters"],
            "client": "httpx clients on loopback, each sending one request after another", "cells": cells}
