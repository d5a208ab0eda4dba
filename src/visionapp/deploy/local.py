"""A server on free loopback ports, started with `make serve-bg` and stopped with `make stop`: the same config as
`make serve`, for the end-to-end tests and the benchmarks. TorchServe by default; server="kserve" for KServe's
model server (the make variables RUN and MODEL_CONFIG then name what it serves).

    with LocalServer(Path("model_store"), Path("/tmp/serve")) as s:
        status, answer = s.post(Path("photo.png").read_bytes())
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import psutil

from visionapp.client.api import call, inference_key
from visionapp.serve.inputs import explain_name

S = TypeVar("S", bound="LocalServer")
PORTS = ("INFERENCE", "MANAGEMENT", "METRICS", "WORKER", "GRPC_INFERENCE", "GRPC_MANAGEMENT")  # make variables


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open at once while the OS picks them, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalServer:
    def __init__(
        self,
        store: Path,
        serve_dir: Path,
        model: str = "classifier",
        *extra_vars: str,
        checkout: Path = Path(),
        server: str = "torchserve",
    ) -> None:
        """`store` holds `<model>.mar`; `serve_dir` gets the server's keys, logs and pid file; `extra_vars` are
        more make variables (e.g. TORCHSERVE=... for another launcher); `checkout` is the project's folder, whose
        Makefile starts and stops the server (default: the working directory, as for every make target)."""
        self.server = server
        # explanations' own model name where they have one (KServe's server answers both names)
        has_own = server == "kserve" or (Path(store) / f"{explain_name(model)}.mar").is_file()
        self.explain_model = explain_name(model) if has_own else model
        self.checkout = Path(checkout)
        ports = free_ports(len(PORTS))
        self.port, self.worker_port = ports[PORTS.index("INFERENCE")], ports[PORTS.index("WORKER")]
        self.management_port = ports[PORTS.index("MANAGEMENT")]
        # KServe's server answers /metrics on its one HTTP port
        self.metrics_port = self.port if server == "kserve" else ports[PORTS.index("METRICS")]
        self.model, self.dir = model, Path(serve_dir)
        self.make_vars = [f"{name}_PORT={p}" for name, p in zip(PORTS, ports, strict=True)]
        self.make_vars += [f"MODEL_STORE={store}", f"MODEL_NAME={model}", f"SERVE_DIR={self.dir}", f"SERVER={server}"]
        self.make_vars += extra_vars
        self.key = ""

    def start(self: S) -> S:
        """Returns once the model's worker is ready (what make serve-bg waits for); a failed start leaves no
        server behind."""
        start = time.perf_counter()
        try:
            subprocess.run(["make", "-s", "serve-bg", *self.make_vars], cwd=self.checkout, check=True, timeout=300)
        except BaseException:
            self.stop(check=False)
            raise
        self.ready_seconds = time.perf_counter() - start  # from make serve-bg to the model's first answer
        self.key = inference_key(self.dir) if self.server == "torchserve" else ""  # KServe's server has no keys
        return self

    def stop(self, check: bool = True) -> None:
        """`make stop`, then wait for the server's processes to end (TorchServe's stop returns before Java exits);
        any still there after 30 s are killed: no server is left behind."""
        running = self.processes()
        subprocess.run(["make", "-s", "stop", *self.make_vars], cwd=self.checkout, check=check, timeout=120)
        _, alive = psutil.wait_procs(running, timeout=30)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(check=False)

    def url(self, endpoint: str = "predictions", management: bool = False) -> str:
        model = self.explain_model if endpoint == "explanations" else self.model
        return f"http://127.0.0.1:{self.management_port if management else self.port}/{endpoint}/{model}"

    def post(
        self,
        body: bytes,
        endpoint: str = "predictions",
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, object]:
        """The HTTP status and the decoded JSON answer."""
        status, raw = call(self.url(endpoint), self.key, body, content_type, headers=headers)
        return status, json.loads(raw)

    def worker_ports(self) -> list[int]:
        """TorchServe's workers' ports: one per worker from WORKER_PORT on, the predictions' first, then the
        explanations' (one worker each in the shipped configs)."""
        return [self.worker_port, self.worker_port + 1]

    def model_process(self, explanations: bool = False) -> psutil.Process:
        """The process that runs the model: TorchServe's predictions (or explanations) worker, or KServe's server
        itself (its explainer processes are its children)."""
        procs = self.processes()
        if self.server == "kserve":
            explainers = [p for p in procs[1:] if "spawn_main" in " ".join(p.info["cmdline"])]
            return explainers[0] if explanations and explainers else procs[0]
        port = self.worker_ports()[1 if explanations and self.explain_model != self.model else 0]
        return next(p for p in procs if f".ts.sock.{port}" in " ".join(p.info["cmdline"]))

    def processes(self) -> list[psutil.Process]:
        """KServe's: the process in its pid file and its children. TorchServe's: its Java frontend (its command
        line does not name the directory; make serve-bg starts it from there) and its Python worker(s) (named by
        their socket). Each with the command line read here in `.info["cmdline"]`."""
        found = []
        if self.server == "kserve":
            with suppress(OSError, ValueError, psutil.Error):
                main = psutil.Process(int((self.dir / "kserve.pid").read_text()))
                found = [main, *main.children(recursive=True)]
                for p in found:
                    p.info = {"cmdline": p.cmdline()}
            return found
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            with suppress(psutil.Error):  # a process that ended meanwhile
                if any(f".ts.sock.{port}" in cmd for port in self.worker_ports()) or (
                    "org.pytorch.serve.ModelServer" in cmd and Path(p.cwd()) == self.dir.resolve()
                ):
                    found.append(p)
        return found
