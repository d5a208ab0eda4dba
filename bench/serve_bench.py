"""Serving cost: our TorchServe deployment against the same handler code called in process.

    python bench/serve_bench.py --mar model_store/classifier.mar --image photo.png [--rounds 3]

Starts TorchServe (make serve-bg on spare ports), then alternates, for --rounds rounds:
  in process, concurrency 1: preprocess + inference + postprocess of the handler on one request
  served,     concurrency 1: HTTP latency through TorchServe (p50/p90/p99)
  in process, batch of 8:    the handler on 8 requests at once (the batch TorchServe would form)
  served,     concurrency 8: HTTP throughput with server-side batching
and prints medians over rounds, with the spread, plus the two ratios. Writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "serve"))
from client import inference_key  # noqa: E402
from load import percentile, run_load  # noqa: E402


def in_process_handler(mar: Path, workdir: Path):
    """The handler exactly as TorchServe loads it: extracted from the .mar, imported from there."""
    from ts.context import Context, RequestProcessor

    model_dir = workdir / "model"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    sys.path.insert(0, str(model_dir))
    import handler  # from the extracted archive

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    ctx = Context("classifier", str(model_dir), manifest, 8, None, "0.12.0", model_yaml_config={"minWorkers": 1})
    h = handler.ImageClassifierHandler()
    h.initialize(ctx)
    h.context = ctx

    def run(rows: list[dict]) -> list:
        ctx.request_processor = [RequestProcessor({}) for _ in rows]
        return h.postprocess(h.inference(h.preprocess(rows)))

    return run


def cpu_seconds(serve_dir: Path, worker_port: int) -> dict[str, float]:
    """CPU time used so far by this server's Java frontend, its Python worker(s), and this process (the client)."""
    import psutil

    out = {"frontend": 0.0, "worker": 0.0, "client": sum(psutil.Process().cpu_times()[:2])}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "model_service_worker" in cmd and f".ts.sock.{worker_port}" in cmd:
            out["worker"] += sum(p.cpu_times()[:2])
        elif "org.pytorch.serve.ModelServer" in cmd and p.cwd() == str(serve_dir):  # started from SERVE_DIR
            out["frontend"] += sum(p.cpu_times()[:2])
    return out


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mar", default="model_store/classifier.mar")
    ap.add_argument("--image", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="HTTP requests per served measurement")
    ap.add_argument("--port", type=int, default=18480)
    ap.add_argument("--out", default="bench/serve_results.json")
    args = ap.parse_args(argv)
    body = Path(args.image).read_bytes()
    mar = Path(args.mar).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        handle = in_process_handler(mar, tmpdir)
        port = args.port
        make_vars = [f"INFERENCE_PORT={port}", f"MANAGEMENT_PORT={port + 1}", f"METRICS_PORT={port + 2}",
                     f"WORKER_PORT={port + 3}", f"GRPC_INFERENCE_PORT={port + 4}",
                     f"GRPC_MANAGEMENT_PORT={port + 5}", f"MODEL_STORE={mar.parent}", f"MODEL_NAME={mar.stem}",
                     f"SERVE_DIR={tmpdir / 'serve'}"]  # fmt: skip
        subprocess.run(["make", "-s", "serve-bg", *make_vars], cwd=ROOT, check=True)
        try:
            key = inference_key(tmpdir / "serve")
            url = f"http://127.0.0.1:{port}/predictions/{mar.stem}"
            run_load(url, key, body, requests=20, concurrency=8, max_seconds=60)  # warm-up
            handle([{"body": body}] * 8)
            rounds = []
            for _ in range(args.rounds):
                single = timed(lambda: handle([{"body": body}]), args.requests)
                served1 = run_load(url, key, body, requests=args.requests, concurrency=1, max_seconds=300)
                batched = timed(lambda: handle([{"body": body}] * 8), max(5, args.requests // 8))
                before = cpu_seconds(tmpdir / "serve", port + 3)
                served8 = run_load(url, key, body, requests=args.requests * 2, concurrency=8, max_seconds=300)
                after = cpu_seconds(tmpdir / "serve", port + 3)
                cpu = {k: (after[k] - before[k]) / served8["seconds"] for k in after}  # cores busy on average
                rounds.append({
                    "inprocess_c1_p50_ms": percentile(single, 50) * 1e3,
                    "served_c1_p50_ms": served1["p50_ms"], "served_c1_p90_ms": served1["p90_ms"],
                    "served_c1_p99_ms": served1["p99_ms"],
                    "inprocess_batch8_images_per_s": 8 / statistics.median(batched),
                    "served_c8_requests_per_s": served8["requests_per_second"],
                    **{f"c8_cores_busy_{k}": v for k, v in cpu.items()},
                })  # fmt: skip
        finally:
            subprocess.run(["make", "-s", "stop", *make_vars], cwd=ROOT, check=False)
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    spread = {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]}
    summary["p50_vs_inprocess_c1"] = summary["served_c1_p50_ms"] / summary["inprocess_c1_p50_ms"]
    summary["throughput_c8_vs_inprocess_batched"] = (
        summary["served_c8_requests_per_s"] / summary["inprocess_batch8_images_per_s"]
    )
    result = {"summary": summary, "spread": spread, "rounds": rounds, "image": args.image, "mar": str(mar)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k, v in summary.items():
        lo_hi = spread.get(k)
        print(f"{k:40s} {v:10.3f}" + (f"   [{lo_hi[0]:.3f} .. {lo_hi[1]:.3f}]" if lo_hi else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
