"""The serving core: what a server does with a request once its bytes have arrived, knowing no server.

Request parsing and limits (visionapp.serve.inputs), batched calibrated top-k predictions, Captum explanations,
error answers and metrics live here; each server is a thin adapter over one `ServingCore`: TorchServe's handler
(visionapp.serve.handler) and KServe's model server (visionapp.serve.kserve_server). Both speak the project's
own API (`/predictions`, `/explanations`: raw image bodies, multipart forms, JSON with base64) and the Open
Inference Protocol (KServe v2): one BYTES input `images` of shape [N] (base64 strings over REST, raw bytes over
gRPC), answered by `labels` (BYTES) and `probabilities` (FP32, calibrated), both of shape [N, k].

Metrics go through the adapter's `Metrics` (TorchServe's metrics API, or prometheus_client under KServe) with
the same names and labels, so one dashboard reads both: ImagesPerRequest{Endpoint} (histogram),
Predictions{Class} (the top-1 class of each predicted image), ExplanationSeconds{Method} (histogram, per
explained image), BadInputs{Kind} (4xx answers).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from visionapp.decode import resize
from visionapp.manifest import CARD_FILE
from visionapp.ood import OODRecord
from visionapp.serve.inputs import (
    BadInput,
    Limits,
    Request,
    shown,
    status_phrase,
    worker_threads,
)

if TYPE_CHECKING:
    from visionapp.serve.torch_engine import TorchEngine

log = logging.getLogger(__name__)

# What the slim predictor answers to an explanation: it has no torch, so no eager model for Captum to explain.
NO_EXPLANATIONS = (
    "this is the slim predictor (ONNX Runtime, no torch): explanations are served by the full image, where torch "
    "and Captum are (make serve without SLIM=1; on KServe, the InferenceService's explainer component, which "
    "answers POST /v1/models/<name>:explain)"
)

# The Open Inference Protocol's names for this model's tensors (GET /v2/models/<name> lists them).
V2_INPUT, V2_LABELS, V2_PROBABILITIES = "images", "labels", "probabilities"
V2_OOD_SCORE, V2_OOD = (
    "ood_score",
    "ood",
)  # per image: the out-of-distribution score, and whether it is over the threshold


class Metrics(Protocol):
    def add(self, name: str, value: float, unit: str, histogram: bool = False, **dimensions: str) -> None:
        """Add `value` to the counter (or observe it in the histogram) `name` with these label values."""


@dataclass(frozen=True)
class Failure:
    """A request's error answer: its HTTP status, a message that names the problem, and the short ASCII reason
    phrase for the status line."""

    status: int
    message: str
    retry_after: int | None = None  # seconds, for a 503 that says when to come back

    @property
    def phrase(self) -> str:
        return status_phrase(self.message)

    def native(self) -> dict[str, Any]:
        """The body as /predictions and /explanations answer it (TorchServe's error shape)."""
        kind = {503: "ServiceUnavailable"}.get(self.status, "BadInput" if self.status < 500 else "InternalServerError")
        return {"code": self.status, "type": kind, "message": self.message}

    def v2(self) -> dict[str, str]:
        """The body as the Open Inference Protocol answers an error."""
        return {"error": self.message}


class Admission:
    """Back-pressure for explanations: `running` at a time and `waiting` more admitted; the next is refused at once
    (503) with a Retry-After from the recent explanations' seconds, never queued behind the others. Both servers
    size it from the explanations' config (minWorkers, maxExplanationsWaiting); used from one thread (an event loop)."""

    def __init__(self, running: int, waiting: int) -> None:
        self.running, self.waiting = max(1, running), max(0, waiting)
        self.admitted = 0  # running or waiting
        self.seconds = 10.0  # a running estimate of one explanation request's seconds

    def refusal(self) -> Failure | None:
        if self.admitted < self.running + self.waiting:
            return None
        waiting = self.admitted - self.running
        retry = max(1, math.ceil(self.seconds * (waiting + 1) / self.running))
        message = (f"too many explanations: {self.running} running and {waiting} waiting, the limit (minWorkers and "
                   f"maxExplanationsWaiting in serve/explain-config.yaml); retry after {retry} s")  # fmt: skip
        return Failure(503, message, retry_after=retry)

    @contextmanager
    def admit(self) -> Iterator[None]:
        self.admitted += 1
        start = time.monotonic()
        try:
            yield
        finally:
            self.admitted -= 1
        self.seconds = 0.7 * self.seconds + 0.3 * (time.monotonic() - start)


class Engine(Protocol):
    """What the core asks of a loaded bundle: `visionapp.serve.torch_engine.TorchEngine` (torch, any form) or
    `visionapp.slim.SlimBundle` (an ONNX form, no torch)."""

    @property
    def meta(self) -> dict[str, Any]: ...

    @property
    def form_note(self) -> str: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def image_size(self) -> int: ...

    @property
    def decode_side(self) -> int: ...

    @property
    def ood(self) -> OODRecord | None: ...

    def answer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...


def load_engine(model_dir: str | Path, device: str, runtime: str, threads: int, slim: bool) -> Engine:
    """slim: the bundle's ONNX form on ONNX Runtime, imported without torch (visionapp.slim); else the bundle on
    torch in the form `runtime` names. Each is imported only here, so that the slim image never imports torch."""
    if slim:
        from visionapp.slim import load_slim

        return load_slim(model_dir, runtime, threads)
    from visionapp.serve.torch_engine import TorchEngine

    return TorchEngine(model_dir, device, runtime, threads)


class ServingCore:
    """One loaded bundle, answering parsed requests. Not thread-safe: each server calls it from one thread."""

    def __init__(self, model_dir: str | Path, device: str, model_config: dict[str, Any] | None,
                 name: str, version: str = "1", slim: bool = False) -> None:  # fmt: skip
        self.name, self.version, self.device, self.slim = name, version, device, slim
        self.model_dir = Path(model_dir)
        config = model_config or {}
        self.limits = Limits.from_model_config(config)
        # The cores this model's workers share (or as many as the config says: an explanation worker leaves the rest
        # to the predictions), for torch's or ONNX Runtime's thread pool.
        self.threads = self.limits.torch_threads or worker_threads(int(config.get("minWorkers", 1)))
        if self.limits.niceness:  # a lower CPU priority: when cores are short, the predictions' worker goes first
            os.nice(self.limits.niceness)
        # Pillow's own bomb check reads the header's size; decode_image checks the pixels at the reduced scale it
        # decodes at instead (a 100-megapixel JPEG decodes at an eighth a side), against MAX_PIXELS.
        Image.MAX_IMAGE_PIXELS = None
        # Predictions run the model config's form (visionapp.forms; "auto": the fastest that passed its checks at
        # make export and loads on this device, torch and CPU); explanations always run the eager model (Captum
        # needs its gradients).
        runtime = str((config.get("handler") or {}).get("runtime", "auto"))
        self.engine = load_engine(model_dir, device, runtime, self.threads, slim)
        self.limits = replace(self.limits, decode_side=self.engine.decode_side)
        self.class_names = self.engine.class_names
        log.info(
            "loaded %s with classes %s on %s, %s threads: %d; predictions: %s; %s", self.engine.meta["arch"],
            self.class_names, device, "ONNX Runtime" if slim else "torch", self.threads, self.engine.form_note,
            self.limits,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What is served, for whoever reviews it: the model, its version, the form that answers, the OOD method and
        its threshold, and the bundle's model card (MODEL_CARD.md: intended use, data, results, limitations; None
        for a bundle without one). TorchServe's customized describe, GET /models/<name> on KServe's server."""
        card = self.model_dir / CARD_FILE
        ood = self.engine.ood
        return {
            "model": self.name, "version": self.version, "arch": self.engine.meta["arch"],
            "classes": self.class_names, "image_size": self.engine.image_size, "form": self.engine.form_note,
            "ood": None if ood is None else {"method": ood.method, "threshold": ood.threshold},
            "model_card": card.read_text() if card.is_file() else None,
        }  # fmt: skip

    def warm_up(self) -> None:
        """One prediction of a plain grey image through the whole path, before the server says it is ready: a
        readiness probe then means the model answers (the first forward also pays the one-time costs here)."""
        size = self.engine.image_size
        answers = self.predict([Request(images=[Image.new("RGB", (size, size), (128, 128, 128))])], NO_METRICS)
        if isinstance(answers[0], Failure):
            raise RuntimeError(f"the warm-up prediction failed: {answers[0].message}")
        log.info("warm-up prediction answered: %s", answers[0])

    # --- predictions: every request of a batch in one forward pass ----------------------------------------------
    def predict(self, requests: list[Request], metrics: Metrics) -> list[list[dict[str, float]] | Failure]:
        """Per request, one {class: probability} (top-k, best first) per image, or its Failure."""
        out: list[list[dict[str, float]] | Failure] = [[] for _ in requests]
        ready: list[tuple[int, Request, int]] = []
        tensors: list[np.ndarray] = []  # uint8 at the model's input size: a quarter of the float bytes
        for idx, req in enumerate(requests):
            try:
                k = self.topk(req)
                for img in req.images:
                    req.rows.append(len(tensors))
                    tensors.append(resize(img, self.engine.image_size))
                req.images.clear()  # the decoded images are not needed past here: the batch holds only tensors
                ready.append((idx, req, k))
            except Exception as e:
                out[idx] = self.failure(e, metrics)
        if not tensors:
            return out
        try:
            probs, scores, flags = self._forward(tensors)
        except Exception as e:  # the forward itself failed: every request in it gets the fault
            for idx, _, _ in ready:
                out[idx] = self.failure(e, metrics)
            return out
        for idx, req, k in ready:
            answers = []
            for row in req.rows:
                top = np.argsort(-probs[row], kind="stable")[:k]
                metrics.add("Predictions", 1, "count", Class=self.class_names[int(top[0])])
                answers.append({self.class_names[c]: round(float(probs[row][c]), 6) for c in top})
                if scores is not None and flags is not None:
                    req.ood.append((round(float(scores[row]), 4), bool(flags[row])))
                    metrics.add("OutOfDistribution", int(flags[row]), "count")
            out[idx] = answers
        return out

    def _forward(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Calibrated probabilities and OOD scores and flags of uint8 images, through the model
        maxImagesPerForward at a time: a batch of many images never holds all their activations at once."""
        step = max(1, self.limits.max_images_per_forward)
        probs, scores, flags = [], [], []
        for i in range(0, len(images), step):
            p, s, f = self.engine.answer(np.stack(images[i : i + step]))
            probs.append(p)
            if s is not None and f is not None:
                scores.append(s)
                flags.append(f)
        if not scores:
            return np.concatenate(probs), None, None
        return np.concatenate(probs), np.concatenate(scores), np.concatenate(flags)

    def ood_headers(self, req: Request) -> dict[str, str]:
        """A prediction's out-of-distribution answer, as response headers (one value per image, comma-separated, in
        the images' order), so that the top-k body keeps its shape; none for a bundle without an OOD record."""
        record = self.engine.ood
        if record is None or not req.ood:
            return {}
        return {
            "X-OOD": ", ".join("true" if flag else "false" for _, flag in req.ood),
            "X-OOD-Score": ", ".join(f"{score:g}" for score, _ in req.ood),
            "X-OOD-Threshold": f"{record.threshold:g}",
            "X-OOD-Method": record.method,
        }

    # --- explanations ---------------------------------------------------------------------------------------------
    def explain(self, req: Request, metrics: Metrics) -> list[dict[str, Any]]:
        """One answer per image: the class explained, its probability, the prediction and the heatmap overlay."""
        if self.slim:
            raise BadInput(NO_EXPLANATIONS, status=404, kind="no_explanations")
        from visionapp.attribution.maps import explain, overlay_png  # Captum: imported where explanations run
        from visionapp.attribution.methods import METHODS

        engine: TorchEngine = self.engine  # type: ignore[assignment]  # not slim: the torch engine
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
                engine.bundle,
                img,
                method,
                target=target,
                device=engine.device,
                max_pixels=self.limits.max_heatmap_pixels,
            )
            metrics.add("ExplanationSeconds", time.perf_counter() - start, "s", histogram=True, Method=method)
            answers.append(
                {
                    "class": ex.target,
                    "probability": round(ex.target_probability, 6),
                    "predicted": ex.predicted,
                    "predicted_probability": round(ex.probability, 6),
                    "method": method,
                    "heatmap_png_base64": base64.b64encode(overlay_png(ex.image, ex.attr_map)).decode("ascii"),
                    "heatmap_size": list(ex.image.size),  # width, height: at most maxHeatmapPixels
                    **({"ood": ex.ood[1], "ood_score": round(ex.ood[0], 4)} if ex.ood is not None else {}),
                }
            )
        return answers

    # --- the Open Inference Protocol --------------------------------------------------------------------------------
    def v2_answer(self, req: Request, answers: list[dict[str, float]]) -> dict[str, Any]:
        """An inference response: `labels` and `probabilities`, each [N, k], row i for image i, best first."""
        k = len(answers[0]) if answers else 0
        labels = [name for a in answers for name in a]
        probabilities = [p for a in answers for p in a.values()]
        response: dict[str, Any] = {"model_name": self.name, "model_version": self.version}
        if req.id is not None:
            response["id"] = req.id
        response["outputs"] = [
            {"name": V2_LABELS, "datatype": "BYTES", "shape": [len(answers), k], "data": labels},
            {"name": V2_PROBABILITIES, "datatype": "FP32", "shape": [len(answers), k], "data": probabilities},
        ]
        if req.ood:  # added tensors: a client that reads labels and probabilities is unaffected
            response["outputs"] += [
                {"name": V2_OOD_SCORE, "datatype": "FP32", "shape": [len(req.ood)], "data": [s for s, _ in req.ood]},
                {"name": V2_OOD, "datatype": "BOOL", "shape": [len(req.ood)], "data": [f for _, f in req.ood]},
            ]
        return response

    @staticmethod
    def v2_tensors() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The model metadata's inputs and outputs (-1: any size)."""
        inputs = [{"name": V2_INPUT, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": V2_LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                   {"name": V2_PROBABILITIES, "datatype": "FP32", "shape": [-1, -1]},
                   {"name": V2_OOD_SCORE, "datatype": "FP32", "shape": [-1]},  # with an OOD record in the bundle
                   {"name": V2_OOD, "datatype": "BOOL", "shape": [-1]}]  # fmt: skip
        return inputs, outputs

    # --- helpers ------------------------------------------------------------------------------------------------
    def topk(self, req: Request) -> int:
        n = len(self.class_names)
        raw = req.options.get("topk", str(min(5, n)))
        try:
            k = int(raw)
        except ValueError:
            raise BadInput(f"topk must be an integer, got {shown(raw)}", kind="bad_option") from None
        if not 1 <= k <= n:
            raise BadInput(f"topk must be between 1 and {n} (the number of classes), got {k}", kind="bad_option")
        return k

    def failure(self, e: Exception, metrics: Metrics) -> Failure:
        """4xx naming the problem for input we cannot use, 500 for a fault (its traceback in the log)."""
        if isinstance(e, BadInput):
            metrics.add("BadInputs", 1, "count", Kind=e.kind)
            return Failure(e.status, str(e))
        log.exception("a request failed; the others are answered")
        return Failure(500, f"internal error ({type(e).__name__}); the traceback is in the server's log")


class _NoMetrics:
    def add(self, name: str, value: float, unit: str, histogram: bool = False, **dimensions: str) -> None:
        pass


NO_METRICS: Metrics = _NoMetrics()


class Batcher:
    """Dynamic batching for a server that hands over requests one at a time (KServe's): requests arriving within
    `max_delay` seconds of the first one waiting run as one forward pass of up to `batch_size` requests (the
    model config's batchSize and maxBatchDelay, the keys TorchServe batches by), each answered or failed alone;
    a lone request waits no longer than the delay. One inference thread runs every batch: it owns torch (its thread
    pool, set once by the core), so the thread that submits (an event loop) never runs a forward pass and stays free
    to answer probes and read other requests' bodies."""

    def __init__(self, core: ServingCore, metrics: Metrics, batch_size: int, max_delay: float) -> None:
        self.core, self.metrics = core, metrics
        self.batch_size, self.max_delay = max(1, batch_size), max(0.0, max_delay)
        self.waiting: queue.SimpleQueue[tuple[Request, Future]] = queue.SimpleQueue()
        self.batches = 0  # forward passes run, for the bench's mean batch
        self.thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> Future:
        """The request's answer (its answers, or its Failure), once its batch has run."""
        future: Future = Future()
        self.waiting.put((req, future))
        return future

    def _gather(self) -> list[tuple[Request, Future]]:
        batch = [self.waiting.get()]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.batch_size:
            try:  # those already waiting at once; then until the first one's delay is up
                batch.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            try:
                answers = self.core.predict([req for req, _ in batch], self.metrics)
            except Exception as e:  # predict answers per request; anything else fails this batch, not the thread
                answers = [self.core.failure(e, self.metrics)] * len(batch)
            self.batches += 1
            self.metrics.add("BatchesRun", 1, "count")  # forward passes: requests per batch, from /metrics
            for (_, future), answer in zip(batch, answers, strict=True):
                future.set_result(answer)
