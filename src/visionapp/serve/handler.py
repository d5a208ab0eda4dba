"""TorchServe handler for a visionapp bundle: batched top-k predictions and Captum explanations.

Packed into the .mar by `make archive` together with the bundle (model.pt, model.json) and the
visionapp package code it imports (the base, visionapp.explain, visionapp.serve), so it runs in a TorchServe
environment that has torch, torchvision, Pillow and captum but not this project.

Inputs, per request: a raw image body (`curl -T photo.jpg`), a multipart form with one or more files,
or JSON `{"data": "<base64>"}` / `{"images": ["<base64>", ...]}`. Options (X-Topk/X-Target/X-Method
headers, form fields or JSON keys): `topk`; for /explanations also `target` (a class name) and `method`.

TorchServe batches /predictions and /explanations requests together; each request is answered by its own
kind (the frontend marks explanations per request), the predictions of a batch in one forward pass. Each
request is answered on its own: a bad input gets a 4xx JSON error naming the problem, a fault a 500 JSON
(its traceback in the worker log), and the rest of the batch is answered normally. Work per request is
bounded by `Limits` (serve/model-config.yaml's `handler:` section).

Metrics, through TorchServe's metrics API (declared in serve/metrics.yaml, scraped from the metrics port's
/metrics in Prometheus mode): ImagesPerRequest{Endpoint} (histogram), Predictions{Class} (top-1 class of each
predicted image), ExplanationSeconds{Method} (histogram, per explained image), BadInputs{Kind} (4xx answers).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import torch
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from visionapp.attribution.maps import explain, overlay_png
from visionapp.attribution.methods import METHODS
from visionapp.bundle import load_bundle
from visionapp.serve.inputs import (
    MAX_PIXELS,
    BadInput,
    Limits,
    Request,
    parse_request,
    shown,
    status_phrase,
    worker_threads,
)

log = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context) -> None:
        props = context.system_properties
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        model_config = getattr(context, "model_yaml_config", None) or {}
        threads = ""
        if self.device.type == "cpu":
            # Share the cores between this model's workers instead of each worker taking all of them.
            torch.set_num_threads(worker_threads(int(model_config.get("minWorkers", 1))))
            threads = f", torch threads: {torch.get_num_threads()}"
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        self.limits = Limits.from_model_config(model_config)
        # Predictions run the compiled model (make export) where it fits this worker's device, torch and CPU;
        # explanations always run the eager one (Captum needs its gradients).
        self.bundle = load_bundle(props["model_dir"], map_location=self.device, compiled="auto")
        self.bundle.model.to(self.device)
        self.model = self.bundle.model
        self.class_names = self.bundle.class_names
        self.initialized = True
        log.info(
            "loaded %s with classes %s on %s%s; predictions: %s; %s", self.bundle.meta["arch"], self.class_names,
            self.device, threads, self.bundle.compiled_note, self.limits,
        )  # fmt: skip

    def handle(self, data: list[dict], context) -> list[Any]:
        """One answer per request of the batch, each of its own kind, each failing alone."""
        start = time.time()
        self.context = context
        if context.get_request_header(0, "describe") == "True":  # the management API's customized describe
            return [self.describe_handle()]
        out: list[Any] = [None] * len(data)
        predictions: list[tuple[int, Request]] = []
        explanations: list[tuple[int, Request]] = []
        for idx, row in enumerate(data):
            explain_it = context.get_request_header(idx, "explain") == "True"
            try:
                req = parse_request(row, context.get_all_request_header(idx), self.limits, explain=explain_it)
                if req.error is not None:
                    raise req.error
                self._metric("ImagesPerRequest", len(req.images), "count", MetricTypes.HISTOGRAM,
                             Endpoint="explanations" if explain_it else "predictions")  # fmt: skip
                (explanations if explain_it else predictions).append((idx, req))
            except Exception as e:
                out[idx] = self._failure(idx, e)
        if predictions and explanations:
            log.info("mixed batch: %d predictions, %d explanations", len(predictions), len(explanations))
        self._predict(predictions, out)
        for idx, req in explanations:
            try:
                answers = self._explain(req)
                out[idx] = answers if req.many else answers[0]
            except Exception as e:
                out[idx] = self._failure(idx, e)
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return out

    # --- predictions: every prediction request of the batch in one forward pass --------------------------------
    def _predict(self, requests: list[tuple[int, Request]], out: list[Any]) -> None:
        ready: list[tuple[int, Request, int]] = []
        tensors: list[torch.Tensor] = []
        for idx, req in requests:
            try:
                k = self._topk(req)
                for img in req.images:
                    req.rows.append(len(tensors))
                    tensors.append(self.bundle.transform(img))
                ready.append((idx, req, k))
            except Exception as e:
                out[idx] = self._failure(idx, e)
        if not tensors:
            return
        try:
            with torch.inference_mode():
                probs = self.bundle.probabilities(torch.stack(tensors).to(self.device)).cpu()  # calibrated
        except Exception as e:  # the forward itself failed: every request in it gets the fault
            for idx, _, _ in ready:
                out[idx] = self._failure(idx, e)
            return
        for idx, req, k in ready:
            answers = []
            for row in req.rows:
                p, i = probs[row].topk(k)
                self._metric("Predictions", 1, "count", MetricTypes.COUNTER, Class=self.class_names[int(i[0])])
                answers.append({self.class_names[c]: round(float(v), 6) for v, c in zip(p, i, strict=True)})
            out[idx] = answers if req.many else answers[0]

    # --- explanations: POST /explanations/<model> -------------------------------------------------------------
    def _explain(self, req: Request) -> list[dict[str, Any]]:
        method = req.options.get("method", "integrated_gradients")
        if method not in METHODS:
            raise BadInput(f"unknown method {shown(method)}; choose one of {', '.join(METHODS)}", kind="bad_option")
        target = req.options.get("target")
        if target is not None and target not in self.class_names:
            names = ", ".join(self.class_names[:20]) + (", ..." if len(self.class_names) > 20 else "")
            raise BadInput(
                f"unknown class {shown(target)} in target; this model's classes are: {names}", kind="bad_option"
            )
        answers = []
        for img in req.images:
            # Attributions at the model's input size whatever the image's; the overlay is drawn at a bounded size.
            start = time.perf_counter()
            ex = explain(
                self.bundle, img, method, target=target, device=self.device, max_pixels=self.limits.max_heatmap_pixels
            )
            self._metric("ExplanationSeconds", time.perf_counter() - start, "s", MetricTypes.HISTOGRAM, Method=method)
            answers.append(
                {
                    "class": ex.target,
                    "probability": round(ex.target_probability, 6),
                    "predicted": ex.predicted,
                    "predicted_probability": round(ex.probability, 6),
                    "method": method,
                    "heatmap_png_base64": base64.b64encode(overlay_png(ex.image, ex.attr_map)).decode("ascii"),
                    "heatmap_size": list(ex.image.size),  # width, height: at most maxHeatmapPixels
                }
            )
        return answers

    # --- helpers ------------------------------------------------------------------------------------------------
    def _topk(self, req: Request) -> int:
        n = len(self.class_names)
        raw = req.options.get("topk", str(min(5, n)))
        try:
            k = int(raw)
        except ValueError:
            raise BadInput(f"topk must be an integer, got {shown(raw)}", kind="bad_option") from None
        if not 1 <= k <= n:
            raise BadInput(f"topk must be between 1 and {n} (the number of classes), got {k}", kind="bad_option")
        return k

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes, **dimensions: str) -> None:
        """Add to one of serve/metrics.yaml's model metrics; TorchServe adds the ModelName and Level dimensions."""
        dims = [Dimension(k, v) for k, v in dimensions.items()]
        self.context.metrics.add_metric(name, value, unit, None, dims, kind)

    def _failure(self, idx: int, e: Exception) -> dict[str, Any]:
        """This request's error answer: 4xx naming the problem for input we cannot use, 500 for a fault."""
        if isinstance(e, BadInput):
            self._metric("BadInputs", 1, "count", MetricTypes.COUNTER, Kind=e.kind)
            self.context.set_response_status(code=e.status, phrase=status_phrase(str(e)), idx=idx)
            return {"code": e.status, "type": "BadInput", "message": str(e)}
        log.exception("request %d of the batch failed; the others are answered", idx)
        message = f"internal error ({type(e).__name__}); the traceback is in the worker log (model_log.log)"
        self.context.set_response_status(code=500, phrase=message, idx=idx)
        return {"code": 500, "type": "InternalServerError", "message": message}
