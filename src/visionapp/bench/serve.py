"""Serving: our handler in process vs our TorchServe deployment vs KServe's model server vs TorchServe's stock
handler, same weights; and the model's forms' forward pass alone, in process.

    python -m visionapp.bench.serve --bundle runs/latest/bundle --image photo.png [--image-size 224]

The bundle is copied (at --image-size: the same weights at another input size, timing only) and exported by make
export's code into --forms; our servers run the default form (the fastest that passed its checks), as make serve
does. Contenders, alternated within each of --rounds rounds:
  inprocess  our handler exactly as TorchServe loads it (extracted from our .mar), called directly: one
             request for latency; a batch of min(c, batchSize) requests for throughput at concurrency c
  ours       our .mar in TorchServe (make serve-bg), HTTP from a keep-alive load generator on loopback
  kserve     the same bundle and model config in KServe's Python model server (make serve-bg SERVER=kserve),
             the same serving core, batching by the same model config's batchSize and maxBatchDelay
  slim       the same KServe server with SLIM=1: the default ONNX form on ONNX Runtime, no torch imported; its
             start (make serve-bg to the first answer) and memory after the rounds against kserve's
  stock      TorchServe's built-in `image_classifier` handler serving the same state_dict (a model file
             for the architecture, index_to_name.json; its own Resize(256)/CenterCrop(224) preprocessing),
             with the same model-config.yaml and server config: the peer users would start from
  --skip     leave out stock, kserve and/or slim (their ratios with them)
  --variant  more servers of our .mar with other make variables, measured in the same rounds, e.g.
             --variant builtin-logs:TS_LOG_CONFIG=      (TorchServe's built-in log configuration)
             --variant window3:MODEL_STORE=/tmp/store3  (a .mar archived with another model config:
                                 make archive MODEL_CONFIG=window3.yaml MODEL_STORE=/tmp/store3)
Each server first answers --warmup requests (default 1000): the JVM compiles TorchServe's frontend over the
first thousands of requests, and a cold frontend is not what a running service has.
Latency p50/p90/p99 at concurrency 1 (request by request, contenders in turn), throughput and p50/p99 latency
at each --concurrency (blocks of requests, contenders in turn); CPU seconds of the server's
frontend, worker and the client during each served measurement, and the mean batch each server formed;
the size of one /explanations answer; a readiness probe's latency while each of our servers is saturated; the
forward pass alone in process at batch 1 and the serving batch size: eager (NCHW and channels-last) and each
exported form, failed ones included (their records say so).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from visionapp.attribution.methods import METHODS
from visionapp.bench import run_part
from visionapp.bundle import form_runner, load_bundle
from visionapp.client.api import call
from visionapp.deploy.archive import build_archives, ood_files, run_archiver
from visionapp.deploy.export import export_bundle
from visionapp.deploy.loadgen import percentile, run_load
from visionapp.deploy.local import LocalServer
from visionapp.manifest import ONNX_FILES, TEST_FILES

MODEL_CONFIG_FILE = Path("serve/model-config.yaml")  # ours, also given to the stock archive
EXPLAIN_CONFIG_FILE = Path("serve/explain-config.yaml")  # our explanations' own workers and queue
MODEL_CONFIG = yaml.safe_load(MODEL_CONFIG_FILE.read_text())
FORM_CHOICES = ("aoti", *ONNX_FILES)  # what make export writes

# The stock handler loads `--model-file`: one class whose no-argument constructor builds the architecture.
STOCK_MODEL_FILE = """from torchvision.models.resnet import {block}, ResNet


class BundleResNet(ResNet):
    def __init__(self):
        super().__init__({block}, {layers}, num_classes={num_classes})
"""
RESNETS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
           "resnet50": ("Bottleneck", [3, 4, 6, 3])}  # fmt: skip


def stock_archive(bundle: Path, out: Path, name: str = "stock") -> Path:
    """A .mar for TorchServe's stock image_classifier handler from our bundle's weights."""
    meta = json.loads((bundle / "model.json").read_text())
    if meta["arch"] not in RESNETS:
        raise SystemExit(f"the stock contender needs a model file; written here for {', '.join(RESNETS)} only")
    if meta["num_classes"] < 5:
        raise SystemExit("the stock image_classifier handler always takes the top 5: it needs 5 or more classes")
    block, layers = RESNETS[meta["arch"]]
    staging = out / f"{name}-files"
    staging.mkdir(parents=True, exist_ok=True)
    model_file = staging / "model.py"
    model_file.write_text(STOCK_MODEL_FILE.format(block=block, layers=layers, num_classes=meta["num_classes"]))
    labels = staging / "index_to_name.json"
    labels.write_text(json.dumps({str(i): c for i, c in enumerate(meta["class_names"])}))
    cmd = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--model-file", str(model_file), "--serialized-file", str(bundle / "model.pt"),
           "--handler", "image_classifier", "--extra-files", str(labels),
           "--config-file", str(MODEL_CONFIG_FILE),
           "--export-path", str(out), "--force"]  # fmt: skip
    run_archiver(cmd)
    return out / f"{name}.mar"


def staged_bundle(bundle: Path, staging: Path, **changes: Any) -> Path:
    """An eager copy of `bundle` in `staging`: its weights and out-of-distribution files linked, model.json with
    `changes` and without exported forms (an export is tied to its input size: the bench exports its own), the
    run's test-file list and metrics beside it (what an export checks itself on and calibrates with)."""
    staging.mkdir(parents=True)
    for f in (
        bundle / "model.pt",
        *ood_files(bundle),
    ):  # the weights, and knn's features where the OOD record names them
        (staging / f.name).symlink_to(f.resolve())
    meta = {k: v for k, v in json.loads((bundle / "model.json").read_text()).items() if k not in ("compiled", "forms")}
    (staging / "model.json").write_text(json.dumps({**meta, **changes}, indent=2))
    for name in (TEST_FILES, "metrics.json"):  # the run's test split, and its data (validation images, OOD sets)
        if (bundle.parent / name).is_file():
            (staging.parent / name).symlink_to((bundle.parent / name).resolve())
    return staging


def check_resizable(bundle: Path, image_size: int | None) -> None:
    """--image-size serves the weights at another size: a torchvision CNN's global pooling takes any size (timing
    only: its accuracy is for its own size); a ViT's position embeddings are made for the size it was trained at."""
    meta = json.loads((bundle / "model.json").read_text())
    if image_size and image_size != meta["image_size"] and "model_kwargs" in meta:
        raise SystemExit(f"--image-size: a {meta['arch']} is built for {meta['image_size']} px; serve it at that")


def exported_bundle(bundle: Path, out: Path, forms: tuple[str, ...], **changes: Any) -> tuple[Path, dict]:
    """A staged copy of `bundle` (with `changes`) exported by make export's code into `forms`, failed forms kept
    for timing (never served); the copy and the forms' records. One already in `out` with the same changes and
    forms (an earlier part of the same make bench, --staging) is used as it is: exporting is minutes at 224 px."""
    staging = out / "run" / "bundle"
    if (staging / "model.json").is_file():
        meta = json.loads((staging / "model.json").read_text())
        records = meta.get("forms", {}).get("cpu", {})
        if all(meta.get(k) == v for k, v in changes.items()) and set(forms) <= set(records):
            print(f"  the forms exported at {meta['image_size']} px by an earlier part: {', '.join(forms)}", flush=True)
            return staging, records
        raise SystemExit(f"--staging {out}: holds another staged bundle; give an empty or new folder")
    staged_bundle(bundle, staging, **changes)
    if not forms:
        return staging, {}
    return staging, export_bundle(staging, forms=forms, max_batch=MODEL_CONFIG["batchSize"], keep_failed=True)


def our_archives(bundle: Path, out: Path) -> Path:
    """Our .mar (and the explanations' beside it, as make archive writes them); the predictions' one."""
    mar, _ = build_archives(bundle, name="classifier", out=out, model_config=MODEL_CONFIG_FILE,
                            explain_config=EXPLAIN_CONFIG_FILE)  # fmt: skip
    return mar


def form_times(bundle_dir: Path, records: dict, batch_sizes: tuple[int, ...], rounds: int, repeats: int = 10) -> dict:
    """Milliseconds of the forward pass alone per batch size: eager NCHW, eager channels-last and each exported
    form (logits and features), alternated within each round (medians)."""
    eager = load_bundle(bundle_dir)
    last = load_bundle(bundle_dir).model.to(memory_format=torch.channels_last)
    runners: dict[str, Callable[[torch.Tensor], object]] = {
        "eager": eager.run, "eager_channels_last": lambda x: last(x.contiguous(memory_format=torch.channels_last)),
        **{name: form_runner(bundle_dir / r["file"], name, r) for name, r in records.items()
           if (bundle_dir / r.get("file", "")).is_file()},
    }  # fmt: skip
    size = eager.meta["image_size"]
    out: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in batch_sizes:
                x = torch.randn(n, 3, size, size)
                for name, fn in runners.items():
                    fn(x)  # warm
                    times = timed(functools.partial(fn, x), repeats)
                    out[name].setdefault(f"b{n}", []).append(statistics.median(times))
    return {name: {b: statistics.median(v) * 1e3 for b, v in per.items()} for name, per in out.items()}


def in_process_handler(mar: Path, workdir: Path) -> Callable[[list[dict]], list]:
    """The handler exactly as TorchServe loads it: extracted from the .mar, imported from there."""
    from ts.context import Context, RequestProcessor

    model_dir = workdir / "model"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    # Loaded from the extracted archive by its path: `import handler` would reuse the first one made in this
    # process. Its `visionapp` imports resolve to the installed package: the same code the .mar carries.
    spec = importlib.util.spec_from_file_location("handler", model_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    batch_size = MODEL_CONFIG["batchSize"]
    ctx = Context("classifier", str(model_dir), manifest, batch_size, None, "0.12.0", model_yaml_config=MODEL_CONFIG)
    ctx.metrics = _Uncounted()
    h = handler.ImageClassifierHandler()
    h.initialize(ctx)

    def run(rows: list[dict]) -> list:
        ctx.request_processor = [RequestProcessor({}) for _ in rows]
        return h.handle(rows, ctx)

    return run


class _Uncounted:
    """Where the handler reports its metrics: the server's metrics cache, which is TorchServe's cost, not ours."""

    def add_time(self, *args: object, **kwargs: object) -> None:
        pass

    add_metric = add_time


class Server(LocalServer):
    """A server from `make serve-bg` on free ports (visionapp.deploy.local), with what the bench measures it by."""

    def __init__(self, mar: Path, serve_dir: Path, *extra_vars: str, server: str = "torchserve") -> None:
        super().__init__(mar.parent, serve_dir, mar.stem, *extra_vars, server=server)
        self.answered = 0  # requests sent by load(): KServe's server runs each alone

    def batches(self) -> int:
        """Batches the model has run so far: TorchServe's worker logs one line per batch; KServe's server counts
        them on its /metrics (BatchesRun)."""
        if self.server == "kserve":
            conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=30)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("BatchesRun_total{")))  # fmt: skip
        log = self.dir / "model_log.log"
        return log.read_text().count("Backend received inference") if log.exists() else 0

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by this server's Java frontend and Python worker(s), and by this process."""
        out = {"frontend": 0.0, "worker": 0.0, "client": sum(psutil.Process().cpu_times()[:2])}
        for p in self.processes():
            with suppress(psutil.Error):  # a process that ended meanwhile
                cmd = " ".join(p.info["cmdline"] or [])
                role = "worker" if "model_service_worker" in cmd or "kserve_server" in cmd else "frontend"
                out[role] += sum(p.cpu_times()[:2])
        return out

    def rss_mb(self) -> float:
        """Resident memory of the server's processes (frontend, workers, explainers), MB."""
        total = 0
        for p in self.processes():
            with suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def request_once(self, body: bytes) -> Callable[[], None]:
        """A function that POSTs `body` once over one keep-alive connection, as the load generator does."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/octet-stream"}

        def post() -> None:
            conn.request("POST", f"/predictions/{self.model}", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{self.model}: HTTP {response.status}")

        return post

    def load(self, body: bytes, *, requests: int, concurrency: int) -> dict:
        batches, before = self.batches(), self.cpu_seconds()  # reading the log is not the client's load
        r = run_load(self.url(), self.key, body, requests=requests, concurrency=concurrency, max_seconds=300)
        self.answered += requests
        after = self.cpu_seconds()
        if r["ok"] != requests:
            raise SystemExit(f"{self.model}: {r['ok']} of {requests} requests succeeded: {r['statuses']}")
        r["cores_busy"] = {k: (after[k] - before[k]) / r["seconds"] for k in after}
        r["batch"] = requests / max(1, self.batches() - batches)  # requests per forward pass, on average
        return r


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_round(handle, servers: dict[str, Server], body: bytes, args: argparse.Namespace, seed: int) -> dict:
    """One round: latency at concurrency 1, then throughput at each concurrency, contenders alternated in an
    order shuffled by `seed` (the round's number)."""
    batch_size = MODEL_CONFIG["batchSize"]
    out: dict[str, dict] = {"inprocess": {}, **{name: {} for name in servers}}
    # Concurrency 1: request by request, the contenders in turn, so that each sees the same machine state
    # (on a shared machine, blocks measured a minute apart differ by more than the overhead measured here).
    # The order is shuffled each time: whoever runs right after another contender pays for that one's
    # OpenMP threads, which spin for a while after each call (measured: ~2 ms on the next request). A
    # rotating order was not enough: it keeps each contender behind the same predecessor.
    calls = {"inprocess": lambda: handle([{"body": body}]), **{n: s.request_once(body) for n, s in servers.items()}}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names, rng = list(calls), random.Random(seed)
    for _ in range(args.requests):
        rng.shuffle(names)
        for name in names:
            seconds[name].extend(timed(calls[name], 1))
    for name, values in seconds.items():
        out[name]["latency_ms"] = {f"p{q}": percentile(values, q) * 1e3 for q in (50, 90, 99)}
    for c in args.concurrency:
        n = min(c, batch_size)  # the batch TorchServe would form at this concurrency
        images = args.requests * max(1, c // 4)  # per contender and block
        blocks = ["inprocess", *servers]
        rng.shuffle(blocks)  # blocks of seconds each; the machine's speed drifts, so no one always goes first
        for name in blocks:
            if name == "inprocess":
                # The same statistic as the servers': images over the block's seconds, for as many images (a
                # median batch time would leave out the slow moments that a server's block includes).
                batched = timed(functools.partial(handle, [{"body": body}] * n), max(3, round(images / n)))
                out[name][f"c{c}"] = {"images_per_s": n * len(batched) / sum(batched), "batch": n}
                continue
            r = servers[name].load(body, requests=images, concurrency=c)
            out[name][f"c{c}"] = {"images_per_s": r["requests_per_second"], "p50_ms": r["p50_ms"],
                                  "p99_ms": r["p99_ms"], "cores_busy": r["cores_busy"],
                                  "batch": r["batch"]}  # fmt: skip
    return out


def during_explanations(
    server: Server, body: bytes, requests: int, explanations: int = 4, method: str = "occlusion"
) -> dict[str, Any]:
    """Prediction latency at concurrency 1, idle and while `explanations` explanations (occlusion: hundreds of
    forward passes each) are in flight (sent at once; the predictions counted are those answered before the first
    explanation finished)."""
    predict = server.request_once(body)
    idle = timed(predict, requests)
    explain_url, done = server.url("explanations"), []

    def explain() -> None:
        status, _ = call(explain_url, server.key, body, headers={"X-Method": method}, timeout=600)
        done.append((time.perf_counter(), status))

    with ThreadPoolExecutor(explanations) as pool:
        futures = [pool.submit(explain) for _ in range(explanations)]
        time.sleep(0.5)  # all of them admitted and running or queued
        during: list[float] = []
        while not done and len(during) < 10 * requests:
            during += timed(predict, 1)
        for f in futures:
            f.result()
    return {"idle_p50_ms": percentile(idle, 50) * 1e3, "during_p50_ms": percentile(during, 50) * 1e3,
            "during_requests": len(during), "explained": sum(s == 200 for _, s in done),
            "explanations": explanations, "method": method}  # fmt: skip


def ready_latency(
    server: Server, body: bytes, requests: int = 320, probes: int = 50, concurrency: int = 16
) -> dict[str, float]:
    """A readiness probe's latency (ms) while the server is saturated at `concurrency` by `requests` predictions:
    KServe's /v2/models/<name>/ready, TorchServe's /ping (its frontend wants the key on every path), one every
    20 ms."""
    path = f"/v2/models/{server.model}/ready" if server.server == "kserve" else "/ping"
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(server.load, body, requests=requests, concurrency=concurrency)
        time.sleep(1.0)  # the load running, batches full
        seconds = []
        for _ in range(probes):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            start = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {server.key}"} if server.key else {})
            response = conn.getresponse()
            response.read()
            status = response.status
            seconds.append(time.perf_counter() - start)
            conn.close()
            if status != 200:
                raise SystemExit(f"{server.model}: {path} answered {status} under load")
            time.sleep(0.02)
        saturated = not load.done()  # the probes were answered while the load ran
        load.result()
    return {"p50_ms": percentile(seconds, 50) * 1e3, "p99_ms": percentile(seconds, 99) * 1e3,
            "during_load": saturated}  # fmt: skip


def response_bytes(servers: dict[str, Server], body: bytes) -> dict[str, int]:
    """Bytes of one /explanations answer for the image: our heatmap PNG vs the stock handler's raw tensor."""
    sizes = {}
    for name, server in servers.items():
        status, answer = call(server.url("explanations"), server.key, body, timeout=300)
        if status != 200:
            raise SystemExit(f"{name}: /explanations answered {status}: {answer[:200]!r}")
        sizes[name] = len(answer)
    return sizes


def leaves(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        *path, last = k.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def run(args: argparse.Namespace) -> dict:
    body = Path(args.image).read_bytes()
    bundle = Path(args.bundle)
    check_resizable(bundle, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        resize = {"image_size": args.image_size} if args.image_size else {}
        served = Path(args.staging) if args.staging else tmpdir / "served"
        staging, records = exported_bundle(bundle, served, tuple(args.forms), **resize)
        default = load_bundle(staging, runtime="auto").form  # what our servers run, as make serve does
        mar = our_archives(staging, tmpdir / "store")
        stock_mar = None if "stock" in args.skip else stock_archive(staging, tmpdir / "stock_store")
        rounds, explain_bytes, during, started = measure_servers(args, body, mar, staging, stock_mar, tmpdir)
        # the forward alone, with the servers stopped: eager and each form
        forward_ms = form_times(staging, records, (1, MODEL_CONFIG["batchSize"]), args.rounds)
        image_size = json.loads((staging / "model.json").read_text())["image_size"]
    median = nest({k: statistics.median(r[k] for r in rounds) for k in rounds[0]})
    spread = nest({k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]})
    settings = {"image": args.image, "bundle": args.bundle, "image_size": image_size, "rounds": args.rounds,
        "warmup": args.warmup,
        "requests": args.requests, "concurrency": args.concurrency, "forms": args.forms, "skip": args.skip,
        "variants": dict(args.variant)}  # fmt: skip
    return {"median": median, "spread": spread, "explanation_response_bytes": explain_bytes,
            "during_explanations": during, "started": started, "forms": records, "default_form": default,
            "forward_ms": forward_ms,
            **ratios(median, during, explain_bytes, forward_ms, default, started), "settings": settings,
            "raw_rounds": rounds}  # fmt: skip


def ratios(
    median: dict, during: dict, explain_bytes: dict, forward_ms: dict, default: str, started: dict
) -> dict[str, float]:
    """The part's keys: our TorchServe against the handler in process and the stock handler, KServe's server
    against both, predictions while explanations run, and the forms' forward pass against eager's."""
    ours, inprocess, b = median["ours"], median["inprocess"], f"b{MODEL_CONFIG['batchSize']}"
    out = {
        "serve.p50_vs_inprocess_c1": ours["latency_ms"]["p50"] / inprocess["latency_ms"]["p50"],
        "serve.throughput_vs_inprocess_c8": ours["c8"]["images_per_s"] / inprocess["c8"]["images_per_s"],
        # a lone prediction's p50 while 4 occlusion explanations are in flight, against idle
        "serve.predict_p50_during_explanations_vs_idle": (
            during["ours"]["during_p50_ms"] / during["ours"]["idle_p50_ms"]
        ),
        "infer.default_vs_eager_b8": forward_ms["eager"][b] / forward_ms[default][b],
        "infer.channels_last_vs_eager_b8": forward_ms["eager"][b] / forward_ms["eager_channels_last"][b],
    }  # fmt: skip
    if "onnx-int8" in forward_ms:
        out["infer.int8_vs_eager_b8"] = forward_ms["eager"][b] / forward_ms["onnx-int8"][b]
    if "stock" in median:  # the default form against where users start, same size, same client
        out["serve.default_form_vs_stock_c8"] = ours["c8"]["images_per_s"] / median["stock"]["c8"]["images_per_s"]
        out["serve.default_form_p50_vs_stock_c1"] = ours["latency_ms"]["p50"] / median["stock"]["latency_ms"]["p50"]
        out["explain.response_bytes_vs_stock"] = explain_bytes["ours"] / explain_bytes["stock"]
    if "kserve" in median:
        kserve = median["kserve"]
        out["serve.kserve_p50_vs_inprocess_c1"] = kserve["latency_ms"]["p50"] / inprocess["latency_ms"]["p50"]
        out["serve.kserve_throughput_vs_torchserve_c8"] = kserve["c8"]["images_per_s"] / ours["c8"]["images_per_s"]
        out["serve.kserve_throughput_vs_inprocess_c8"] = kserve["c8"]["images_per_s"] / inprocess["c8"]["images_per_s"]
        out["serve.kserve_ready_p99_ms_saturated"] = during["kserve"]["ready"]["p99_ms"]
        out["serve.kserve_predict_p50_during_explanations_vs_idle"] = (
            during["kserve"]["during_p50_ms"] / during["kserve"]["idle_p50_ms"]
        )
        if "slim" in median:  # the same server and form without torch: throughput, start, memory
            out["serve.slim_throughput_vs_torch_c8"] = (
                median["slim"]["c8"]["images_per_s"] / kserve["c8"]["images_per_s"]
            )
            out["serve.slim_ready_seconds_vs_torch"] = (
                started["slim"]["ready_seconds"] / started["kserve"]["ready_seconds"]
            )
            out["serve.slim_rss_vs_torch"] = started["slim"]["rss_mb"] / started["kserve"]["rss_mb"]
    return out


def measure_servers(
    args: argparse.Namespace, body: bytes, mar: Path, bundle: Path, stock_mar: Path | None, tmpdir: Path
) -> tuple[list[dict], dict, dict, dict]:
    """Start every server (ours, stock, KServe's with `bundle`, the --variant ones; --skip leaves some out), warm
    each, then the rounds side by side with the handler in process; the rounds, each server's /explanations answer
    size and our servers' prediction latency while explanations run."""
    handle = in_process_handler(mar, tmpdir)
    with ExitStack() as stack:
        servers = {"ours": stack.enter_context(Server(mar, tmpdir / "ours"))}
        if stock_mar is not None:
            servers["stock"] = stack.enter_context(Server(stock_mar, tmpdir / "stock"))
        served_bundle = (f"RUN={bundle.resolve().parent}", f"MODEL_CONFIG={MODEL_CONFIG_FILE.resolve()}",
                         f"EXPLAIN_CONFIG={EXPLAIN_CONFIG_FILE.resolve()}")  # fmt: skip
        if "kserve" not in args.skip:
            servers["kserve"] = stack.enter_context(Server(mar, tmpdir / "kserve", *served_bundle, server="kserve"))
        onnx = [n for n, r in json.loads((bundle / "model.json").read_text()).get("forms", {}).get("cpu", {}).items()
                if n.startswith("onnx") and r.get("passed")]  # fmt: skip
        if "slim" not in args.skip and onnx:  # KServe's server on the ONNX form without torch (SLIM=1)
            slim = Server(mar, tmpdir / "slim", *served_bundle, "SLIM=1", server="kserve")
            servers["slim"] = stack.enter_context(slim)
        for name, make_vars in args.variant:
            if name in servers:
                raise SystemExit(f"--variant {name}: the name is given twice")
            servers[name] = stack.enter_context(Server(mar, tmpdir / name, *make_vars))
        for server in servers.values():  # warm-up: workers loaded, first batches done, the JIT at work
            server.load(body, requests=args.warmup, concurrency=8)
        handle([{"body": body}] * 8)
        rounds = [leaves(measure_round(handle, servers, body, args, seed=i)) for i in range(args.rounds)]
        # predictions while explanations run, on our two servers (after the rounds: explanations load the CPU)
        during: dict[str, dict[str, Any]] = {
            name: during_explanations(servers[name], body, args.requests, args.explanations, args.explain_method)
            for name in ("ours", "kserve")
            if name in servers
        }
        for name in ("ours", "kserve"):  # readiness probes while each of our servers is saturated
            if name in servers:
                during[name]["ready"] = ready_latency(servers[name], body, requests=args.saturate)
        # each server's start (make serve-bg to its first answer) and its processes' memory after all those requests
        started = {name: {"ready_seconds": sv.ready_seconds, "rss_mb": sv.rss_mb()} for name, sv in servers.items()}
        explain_bytes = response_bytes({n: sv for n, sv in servers.items() if n in ("ours", "stock")}, body)
        return rounds, explain_bytes, during, started


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle", help="the bundle served (a copy, exported here)")
    ap.add_argument("--image", required=True)
    ap.add_argument(
        "--image-size", type=int, default=None, help="serve the weights at this input size (default: the bundle's)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--warmup", type=int, default=1000, help="requests per server before the rounds (the JVM's JIT warms up)"
    )
    ap.add_argument("--requests", type=int, default=60, help="requests per measurement at concurrency ≤ 4")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--forms", nargs="*", choices=FORM_CHOICES, default=list(FORM_CHOICES),
                    help="the forms exported and timed (none: the eager model serves)")  # fmt: skip
    ap.add_argument("--saturate", type=int, default=320,
                    help="predictions at concurrency 16 while readiness probes are timed")  # fmt: skip
    ap.add_argument("--explanations", type=int, default=4,
                    help="occlusion explanations in flight while a lone prediction's latency is timed")  # fmt: skip
    ap.add_argument("--explain-method", default="occlusion", choices=sorted(METHODS),
                    help="the explanations' method (occlusion: the heaviest)")  # fmt: skip
    ap.add_argument("--staging", default=None, help="stage and export the bundle here, or use the one an earlier "
                    "run staged here with the same size and forms (default: a temporary folder)")  # fmt: skip
    ap.add_argument("--skip", nargs="*", choices=["stock", "kserve", "slim"], default=[],
                    help="servers left out (and the ratios against them)")  # fmt: skip
    ap.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="one more server of the .mar with these make variables (repeatable)",
    )
    ap.add_argument("--out", default="bench/serve_results.json")
    return ap


def variant(spec: str) -> tuple[str, list[str]]:
    name, sep, assignments = spec.partition(":")
    make_vars = assignments.split(",") if assignments else []
    taken = ("inprocess", "ours", "stock", "kserve", "slim")
    if not sep or not name or name in taken or not all("=" in v for v in make_vars):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE], NAME not inprocess/ours/stock/kserve/slim "
            "(e.g. builtin-logs:TS_LOG_CONFIG=)"
        )
    return name, make_vars


def print_table(result: dict) -> None:
    med, spread = result["median"], result["spread"]
    contenders = list(med)

    def cell(c: str, *path: str) -> str:  # median [min..max] over rounds
        m, s = med[c], spread[c]
        for p in path:
            m, s = m[p], s[p]
        return f"{m:7.1f} [{s[0]:.1f}..{s[1]:.1f}]"

    print(f"  {'':22s}" + "".join(f"{c:>24s}" for c in contenders))
    for q in ("p50", "p90", "p99"):
        print(f"  {'c1 latency ' + q + ' ms':22s}" + "".join(f"{cell(c, 'latency_ms', q):>24s}" for c in contenders))
    for key in (k for k in med["inprocess"] if k.startswith("c")):
        print(f"  {key + ' images/s':22s}" + "".join(f"{cell(c, key, 'images_per_s'):>24s}" for c in contenders))
    served = [c for c in contenders if c != "inprocess"]
    for key in (k for k in med["ours"] if k.startswith("c")):
        print(f"  {key + ' mean batch':22s}" + f"{'':>24s}" + "".join(f"{cell(c, key, 'batch'):>24s}" for c in served))
    print(f"  /explanations bytes: {result['explanation_response_bytes']}")
    for name, d in result.get("started", {}).items():
        print(f"  {name}: ready {d['ready_seconds']:.1f} s after make serve-bg, {d['rss_mb']:.0f} MB resident after")
    for name, d in result["during_explanations"].items():
        print(
            f"  {name}: prediction p50 idle {d['idle_p50_ms']:.1f} ms, with 4 explanations in flight "
            f"{d['during_p50_ms']:.1f} ms ({d['during_requests']} predictions)"
        )
    for b in result["forward_ms"]["eager"]:
        print(f"  forward {b} ms: " + ", ".join(f"{n} {ms[b]:.1f}" for n, ms in result["forward_ms"].items()))
    for name, record in ((n, r) for n, r in result["forms"].items() if n != "eager"):  # eager: the reference
        verdict = "passed" if record["passed"] else f"FAILED: {record['reason']}"
        print(f"  {name}: {verdict}, export {record.get('seconds')} s")
    print(f"  our servers ran the {result['default_form']} form")
    for k in (k for k in result if k.startswith(("serve.", "explain.", "infer."))):  # the ratios run() computed
        print(f"  {k:36s} {result[k]:.3f}")


def main(argv: list[str] | None = None) -> int:
    return run_part(parser(), run, print_table, argv)


if __name__ == "__main__":
    sys.exit(main())
