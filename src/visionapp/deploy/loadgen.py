"""Load generator for the TorchServe deployment, on loopback, bounded in count and time.

    python -m visionapp.deploy.loadgen photo.jpg --port 8080 --requests 200 --concurrency 16 [--max-seconds 60]

Sends --requests POSTs of the image from --concurrency threads, stops early at --max-seconds, and prints
a JSON summary: answered, ok, statuses, connection errors, latency p50/p90/p99 (ms) and requests/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from visionapp.client.api import inference_key


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class KeepAliveClient:
    """POSTs bodies over one keep-alive connection per thread, as real clients and load tools do; a connection the
    server closed while idle is reopened once."""

    def __init__(self, url: str, key: str, timeout: float) -> None:
        self.url, self.timeout = urllib.parse.urlsplit(url), timeout
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
        self.local = threading.local()

    def post(self, body: bytes, retry: bool = True) -> int:
        if getattr(self.local, "conn", None) is None:
            host, port = self.url.hostname or "127.0.0.1", self.url.port
            self.local.conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            self.local.conn.request("POST", self.url.path, body=body, headers=self.headers)
            response = self.local.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.local.conn.close()
            self.local.conn = None
            if retry:
                return self.post(body, retry=False)
            raise


def run_load(
    url: str,
    key: str,
    body: bytes | Sequence[bytes],
    *,
    requests: int,
    concurrency: int,
    max_seconds: float,
    timeout: float = 60,
) -> dict:
    """`requests` POSTs from `concurrency` threads, stopped after max_seconds: statuses and latencies. `body` is
    the one image every request sends, or a list of them taken in turn (a folder's files)."""
    bodies = [body] if isinstance(body, bytes) else list(body)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    client = KeepAliveClient(url, key, timeout)

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            with lock:
                statuses["skipped (time limit)"] += 1
            return
        t = time.perf_counter()
        try:
            label = str(client.post(bodies[i % len(bodies)]))
        except (OSError, http.client.HTTPException) as e:
            label = f"connection error: {type(e).__name__}"
        with lock:
            statuses[label] += 1
            if label == "200":
                latencies.append((time.perf_counter() - t) * 1e3)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    answered = sum(v for k, v in statuses.items() if k.isdigit())
    return {
        "requests": requests, "concurrency": concurrency, "answered": answered, "ok": statuses.get("200", 0),
        "statuses": dict(statuses), "seconds": wall, "requests_per_second": statuses.get("200", 0) / wall,
        "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90), "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--dir", default=None, help="server directory with key_file.json (default logs/serve-PORT)")
    ap.add_argument("--model", default="classifier")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args(argv)
    key = inference_key(args.dir or f"logs/serve-{args.port}")
    url = f"http://127.0.0.1:{args.port}/predictions/{args.model}"
    summary = run_load(
        url,
        key,
        Path(args.image).read_bytes(),
        requests=args.requests,
        concurrency=args.concurrency,
        max_seconds=args.max_seconds,
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
