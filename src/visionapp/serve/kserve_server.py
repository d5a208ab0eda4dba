"""KServe's Python model server for a visionapp bundle: a thin adapter over the serving core (visionapp.serve.core).

    python -m visionapp.serve.kserve_server --bundle runs/latest/bundle --model_name classifier \
        --host 127.0.0.1 --http_port 8080 --enable_grpc false        # what make serve SERVER=kserve runs

The same bundle and model config as TorchServe's .mar, the same answers, through `kserve.Model` + `ModelServer`
(maintained, KServe-native): the Open Inference Protocol (`/v2/models/<name>/infer`, metadata, `/v2/health/live`
and `/v2/health/ready`, gRPC where enabled), KServe's v1 verbs (`/v1/models/<name>:predict` and `:explain`,
with a raw image or this project's JSON body), Prometheus metrics on `/metrics`, and the project's own
`/predictions/<name>` and `/explanations/<name>` as TorchServe answers them, so clients need not change.

KServe's server has no token authorisation: locally it listens on loopback only (`--host`; upstream binds every
interface, which is what a pod needs), in a cluster a NetworkPolicy admits only the ingress (make k8s). Ready
(`/v2/health/ready`) only once the model has loaded and answered a warm-up prediction. Predictions are batched
in the serving core (`Batcher`: the model config's batchSize and maxBatchDelay, as TorchServe reads them) and run
on one inference thread; the event loop only moves bytes, so probes, metadata and other requests' bodies are
answered while the model works. Explanations run apart, in explainer processes of their own
(--explain-config: minWorkers processes of torchThreads threads each), so that they never hold up a prediction;
when maxExplanationsWaiting explanations already wait, another is answered 503 at once with Retry-After.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import hmac
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import kserve
import yaml
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, ORJSONResponse
from kserve.errors import InvalidInput
from kserve.model_server import app
from kserve.protocol.infer_type import InferRequest, InferResponse, to_http_parameters
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from prometheus_client import Counter, Gauge, Histogram

from visionapp.serve.core import NO_EXPLANATIONS, Admission, Batcher, Failure, Metrics, ServingCore
from visionapp.serve.inputs import (
    V2_EXAMPLE,
    BadInput,
    Limits,
    Request,
    explain_name,
    parse_json,
    parse_request,
    parse_v2,
    v2_body,
    worker_threads,
)

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 10 * 1024 * 1024  # as TorchServe's max_request_size (serve/config.properties): 413 above
RESTART_SECONDS = 15  # Retry-After while a dead explainer is replaced: a new process imports torch, loads the bundle


def _broken(pool: ProcessPoolExecutor) -> bool:
    """Whether one of the pool's processes died: the executor then refuses all work for good. Its own flag (no public
    API says it), set by the executor's manager thread as soon as the process's sentinel fires."""
    return bool(getattr(pool, "_broken", False))


class ServingError(Exception):
    """A request's Failure, raised out of the model so that the app answers it with its status."""

    def __init__(self, failure: Failure, native: bool = False) -> None:
        super().__init__(failure.message)
        self.failure, self.native = failure, native


class RecordedMetrics:
    """Metrics added in an explainer process, sent back with its answer and added here (the registry is ours)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str, bool, dict[str, str]]] = []

    def add(self, name: str, value: float, unit: str, histogram: bool = False, **dimensions: str) -> None:
        self.calls.append((name, value, unit, histogram, dimensions))


_EXPLAINER: ServingCore | None = None  # in each explainer process


def _device() -> str:
    """Where the torch engine runs (the slim predictor imports no torch and runs on the CPU)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _start_explainer(bundle: Path, config: dict[str, Any], name: str, version: str) -> None:
    global _EXPLAINER
    logging.basicConfig(level=logging.INFO, format="%(asctime)s explainer %(levelname)s %(message)s")
    _EXPLAINER = ServingCore(bundle, _device(), config, name, version)


def _explain(req: Request) -> tuple[list[dict[str, Any]] | Failure, list[tuple]]:
    """In an explainer process: the answers (or the Failure) and the metrics they added."""
    assert _EXPLAINER is not None, "explainer process not started"
    recorded = RecordedMetrics()
    try:
        return _EXPLAINER.explain(req, recorded), recorded.calls
    except Exception as e:
        return _EXPLAINER.failure(e, recorded), recorded.calls


class PrometheusMetrics:
    """The core's metrics as prometheus_client series on the server's /metrics: the names and labels
    TorchServe's metrics API gives them (serve/metrics.yaml), so one dashboard reads both servers."""

    series: ClassVar[dict[str, Counter | Histogram]] = {}  # one per name in the process's registry

    def __init__(self, model: str) -> None:
        self.model = model

    def add(self, name: str, value: float, unit: str, histogram: bool = False, **dimensions: str) -> None:
        labels = {**dimensions, "ModelName": self.model, "Level": "Model"}
        if name not in self.series:
            doc, names = f"{name} ({unit})", list(labels)
            if not histogram:
                self.series[name] = Counter(name, doc, labelnames=names)
            else:  # images per request: powers of two up to the limit; seconds: prometheus_client's defaults
                buckets = (1, 2, 4, 8, 16, 32, 64, float("inf")) if unit == "count" else Histogram.DEFAULT_BUCKETS
                self.series[name] = Histogram(name, doc, labelnames=names, buckets=buckets)
        series = self.series[name].labels(**labels)
        if isinstance(series, Histogram):
            series.observe(value)
        else:
            series.inc(value)


class ClassifierModel(kserve.Model):
    def __init__(
        self, name: str, bundle: Path, model_config: dict[str, Any], version: str = "1",
        explain_config: dict[str, Any] | None = None, slim: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(name)
        self.bundle, self.model_config, self.version, self.slim = bundle, model_config, version, slim
        self.explain_config = explain_config or {}
        self.metrics = PrometheusMetrics(name)
        self.explain_metrics = PrometheusMetrics(explain_name(name))  # labelled as TorchServe's registration is
        self.explainers: ProcessPoolExecutor | None = None
        self.explain_workers = max(1, int(self.explain_config.get("minWorkers", 1)))
        self.explain_limits = Limits.from_model_config(self.explain_config or model_config)
        self.admission = Admission(self.explain_workers, self.explain_limits.max_explanations_waiting)
        self.core: ServingCore | None = None
        self.batcher: Batcher | None = None
        self.decoders: ThreadPoolExecutor | None = None
        # the two queues apart: requests admitted and not yet answered, by endpoint; explanations refused when full
        self.in_flight = Gauge("ExplanationsInFlight", "explanations admitted (running or waiting)", ["ModelName"])
        self.refused = Counter("ExplanationsRefused", "explanations answered 503: the queue was full", ["ModelName"])
        self.explainer_restarts = Counter("ExplainerRestarts", "explainer pools started again after a process died",
                                          ["ModelName"])  # fmt: skip

    def load(self) -> bool:
        device = "cpu" if self.slim else _device()
        self.core = ServingCore(self.bundle, device, self.model_config, self.name, self.version, slim=self.slim)
        self.core.warm_up()
        # decoding on the cores the model leaves (at least one thread), predictions on the batcher's inference thread
        self.decoders = ThreadPoolExecutor(max(1, worker_threads(1) - self.core.threads), "decode")
        # TorchServe's batching keys, from the same model config: one config sizes both servers
        self.batcher = Batcher(self.core, self.metrics, int(self.model_config.get("batchSize", 1)),
                               float(self.model_config.get("maxBatchDelay", 0)) / 1000)  # fmt: skip
        # explanation requests are decoded here, to the size the model and the overlay need, before they travel
        self.explain_limits = replace(self.explain_limits, decode_side=self.core.limits.decode_side)
        if not self.slim:  # the slim predictor explains nothing: the full image does (core.NO_EXPLANATIONS)
            self.explainers = self._start_explainers()
        self.ready = True  # loaded and answered a prediction; healthy() also wants an explainer up
        return self.ready

    def _start_explainers(self) -> ProcessPoolExecutor:
        """Explainer processes, started fresh (spawn: torch's thread pools do not survive a fork), each loading the
        bundle with the explanation config's threads; returns once every one has started."""
        context = multiprocessing.get_context("spawn")
        initargs = (self.bundle, self.explain_config or self.model_config, self.name, self.version)
        pool = ProcessPoolExecutor(self.explain_workers, context, _start_explainer, initargs)
        for f in [pool.submit(time.sleep, 0) for _ in range(self.explain_workers)]:
            f.result()
        return pool

    async def healthy(self) -> bool:
        """Ready (KServe's readiness routes ask this): the model loaded and the explainers up. While a dead
        explainer is being replaced the pod says not ready; predictions on this server's own routes go on."""
        return self.ready and (self.slim or (self.explainers is not None and not _broken(self.explainers)))

    async def watch_explainers(self, every: float = 1.0) -> None:
        """Replaces the explainer pool once a process of it dies (an OOM kill, a crash): ProcessPoolExecutor marks
        itself broken for good then, and every later explanation would fail. Runs on the server's event loop."""
        while True:
            await asyncio.sleep(every)
            if self.explainers is not None and _broken(self.explainers):
                log.warning("an explainer process ended; starting the explainers again")
                old, self.explainers = self.explainers, None
                old.shutdown(wait=False, cancel_futures=True)
                self.explainers = await asyncio.get_running_loop().run_in_executor(None, self._start_explainers)
                self.explainer_restarts.labels(explain_name(self.name)).inc()
                log.info("explainers started again")

    def get_input_types(self) -> list[dict[str, Any]]:
        return ServingCore.v2_tensors()[0]

    def get_output_types(self) -> list[dict[str, Any]]:
        return ServingCore.v2_tensors()[1]

    # --- predictions: v2 (InferRequest), v1 and the project's own API (a request row) -------------------------------
    async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):
            req = await self._decode(parse_v2, _v2_body(payload), self._core.limits)
            answers = await self._predict(req, "predictions")
            return InferResponse.from_rest(self._core.v2_answer(req, answers))
        req = await self._decode(parse_request, {"body": payload}, _options(headers), self._core.limits)
        return {"predictions": await self._predict(req, "predictions")}

    async def predict_v2(self, body: bytes, headers: dict[str, str]) -> ORJSONResponse:
        """POST /v2/models/<name>/infer over REST: the JSON read with or without a Content-Type, the binary tensor
        data extension where its header says so, the id echoed only when given (KServe's own route refuses a
        request without id with a 500, and reads a JSON body sent with no Content-Type as binary)."""
        try:
            request = v2_body({"body": body}, headers)
        except BadInput as e:
            raise ServingError(self._core.failure(e, self.metrics)) from None
        if request is None:
            failure = self._core.failure(BadInput(f"not an inference request: {V2_EXAMPLE}"), self.metrics)
            raise ServingError(failure)
        req = await self._decode(parse_v2, request, self._core.limits)
        answers = await self._predict(req, "predictions")
        return ORJSONResponse(self._core.v2_answer(req, answers))

    async def predict_native(self, row: dict[str, Any], headers: dict[str, str]) -> ORJSONResponse:
        """POST /predictions/<name>: TorchServe's answer, one object per image or a list for several, and the
        out-of-distribution headers."""
        req = await self._decode(parse_request, row, headers, self._core.limits)
        answers = await self._predict(req, "predictions", native=True)
        return ORJSONResponse(answers if req.many else answers[0], headers=self._core.ood_headers(req))

    async def _predict(self, req: Request, endpoint: str, native: bool = False) -> list[dict[str, float]]:
        self._check(req, endpoint, native)
        # Batched with the requests arriving meanwhile, on the inference thread: the event loop only moves bytes
        answer = await asyncio.wrap_future(self._batcher.submit(req))
        if isinstance(answer, Failure):
            raise ServingError(answer, native)
        return answer

    # --- explanations: v1 :explain and the project's own /explanations --------------------------------------------
    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return await self.explain_native({"body": payload}, _options(headers))

    async def explain_native(self, row: dict[str, Any], headers: dict[str, str], native: bool = False) -> Any:
        if self.slim:
            failure = self._core.failure(BadInput(NO_EXPLANATIONS, 404, "no_explanations"), self.metrics)
            raise ServingError(failure, native)
        req = parse_request(row, headers, self.explain_limits, explain=True)
        self._check(req, "explanations", native, self.explain_metrics)
        refusal = self.admission.refusal()
        if refusal is not None:  # back-pressure: answered now, never queued behind the others
            self.refused.labels(explain_name(self.name)).inc()
            raise ServingError(refusal, native)
        gone = Failure(503, "the explainer process ended (out of memory?) and is being started again; retry in a "
                            "few seconds", retry_after=RESTART_SECONDS)  # fmt: skip
        if self.explainers is None or _broken(self.explainers):
            raise ServingError(gone, native)
        with self.admission.admit(), self.in_flight.labels(explain_name(self.name)).track_inprogress():
            try:
                answers, calls = await asyncio.get_running_loop().run_in_executor(self.explainers, _explain, req)
            except BrokenProcessPool:  # its process died under it: watch_explainers starts new ones
                raise ServingError(gone, native) from None
        for name, value, unit, histogram, dims in calls:
            self.explain_metrics.add(name, value, unit, histogram, **dims)
        if isinstance(answers, Failure):
            raise ServingError(answers, native)
        return answers if req.many else answers[0]

    def _check(self, req: Request, endpoint: str, native: bool, metrics: Metrics | None = None) -> None:
        metrics = metrics or self.metrics
        if req.error is not None:
            raise ServingError(self._core.failure(req.error, metrics), native)
        metrics.add("ImagesPerRequest", len(req.images), "count", histogram=True, Endpoint=endpoint)

    @property
    def _core(self) -> ServingCore:
        if self.core is None:
            raise RuntimeError("the model is not loaded")
        return self.core

    async def _decode(self, parse: Callable[..., Request], *args: Any) -> Request:
        """A request parsed and its images decoded on the decoding threads (Pillow lets go of the GIL while it
        decodes): the event loop only moves bytes."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, functools.partial(parse, *args))

    @property
    def _batcher(self) -> Batcher:
        if self.batcher is None:
            raise RuntimeError("the model is not loaded")
        return self.batcher


def _v2_body(r: InferRequest) -> dict[str, Any]:
    """A decoded InferRequest as the JSON the protocol sends over REST; gRPC's raw bytes stay bytes."""
    inputs = []
    for t in r.inputs:
        data = [bytes(b) for b in t.as_numpy().ravel()] if r.from_grpc and t.datatype == "BYTES" else t.data
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": data})
    params = r.parameters
    if params is not None and not isinstance(params, dict):  # gRPC's InferParameter map
        params = to_http_parameters(params)
    return {"id": r.id, "inputs": inputs, "parameters": params or {}}


def _options(headers: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (headers or {}).items() if k.lower().startswith("x-")}


# --- the app around the model: the project's own routes, errors as each API answers them, a request size limit ---
def add_routes(model: ClassifierModel) -> None:
    # ORJSONResponse directly: FastAPI would otherwise walk the answer with jsonable_encoder first
    async def predictions(request: HTTPRequest) -> Any:
        return await model.predict_native(await _row(request), dict(request.headers))

    async def explanations(request: HTTPRequest) -> Any:
        return ORJSONResponse(await model.explain_native(await _row(request), dict(request.headers), native=True))

    async def v2_infer(request: HTTPRequest) -> Any:
        return await model.predict_v2(await request.body(), dict(request.headers))

    async def describe(request: HTTPRequest) -> Any:  # what TorchServe's customized describe answers
        assert model.core is not None  # routes are added once the model is loaded
        return ORJSONResponse(model.core.describe())

    # POST, and PUT as curl -T sends (TorchServe takes both)
    app.add_api_route(f"/predictions/{model.name}", predictions, methods=["POST", "PUT"])
    # before KServe's own routes are added (start()), so this one answers the model's v2 REST infer
    app.add_api_route(f"/v2/models/{model.name}/infer", v2_infer, methods=["POST"])
    app.add_api_route(f"/explanations/{model.name}", explanations, methods=["POST", "PUT"])
    app.add_api_route(f"/models/{model.name}", describe, methods=["GET"])
    # TorchServe serves explanations under a model name of their own; the same path here, for the same clients
    app.add_api_route(f"/explanations/{explain_name(model.name)}", explanations, methods=["POST", "PUT"])

    @app.exception_handler(ServingError)
    async def serving_error(_: HTTPRequest, e: ServingError) -> JSONResponse:
        retry = e.failure.retry_after
        headers = {"Retry-After": str(retry)} if retry is not None else None
        body = e.failure.native() if e.native else e.failure.v2()
        return JSONResponse(body, status_code=e.failure.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        return JSONResponse({"error": f"not an inference request ({where})"}, status_code=400)

    @app.exception_handler(InvalidInput)
    async def invalid_input(_: HTTPRequest, e: InvalidInput) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)


REPOSITORY_KEY_ENV = "VISIONAPP_REPOSITORY_KEY"  # the key that --enable-repository-verbs requires
_KEY_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("repository_key_checked", default=False)


class Guard:
    """What is refused before a route runs, as a plain ASGI middleware (Starlette's BaseHTTPMiddleware costs each
    request a task and a stream copy):

    - bodies too big (413) or of unknown length (411), from the headers, before they are read;
    - a body not received within `body_timeout` seconds of the request's start (408; a client that sends half a
      body and stalls would otherwise hold its connection and buffer for good): the body is read here, then
      handed to the route;
    - KServe's model-repository verbs (/v2/repository/...: load, unload): 404 unless `repository_key` is set,
      then 401 without `Authorization: Bearer <key>`.
    """

    def __init__(self, app: Any, body_timeout: float = 30.0, repository_key: str | None = None) -> None:
        self.app, self.body_timeout, self.repository_key = app, body_timeout, repository_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is None and scope["method"] in ("POST", "PUT"):
            try:
                receive = await self._read_body(receive)
            except asyncio.TimeoutError:  # TimeoutError's own class before 3.11
                message = f"the request body did not arrive within {self.body_timeout:g} s; send it whole"
                refusal = JSONResponse({"error": message}, status_code=408, headers={"Connection": "close"})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = _KEY_CHECKED.set(scope["path"].startswith("/v2/repository/"))  # only this request's own task
        try:
            await self.app(scope, receive, send)
        finally:
            _KEY_CHECKED.reset(token)

    def _refusal(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> JSONResponse | None:
        if scope["path"].startswith("/v2/repository/"):
            if self.repository_key is None:
                return JSONResponse({"error": "the model-repository verbs (load, unload) are off on this server "
                                              "(--enable-repository-verbs turns them on, behind a key)"},
                                    status_code=404)  # fmt: skip
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.repository_key}".encode()):
                return JSONResponse({"error": f"send Authorization: Bearer <the key in {REPOSITORY_KEY_ENV}>"},
                                    status_code=401)  # fmt: skip
        if scope["method"] in ("POST", "PUT"):
            length = headers.get(b"content-length")
            if length is None:
                return JSONResponse({"error": "send a Content-Length (no chunked uploads)"}, status_code=411)
            if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
                message = f"request body over {MAX_REQUEST_BYTES} bytes; send smaller images"
                return JSONResponse({"error": message}, status_code=413)
        return None

    async def _read_body(self, receive: Any) -> Any:
        """The whole body within the deadline (TimeoutError otherwise), then a `receive` that replays it."""
        chunks: list[bytes] = []

        async def collect() -> None:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away: the route sees it as it would
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        await asyncio.wait_for(collect(), self.body_timeout)
        body, sent = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()  # after the body: a disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


class GuardedRepository(ModelRepositoryExtension):
    """KServe's model-repository extension (load and unload, over REST and gRPC) refused unless the REST request
    passed the Guard's key check; gRPC carries no key, so there it is always refused."""

    async def load(self, model_name: str) -> None:
        self._check()
        await super().load(model_name)

    async def unload(self, model_name: str) -> None:
        self._check()
        await super().unload(model_name)

    @staticmethod
    def _check() -> None:
        if not _KEY_CHECKED.get():
            raise InvalidInput("the model-repository verbs are off over gRPC; over REST with "
                               "--enable-repository-verbs and its key")  # fmt: skip


async def _row(request: HTTPRequest) -> dict[str, Any]:
    """The request as a TorchServe row: multipart fields by name, a JSON body decoded, else the raw bytes."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        return {k: (await v.read()) if hasattr(v, "read") else v for k, v in form.multi_items()}
    body = await request.body()
    if ctype.startswith("application/json"):
        try:
            return {"body": parse_json(body)}
        except BadInput as e:
            raise ServingError(Failure(e.status, str(e)), native=True) from None
    return {"body": body}


class ModelServerOn(kserve.ModelServer):
    """KServe's ModelServer on the address given (upstream's REST server binds every interface, what a pod needs;
    make serve binds loopback, as it does TorchServe), with the model-repository verbs guarded (GuardedRepository)
    and the explainers watched."""

    def __init__(self, host: str, model: ClassifierModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host, self.model = host, model
        self.model_repository_extension = GuardedRepository(model_registry=self.registered_models)

    async def _serve(self) -> None:
        if self._rest_server is not None:  # created by start(), not yet listening: the address it will bind
            self._rest_server.config.host = self.host
        watcher = asyncio.create_task(self.model.watch_explainers())
        try:
            await super()._serve()
        finally:
            watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(parents=[kserve.model_server.parser], description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a run's bundle folder (runs/<run>/bundle)")
    ap.add_argument("--model-config", type=Path, default=None, help="serve/model-config.yaml: its handler limits")
    ap.add_argument(
        "--explain-config",
        type=Path,
        default=None,
        help="serve/explain-config.yaml: the explainers (minWorkers, handler limits with maxExplanationsWaiting)",
    )
    ap.add_argument("--slim", action="store_true",
                    help="predictions from the bundle's ONNX form on ONNX Runtime, without torch (the slim image); "
                         "explanations are answered 404, naming where they are served")  # fmt: skip
    ap.add_argument("--model-version", default=None, help="the version metadata names (default: the run's name)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    ap.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request's body may take to arrive; 408 after (slow or stalled clients)",
    )
    verbs = f"KServe's /v2/repository load and unload over REST, for 'Authorization: Bearer ${REPOSITORY_KEY_ENV}'"
    ap.add_argument("--enable-repository-verbs", action="store_true", help=f"serve {verbs} (off by default)")
    args = ap.parse_args(argv)
    if args.workers != 1:  # uvicorn's worker processes would each need the model and explainers: refused, not half-run
        ap.error(f"--workers {args.workers}: this server runs one process (its explainers apart); scale with "
                 "replicas (make k8s REPLICAS=...) or more cores per pod")  # fmt: skip
    repository_key = None
    if args.enable_repository_verbs:
        repository_key = os.environ.get(REPOSITORY_KEY_ENV, "")
        if len(repository_key) < 16:
            ap.error(f"--enable-repository-verbs needs a key of 16 characters or more in {REPOSITORY_KEY_ENV}")
    # the serving core's log lines (the model loaded, its warm-up) beside KServe's own, which do not propagate
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = yaml.safe_load(args.model_config.read_text()) if args.model_config else {}
    version = args.model_version or args.bundle.resolve().parent.name
    explain_config = yaml.safe_load(args.explain_config.read_text()) if args.explain_config else None
    model = ClassifierModel(args.model_name, args.bundle, config or {}, version, explain_config, slim=args.slim)
    model.load()
    add_routes(model)
    app.add_middleware(Guard, body_timeout=args.body_timeout, repository_key=repository_key)
    server = ModelServerOn(args.host, model, http_port=args.http_port, grpc_port=args.grpc_port,
                           enable_grpc=args.enable_grpc)  # fmt: skip
    server.register_model(model, explain_name(model.name))  # KServe's v1 :explain under the explanations' name too
    server.start([model])


if __name__ == "__main__":
    main()
