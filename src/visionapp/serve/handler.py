"""TorchServe handler for a visionapp bundle: batched top-k predictions and Captum explanations.

Packed into the .mar by `make archive` together with the bundle (model.pt, model.json) and the
visionapp package code it imports (the base, visionapp.explain, visionapp.serve), so it runs in a TorchServe
environment that has torch, torchvision, Pillow and captum but not this project.

Inputs, per request: a raw image body (`curl -T photo.jpg`), a multipart form with one or more files,
or JSON `{"data": "<base64>"}` / `{"images": ["<base64>", ...]}`. Options (X-Topk/X-Target/X-Method
headers, form fields or JSON keys): `topk`; for /explanations also `target` (a class name) and `method`.
A bad input gets a 4xx JSON error naming the problem; the worker carries on.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from visionapp.bundle import load_bundle
from visionapp.explain.attribution import explain, overlay_png, target_index
from visionapp.explain.methods import check_method
from visionapp.serve.inputs import MAX_PIXELS, BadInput, Request, parse_request, worker_threads

log = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context) -> None:
        props = context.system_properties
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        threads = ""
        if self.device.type == "cpu":
            # Share the cores between this model's workers instead of each worker taking all of them.
            workers = int((getattr(context, "model_yaml_config", None) or {}).get("minWorkers", 1))
            torch.set_num_threads(worker_threads(workers))
            threads = f", torch threads: {torch.get_num_threads()}"
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        self.bundle = load_bundle(props["model_dir"], map_location=self.device)
        self.bundle.model.to(self.device)
        self.model = self.bundle.model
        self.class_names = self.bundle.class_names
        self.initialized = True
        log.info("loaded %s with classes %s on %s%s", self.bundle.meta["arch"], self.class_names, self.device, threads)

    # --- inference: preprocess → inference → postprocess, batched across requests ---------------------------
    def preprocess(self, data: list[dict]) -> torch.Tensor:
        self.requests = [parse_request(row, self.context.get_all_request_header(i)) for i, row in enumerate(data)]
        if self._is_explain():  # explain() transforms each image itself, on the way to its heatmap
            return torch.empty(0)
        tensors: list[torch.Tensor] = []
        for req in self.requests:
            for img in req.images:
                req.rows.append(len(tensors))
                tensors.append(self.bundle.transform(img))
        if not tensors:
            return torch.empty(0)
        return torch.stack(tensors).to(self.device)

    def inference(self, data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if data.numel() == 0:
            return data
        with torch.inference_mode():
            return self.model(data).softmax(dim=1).cpu()

    def postprocess(self, data: torch.Tensor) -> list[Any]:
        def top_k(req: Request) -> list[dict[str, float]]:
            k = self._topk(req)
            answers = []
            for row in req.rows:
                p, i = data[row].topk(k)
                answers.append({self.class_names[c]: round(float(v), 6) for v, c in zip(p, i, strict=True)})
            return answers

        return self._answer(top_k)

    # --- explanations: POST /explanations/<model> -------------------------------------------------------------
    def explain_handle(self, data_preprocess: torch.Tensor, raw_data: list[dict]) -> list[Any]:
        return self._answer(self._explain)

    def _explain(self, req: Request) -> list[dict[str, Any]]:
        method = req.options.get("method", "integrated_gradients")
        try:
            check_method(method)
        except ValueError as e:
            raise BadInput(str(e)) from None
        target = req.options.get("target")
        if target is not None:
            try:
                target_index(self.class_names, target)
            except ValueError as e:
                raise BadInput(str(e)) from None
        answers = []
        for img in req.images:
            ex = explain(self.bundle, img, method, target=target, device=self.device)
            answers.append(
                {
                    "class": ex.target,
                    "probability": round(ex.target_probability, 6),
                    "predicted": ex.predicted,
                    "predicted_probability": round(ex.probability, 6),
                    "method": method,
                    "heatmap_png_base64": base64.b64encode(overlay_png(img, ex.attr_map)).decode("ascii"),
                }
            )
        return answers

    # --- helpers ------------------------------------------------------------------------------------------------
    def _answer(self, make: Callable[[Request], list]) -> list[Any]:
        """One answer per request of the batch: a list for several images, one object for one, or the error."""
        out: list[Any] = []
        for idx, req in enumerate(self.requests):
            try:
                if req.error is not None:
                    raise req.error
                answers = make(req)
                out.append(answers if req.many else answers[0])
            except BadInput as e:
                out.append(self._error(idx, e))
        return out

    def _topk(self, req: Request) -> int:
        n = len(self.class_names)
        raw = req.options.get("topk", str(min(5, n)))
        try:
            k = int(raw)
        except ValueError:
            raise BadInput(f"topk must be an integer, got {raw!r}") from None
        if not 1 <= k <= n:
            raise BadInput(f"topk must be between 1 and {n} (the number of classes), got {k}")
        return k

    def _error(self, idx: int, e: BadInput) -> dict[str, Any]:
        self.context.set_response_status(code=e.status, phrase=str(e), idx=idx)
        return {"code": e.status, "type": "BadInput", "message": str(e)}
