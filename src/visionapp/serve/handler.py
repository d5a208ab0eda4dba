"""TorchServe handler for a visionapp bundle: a thin adapter over the serving core (visionapp.serve.core).

Packed into the .mar by `make archive` together with the bundle (model.pt, model.json) and the visionapp
package code it imports (the base, visionapp.attribution, visionapp.serve), so it runs in a TorchServe
environment that has torch, torchvision, Pillow and captum but not this project.

Inputs, per request: a raw image body (`curl -T photo.jpg`), a multipart form with one or more files,
or JSON `{"data": "<base64>"}` / `{"images": ["<base64>", ...]}`. Options (X-Topk/X-Target/X-Method
headers, form fields or JSON keys): `topk`; for /explanations also `target` (a class name) and `method`.
`POST /v2/models/<model>/infer` (TorchServe's frontend routes it here too) takes an Open Inference Protocol
request and is answered in kind (visionapp.serve.core).

TorchServe batches /predictions and /explanations requests together; each request is answered by its own
kind (the frontend marks explanations per request), the predictions of a batch in one forward pass. Each
request is answered on its own: a bad input gets a 4xx JSON error naming the problem, a fault a 500 JSON
(its traceback in the worker log), and the rest of the batch is answered normally. Work per request is
bounded by `Limits` (serve/model-config.yaml's `handler:` section). The metrics go through TorchServe's
metrics API (declared in serve/metrics.yaml, scraped from the metrics port's /metrics in Prometheus mode).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from visionapp.serve.core import Admission, Failure, ServingCore
from visionapp.serve.inputs import BadInput, Request, explain_name, parse_request, parse_v2, v2_body

log = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    class Metrics:
        """The core's metrics through TorchServe's metrics API (serve/metrics.yaml declares them; TorchServe adds
        the ModelName and Level dimensions). Nested: TorchServe wants one class in the handler module."""

        def __init__(self, context: Any) -> None:
            self.context = context

        def add(self, name: str, value: float, unit: str, histogram: bool = False, **dimensions: str) -> None:
            dims = [Dimension(k, v) for k, v in dimensions.items()]
            kind = MetricTypes.HISTOGRAM if histogram else MetricTypes.COUNTER
            self.context.metrics.add_metric(name, value, unit, None, dims, kind)

    def initialize(self, context) -> None:
        props = context.system_properties
        gpu = props.get("gpu_id")
        device = f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu"
        model_config = getattr(context, "model_yaml_config", None) or {}
        name, version = context.manifest["model"]["modelName"], context.manifest["model"].get("modelVersion", "1")
        self.core = ServingCore(props["model_dir"], device, model_config, name, version)
        self.core.warm_up()  # TorchServe marks the worker READY only once this returns
        # Explanations have a registration of their own (<name>-explain: own workers and queue, make archive);
        # this one, the predictions', points explanation requests there.
        self.explains = name.endswith(explain_name(""))
        # The explanations' registration talks to TorchServe asynchronously (asyncCommunication in
        # serve/explain-config.yaml): the frontend hands each request over as it arrives, so the admission here
        # answers a full queue at once with Retry-After, and explanations run one at a time on a thread of their own.
        self.admission: Admission | None = None
        if model_config.get("asyncCommunication"):
            workers = max(1, int(model_config.get("minWorkers", 1)))  # the queue is shared out between the workers
            self.admission = Admission(1, math.ceil(self.core.limits.max_explanations_waiting / workers))
            self.explainer = ThreadPoolExecutor(1, thread_name_prefix="explain")
        self.initialized = True

    def handle(self, data: list[dict], context) -> Any:
        if self.admission is not None:
            return self._handle_admitted(data, context)  # a coroutine: TorchServe's async worker awaits it
        return self._handle(data, context)

    async def _handle_admitted(self, data: list[dict], context) -> list[Any]:
        assert self.admission is not None
        refusal = self.admission.refusal()
        if refusal is not None:  # back-pressure: answered now, never queued behind the others
            self.Metrics(context).add("ExplanationsRefused", len(data), "count")
            for idx in range(len(data)):
                context.set_response_header(idx, "Retry-After", str(refusal.retry_after))
            return [self._answer_failure(context, idx, refusal, _looks_v2(row)) for idx, row in enumerate(data)]
        with self.admission.admit():
            return await asyncio.get_running_loop().run_in_executor(self.explainer, self._handle, data, context)

    def _handle(self, data: list[dict], context) -> list[Any]:
        """One answer per request of the batch, each of its own kind, each failing alone."""
        start = time.time()
        metrics = self.Metrics(context)
        if context.get_request_header(0, "describe") == "True":  # the management API's customized describe
            return [json.dumps(self.core.describe())]
        out: list[Any] = [None] * len(data)
        predictions: list[tuple[int, Request, bool]] = []
        explanations: list[tuple[int, Request]] = []
        for idx, row in enumerate(data):
            explain_it = context.get_request_header(idx, "explain") == "True"
            if explain_it and not self.explains:
                out[idx] = self._moved(context, idx)
                continue
            v2 = False
            try:  # everything about one request inside: whatever it holds fails it alone, never its batch
                req, v2 = self._parse(row, context.get_all_request_header(idx), explain_it)
                if req.error is not None:
                    raise req.error
                metrics.add("ImagesPerRequest", len(req.images), "count", histogram=True,
                            Endpoint="explanations" if explain_it else "predictions")  # fmt: skip
                if explain_it:
                    explanations.append((idx, req))
                else:
                    predictions.append((idx, req, v2))
            except Exception as e:
                out[idx] = self._answer_failure(context, idx, self.core.failure(e, metrics), v2)
        if predictions and explanations:
            log.info("mixed batch: %d predictions, %d explanations", len(predictions), len(explanations))
        answers = self.core.predict([req for _, req, _ in predictions], metrics)
        for (idx, req, v2), answer in zip(predictions, answers, strict=True):
            if isinstance(answer, Failure):
                out[idx] = self._answer_failure(context, idx, answer, v2)
            else:
                out[idx] = self.core.v2_answer(req, answer) if v2 else answer if req.many else answer[0]
                for header, value in ({} if v2 else self.core.ood_headers(req)).items():
                    context.set_response_header(idx, header, value)
        for idx, req in explanations:
            try:
                explained = self.core.explain(req, metrics)
                out[idx] = explained if req.many else explained[0]
            except Exception as e:
                out[idx] = self._answer_failure(context, idx, self.core.failure(e, metrics), v2=False)
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return out

    def _parse(self, row: dict[str, Any], headers: dict[str, Any], explain_it: bool) -> tuple[Request, bool]:
        """One request of the batch, and whether to answer it in the Open Inference Protocol's shape; what cannot be
        used is in the request's `error`."""
        try:
            v2_request = v2_body(row, headers)
        except BadInput as e:  # a body that looks like JSON and cannot be read
            return Request(error=e), False
        if v2_request is None:
            return parse_request(row, headers, self.core.limits, explain_it), False
        if explain_it:
            where = f"/explanations/{self.core.name}"
            return Request(
                error=BadInput(f"the Open Inference Protocol has no explain verb here; POST the image to {where}")
            ), True
        return parse_v2(v2_request, self.core.limits), True

    def _moved(self, context: Any, idx: int) -> dict[str, Any]:
        """308 to the explanations' own registration: a client that follows redirects gets there, any other reads
        where explanations are now."""
        path = f"/explanations/{explain_name(self.core.name)}"
        message = f"explanations are served at POST {path}, on workers of their own"
        context.set_response_status(code=308, phrase="Permanent Redirect", idx=idx)
        context.set_response_header(idx, "Location", path)
        return {"code": 308, "type": "Moved", "message": message}

    @staticmethod
    def _answer_failure(context: Any, idx: int, failure: Failure, v2: bool) -> dict[str, Any]:
        context.set_response_status(code=failure.status, phrase=failure.phrase, idx=idx)
        return failure.v2() if v2 else failure.native()


def _looks_v2(row: dict[str, Any]) -> bool:
    """Whether a request is to be answered in the Open Inference Protocol's error shape (its body unread)."""
    try:
        return v2_body(row) is not None
    except BadInput:
        return False
