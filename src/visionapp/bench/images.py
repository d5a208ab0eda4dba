"""KServe serving images side by side, as a node runs them: the slim predictor against the full image.

    python -m visionapp.bench.images IMAGE [IMAGE...] --images-dir data/shapes/test [--engine podman]
    make image-bench IMAGES="visionapp-slim:1 visionapp-kserve:1"

Each image in turn (never two at once), in a container on loopback with host networking, as `make image-run`
starts it:
  size_mb        the image as the engine stores it (`image inspect`)
  ready_s        from `run -d` to /v2/models/<name>/ready answering 200 (the pull is not counted)
  images_per_s   throughput at concurrency 8 over --requests POSTs of --images-dir's images taken in turn
  rss_mb         the container's resident memory after those requests (VmRSS summed over its processes)
  top1_agree     of --answers test images, how many the image answers with the first image's top-1
  max_prob_diff  the largest difference in any class's probability from the first image's answers
Prints a markdown table; --out writes the JSON. Timings on a shared machine vary: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from visionapp.client.api import call, is_ready
from visionapp.deploy.loadgen import run_load
from visionapp.errors import run_main
from visionapp.imagefiles import find_images


def engine_cmd(engine: str, *args: str) -> list[str]:
    """The container engine with the flags this machine needs (ENGINE_FLAGS, as the Makefile's)."""
    return [engine, *shlex.split(os.environ.get("ENGINE_FLAGS", "")), *args]


def answer(url: str, body: bytes) -> dict[str, float]:
    status, text = call(url, "", body, timeout=60)
    if status != 200:
        raise SystemExit(f"POST {url}: HTTP {status}: {text[:300]!r}")
    return json.loads(text)


def resident_mb(engine: str, container: str) -> float:
    """VmRSS of every process in the container (the server, its explainer process where it has one, tini)."""
    out = subprocess.run(
        engine_cmd(engine, "exec", container, "sh", "-c", "cat /proc/[0-9]*/status"),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmRSS:")) / 1024


def measure(image: str, args: argparse.Namespace, bodies: list[bytes]) -> dict:
    engine, name = args.engine, f"visionapp-image-bench-{args.port}"
    inspect = subprocess.run(engine_cmd(engine, "image", "inspect", image, "--format", "{{.Size}}"),
                             capture_output=True, text=True)  # fmt: skip
    if inspect.returncode:
        raise SystemExit(f"{image}: no such image ({inspect.stderr.strip()}): make image-serve SERVER=kserve")
    run = engine_cmd(engine, "run", "-d", "--rm", "--name", name, "--network", "host",
                     *shlex.split(os.environ.get("RUN_FLAGS", "")), image,
                     "--host", "127.0.0.1", "--http_port", str(args.port), "--enable_grpc", "false")  # fmt: skip
    start = time.perf_counter()
    subprocess.run(run, check=True, capture_output=True)
    try:
        base = f"http://127.0.0.1:{args.port}"
        while not is_ready(base, "", Path(), args.model, server="kserve"):  # KServe's keyless readiness
            if time.perf_counter() - start > args.timeout:
                logs = subprocess.run(engine_cmd(engine, "logs", name), capture_output=True, text=True)
                raise SystemExit(f"{image}: not ready after {args.timeout} s:\n{(logs.stdout + logs.stderr)[-2000:]}")
            time.sleep(0.05)
        ready_s = time.perf_counter() - start
        url = f"{base}/predictions/{args.model}"
        answers = [answer(url, b) for b in bodies[: args.answers]]
        load = run_load(url, "", bodies, requests=args.requests, concurrency=8, max_seconds=600)
        if load["ok"] != args.requests:
            raise SystemExit(f"{image}: {load['ok']} of {args.requests} requests answered 200: {load['statuses']}")
        return {
            "image": image, "size_mb": int(inspect.stdout.strip()) / 1e6, "ready_s": ready_s,
            "images_per_s": load["requests_per_second"], "p50_ms": load["p50_ms"],
            "rss_mb": resident_mb(engine, name), "answers": answers,
        }  # fmt: skip
    finally:
        subprocess.run(engine_cmd(engine, "stop", "-t", "5", name), capture_output=True)


def compare(results: list[dict]) -> None:
    """Each image's answers against the first image's: same top-1, largest probability difference."""
    reference = results[0]["answers"]
    for r in results:
        pairs = list(zip(reference, r.pop("answers"), strict=True))
        r["top1_agree"] = f"{sum(max(a, key=a.get) == max(b, key=b.get) for a, b in pairs)}/{len(pairs)}"
        r["max_prob_diff"] = max(abs(a[k] - b.get(k, 0.0)) for a, b in pairs for k in a)


def table(results: list[dict]) -> str:
    rows = ["| image | size MB | ready s | images/s c8 | p50 ms | resident MB | top-1 agree | max prob diff |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    rows += [
        f"| {r['image']} | {r['size_mb']:.0f} | {r['ready_s']:.1f} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} "
        f"| {r['rss_mb']:.0f} | {r['top1_agree']} | {r['max_prob_diff']:.1e} |"
        for r in results
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="KServe serving images (make image-serve SERVER=kserve [SLIM=1])")
    ap.add_argument("--images-dir", type=Path, required=True, help="images sent in turn (a split of make data, photos)")
    ap.add_argument("--engine", default=shutil.which("podman") or shutil.which("docker") or "podman")
    ap.add_argument("--model", default="classifier")
    ap.add_argument("--port", type=int, default=8095)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--answers", type=int, default=50, help="images whose answers are compared across images")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a container may take to be ready")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    files = find_images(args.images_dir)
    if not files:
        raise SystemExit(f"--images-dir {args.images_dir}: no images (make data makes a test split)")
    bodies = [f.read_bytes() for f in files]
    results = []
    for image in args.images:
        print(f"{image}: starting", file=sys.stderr, flush=True)
        results.append(measure(image, args, bodies))
    compare(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
