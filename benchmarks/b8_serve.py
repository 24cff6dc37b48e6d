"""B8: `nnlab serve` under load: seed-cnn classify requests, batched vs one at a time.

The server is the real command, `nnlab serve RUN --port P --max-batch N`, in a process of its own on
127.0.0.1, serving a seed-cnn run folder (one training step on scikit-learn's digits resized to
28x28: the weights do not change the speed). The load: CLIENTS threads in this process, each
with one keep-alive HTTP connection, send REQUESTS POST /v1/classify requests in all (the same
28x28 JSON pixel body), each waiting for its answer before sending the next; the run stops by
itself when they are done. Per request: wall time from sending to the whole answer. Reported:
p50 and p99 latency, requests/s (requests over the wall time of the whole run), errors (any answer
but 200), for --max-batch 32 (the requests waiting when the model is free share one forward pass) and
--max-batch 1 (each request its own forward pass, in the server's thread pool); and the p50
latency of one client alone. The client shares the CPU with the server, so requests/s is a
figure for this client and machine, not the server's ceiling.
--quick: 4 clients, 100 requests.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import Ctx, quiet

CLIENTS, REQUESTS, ALONE = 32, 2000, 200
QUICK = {"clients": 4, "requests": 100, "alone": 20}
MODES = {"batched": 32, "one at a time": 1}


def make_run(folder: Path) -> Path:
    import nnlab

    with quiet():
        return nnlab.train("seed-cnn", {"data.name": "digits", "data.image_size": 28, "train.max_steps": 1,
                                        "train.precision": "fp32"}, out=str(folder / "run"))


def start_server(run: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "nnlab", "serve", str(run), "--port", str(port),
                             "--max-batch", str(max_batch)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"nnlab serve did not start: {proc.communicate()[1].strip()[-300:]}")
        time.sleep(0.1)


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs a fixed body: the request bytes are built once
    and a response is read by its Content-Length, so the client spends little of the cores it shares
    with the server (http.client parses every header through the email package)."""

    def __init__(self, port: int, path: str, body: bytes):
        self.port = port
        self.request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock, self.buf = None, b""

    def post(self) -> int:
        """Send the request, read the whole response; its status code (OSError on a broken connection)."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                       if k.strip().lower() == "content-length"), None)
        if length is None:
            raise OSError("a response without Content-Length")
        while len(self.buf) < length:
            self._recv()
        self.buf = self.buf[length:]
        return int(lines[0].split()[1])

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise OSError("connection closed")
        self.buf += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def load(port: int, clients: int, requests: int, body: bytes, path: str = "/v1/classify") -> dict:
    """`clients` threads share `requests` POST `path` calls of the JSON `body`; latencies in seconds."""
    latencies: list[float] = []
    errors = [0]
    left = [requests]
    lock = threading.Lock()

    def client():
        conn = Client(port, path, body)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t0 = time.perf_counter()
            try:
                ok = conn.post() == 200
            except OSError:
                ok = False
                conn.close()  # the next request opens a new connection
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors[0], "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def run(ctx: Ctx) -> dict:
    size = QUICK if ctx.quick else {"clients": CLIENTS, "requests": REQUESTS, "alone": ALONE}
    rng = np.random.default_rng(0)
    body = json.dumps({"pixels": rng.integers(0, 256, (28, 28)).tolist()}).encode()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp))
        for mode, max_batch in MODES.items():
            proc, port = start_server(run_dir, max_batch, ctx.machine.get("threads"))
            try:
                load(port, 2, 50, body)  # warm-up: first calls, the thread pool, allocations
                loaded = [load(port, size["clients"], size["requests"], body) for _ in range(ctx.repeats)]
                alone = [load(port, 1, size["alone"], body) for _ in range(ctx.repeats)]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            best = sorted(loaded, key=lambda r: r["requests_per_s"])[len(loaded) // 2]  # the median run
            results[mode] = {"max_batch": max_batch, "loaded": loaded, "alone": alone, "median": best,
                             "alone_p50_ms": statistics.median(r["p50_ms"] for r in alone),
                             "errors": sum(r["errors"] for r in loaded + alone)}
            rows.append([mode, str(max_batch), f"{best['p50_ms']:.1f}", f"{best['p99_ms']:.1f}",
                         f"{best['requests_per_s']:,.0f}", f"{results[mode]['alone_p50_ms']:.2f}",
                         str(results[mode]["errors"])])
    speedup = results["batched"]["median"]["requests_per_s"] / results["one at a time"]["median"]["requests_per_s"]
    notes = [f"{size['clients']} clients, {size['requests']:,} requests per run, {ctx.repeats} run(s) per mode: the "
             "median run by requests/s; 1-client p50: the median over runs of "
             f"{size['alone']} sequential requests",
             f"batched / one at a time: {speedup:.2f}x the requests/s",
             "client and server share this machine's cores (see benchmarks/README.md)"]
    if ctx.quick:
        notes.append("--quick: a smoke test, not figures")
    return {
        "fresh_processes": True,  # each mode's server is a process of its own
        "title": "B8 nnlab serve: seed-cnn classify over HTTP on 127.0.0.1, batched vs one at a time",
        "notes": notes,
        "columns": ["mode", "max batch", "p50 ms", "p99 ms", "requests/s", "1 client p50 ms", "errors"],
        "rows": rows,
        "results": results,
        "batching_speedup": speedup,
        "config": size,
    }
