"""What several test modules share: the repository's paths, the tiny training set-up and the real CLI's `fit`.

Imported as `from helpers import ...` (pytest puts tests/ on the path); fixtures live in conftest.py.
"""

from __future__ import annotations

import http.client
import importlib.metadata as md
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import psutil
from packaging.requirements import Requirement
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from visionapp.deploy.archive import build_archives
from visionapp.deploy.local import LocalServer
from visionapp.train.cli import cli_main

ROOT = Path(__file__).parents[1]
MODEL_CONFIG = ROOT / "serve" / "model-config.yaml"
EXPLAIN_CONFIG = ROOT / "serve" / "explain-config.yaml"

# Small enough for 2 CPU cores, big enough that the model really learns (resnet18 at 64 px: 2x2 last map).
# Distributions the track extra (mlflow) installs that other stages' libraries import when they are there and go on
# without (KServe's SDK: the OpenTelemetry SDK, google-auth; pandas: pyarrow; tabulate: wcwidth; ...)
TRACK_OPTIONAL = {"opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions", "pyarrow",
                  "google-auth", "cryptography", "cffi", "cloudpickle", "wcwidth", "blinker"}  # fmt: skip
TINY_SIZE, TINY_COUNTS = 64, {"train": 1500, "val": 100, "test": 100}
TINY_DATA = [
    f"--data.init_args.image_size={TINY_SIZE}",
    *(f"--data.init_args.num_{split}={n}" for split, n in TINY_COUNTS.items()),
    "--data.init_args.loader.num_workers=0",
]


def fit(runs_dir: Path, *args: str) -> Path:
    """`python -m visionapp fit *args` in this process, offline weights, into runs_dir; returns the run."""
    cli_main(["fit", *args, "--model.weights=null", f"--runs_dir={runs_dir}", "--trainer.enable_model_summary=false"])
    return (runs_dir / "latest").resolve()


def run_fit(runs_dir: Path, shapes_root: Path, *extra: str) -> Path:
    """Train the default config on tiny shapes through the real LightningCLI entry point."""
    return fit(runs_dir, "--config=configs/train.yaml", f"--data.init_args.root={shapes_root}", *TINY_DATA, *extra)


@contextmanager
def real_server(
    server: str, run: Path, tmp: Path, *, model_config: str | None = None, explain_config: str | None = None,
    store: Path | None = None, extra_vars: tuple[str, ...] = (),
) -> Iterator[LocalServer]:  # fmt: skip
    """`run`'s bundle served by the real `server` (torchserve or kserve) through make serve-bg on free ports, with
    these model and explanation configs (YAML text; the shipped ones by default), stopped after with no process
    left behind. TorchServe's archives are built in `tmp` unless `store` already holds them."""
    tmp.mkdir(parents=True, exist_ok=True)
    configs = {}
    for key, text, shipped in (("model_config", model_config, MODEL_CONFIG),
                               ("explain_config", explain_config, EXPLAIN_CONFIG)):  # fmt: skip
        configs[key] = shipped if text is None else tmp / f"{key.replace('_', '-')}.yaml"
        if text is not None:
            configs[key].write_text(text)
    if store is None:
        store = tmp / "store"
        if server == "torchserve":  # KServe's server reads the bundle itself
            build_archives(run / "bundle", out=store, **configs)
    make_vars = (f"RUN={run}", f"MODEL_CONFIG={configs['model_config']}",
                 f"EXPLAIN_CONFIG={configs['explain_config']}", *extra_vars)  # fmt: skip
    with LocalServer(store, tmp / "serve", "classifier", *make_vars, server=server) as s:
        before = s.processes()
        yield s
    _, alive = psutil.wait_procs(before, timeout=30)
    assert not alive and not s.processes(), f"left behind: {alive or s.processes()}"


def post_with_headers(server: LocalServer, body: bytes, content_type: str = "image/png") -> tuple[int, dict, object]:
    """A prediction request: the status, the answer's headers (names in lower case) and its decoded JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {server.key}"} if server.key else {})}
    conn.request("POST", "/predictions/classifier", body=body, headers=headers)
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, answer


def sample_image(run: Path, cls: str = "star") -> bytes:
    """The first test image of class `cls` of a shapes run (64 x 64 px in the tiny set-up), as file bytes."""
    root = Path(json.loads((run / "metrics.json").read_text())["data_root"]) / "test" / cls
    return sorted(root.glob("*.png"))[0].read_bytes()


def write_image(path: Path, colour: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Fails at the start of `epoch`, as a crash or a pre-empted job would (last.ckpt holds the epoch before)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at the start of epoch {self.epoch}")


class RecordTrainable(L.Callback):
    """Writes to `out` (JSON), for the first optimizer step of each epoch, every parameter's requires_grad and
    whether it has a gradient: what a run trains, epoch by epoch (ranks past 0 of a DDP run: `out` .rankN.json)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        out = self.out if not trainer.global_rank else self.out.with_suffix(f".rank{trainer.global_rank}.json")
        seen = json.loads(out.read_text()) if out.is_file() else {}
        if str(trainer.current_epoch) in seen:
            return
        params = {n: [p.requires_grad, p.grad is not None] for n, p in pl_module.named_parameters()}
        out.write_text(json.dumps({**seen, str(trainer.current_epoch): params}))


def scrape(server: LocalServer) -> dict[tuple[str, frozenset], float]:
    """Every sample of the metrics port's /metrics (Prometheus text format, no token), keyed by name and labels.
    A direct connection: urllib's global opener keeps whatever proxy an earlier test's environment named."""
    conn = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    assert r.status == 200
    text = r.read().decode()
    conn.close()
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("Hostname", "hostname"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def closure(names: list[str]) -> set[str]:
    """The distributions these requirements (names, with [extras] where given) install, with everything they
    require, as their installed metadata says."""
    seen: set[str] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = name + "".join(f"[{e}]" for e in sorted(req.extras))
        if key in seen:
            continue
        seen |= {key, name}
        for r in md.requires(name) or []:
            dep = Requirement(r)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return {n for n in seen if "[" not in n}


def loaded_distributions(module: str, cwd: Path) -> set[str]:
    """The distributions importing `module` (in a fresh interpreter, from `cwd`) loads."""
    probe = ("import sys, json, importlib.metadata as md; before = set(sys.modules); "
             f"import {module}; dists = md.packages_distributions(); "
             "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
             "print(json.dumps(sorted({d for m in new for d in dists.get(m, [])})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def requirements(path: Path) -> list[Requirement]:
    return [Requirement(ln) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


_PROBE = """
import importlib, json, os, sys, importlib.metadata as md
modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for m in preload:
    importlib.import_module(m)
dists, out = md.packages_distributions(), {}
for module in modules:
    r, w = os.pipe()
    if os.fork() == 0:
        before = set(sys.modules)
        importlib.import_module(module)
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        os.write(w, json.dumps(sorted({d for m in new for d in dists.get(m, [])})).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out[module] = json.loads(f.read())
    os.wait()
print(json.dumps(out))
"""


def loaded_by_each(modules: list[str], cwd: Path, preload: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """The distributions importing each module loads: one fresh interpreter imports `preload` (packages every
    module shares, not counted), then each module in a fork of itself, so no module's imports hide another's."""
    args = [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(list(preload))]
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True)
    return {m: set(d) for m, d in json.loads(out.stdout.splitlines()[-1]).items()}


IMAGE = "registry.example/visionapp-serve:1"


def rendered(name: str, server: str = "torchserve", **overrides: object) -> dict:
    """One manifest of `make k8s`'s, rendered with example values (overrides replace them), as a dict."""
    from visionapp.deploy.manifests import documents, render

    values = {"name": "classifier", "model": "classifier", "image": IMAGE, "version": "run", "replicas": 1,
              "max_replicas": 2, "cpus": "2", "mem_mb": 4096, "queue_ms": "100", "storage_uri": "pvc://m/run",
              "monitoring_namespace": "monitoring", "gpu": "", "runtime": "classifier-torchserve",
              "other_clients": "", "slim_arg": "", "explainer": "", **overrides}  # fmt: skip
    return documents(render(values, templates=ROOT / "serve" / "k8s", server=server)[name])[0]
