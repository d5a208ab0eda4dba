"""Request parsing, limits and the worker's thread count for the serving core (visionapp.serve.core), kept apart
so they are unit-tested and shipped inside the .mar with the rest of the code the handler imports.

A request row maps names to values, as TorchServe hands them to its handler (and the KServe adapter builds
them): the raw body ("body" or "data": bytes), multipart form fields (one per file), or a JSON body already
decoded into a dict. (TorchServe does not pass the query string on; options come as X-* headers, form fields
or JSON keys.) A JSON body with "inputs" is an Open Inference Protocol request (`parse_v2`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from visionapp.decode import MAX_DECODED_PIXELS, load_image
from visionapp.imagefiles import FORMATS_TEXT, IMAGE_FORMATS

OPTION_KEYS = {"topk", "target", "method"}
MAX_PIXELS = MAX_DECODED_PIXELS  # an image decoding to more is refused: the limit predict-folder applies too


OTHER_KEYS = ("runtime",)  # the handler section's keys that are not limits: the model form (visionapp.forms)


@dataclass(frozen=True)
class Limits:
    """Bounded work per request: read from the `handler:` section of serve/model-config.yaml (packed into the
    .mar), these defaults where it says nothing. A request over a limit gets 413 naming it."""

    max_images_prediction: int = 64
    max_images_explanation: int = 4  # each explanation costs up to a few hundred model passes
    max_pixels: int = 100_000_000  # decoded pixels over all of a request's images, checked before each decode
    max_heatmap_pixels: int = 500_000  # an explanation's overlay is drawn at most this big (aspect kept)
    torch_threads: int = 0  # torch threads per worker; 0: the cores this process may use, shared by minWorkers
    niceness: int = 0  # added to the worker's CPU niceness: explanation workers yield the cores to predictions
    max_explanations_waiting: int = 4  # explanations admitted beyond those running; the next is refused (503)
    max_images_per_forward: int = 16  # a batch's images go through the model this many at a time
    decode_side: int = 0  # not a config key: the model's EvalPreset.decode_side, set by the core (0: decode whole)

    KEYS: ClassVar[dict[str, str]] = {  # model-config key → field
        "maxImagesPerPrediction": "max_images_prediction",
        "maxImagesPerExplanation": "max_images_explanation",
        "maxPixelsPerRequest": "max_pixels",
        "maxHeatmapPixels": "max_heatmap_pixels",
        "torchThreads": "torch_threads",
        "niceness": "niceness",
        "maxExplanationsWaiting": "max_explanations_waiting",
        "maxImagesPerForward": "max_images_per_forward",
    }

    @classmethod
    def from_model_config(cls, config: dict[str, Any] | None) -> Limits:
        section = {k: v for k, v in ((config or {}).get("handler") or {}).items() if k not in OTHER_KEYS}
        unknown = set(section) - set(cls.KEYS)
        if unknown:
            known = ", ".join([*cls.KEYS, *OTHER_KEYS])
            raise ValueError(f"unknown keys {sorted(unknown)} in the model config's handler section; known: {known}")
        return cls(**{cls.KEYS[k]: int(v) for k, v in section.items()})

    def min_side(self, explain: bool) -> int:
        """The pixels a side an image is decoded to keep (load_image's min_side): what the model's resize needs, and
        for an explanation also what its overlay is drawn at (maxHeatmapPixels)."""
        if not self.decode_side:
            return 0
        return max(self.decode_side, math.isqrt(self.max_heatmap_pixels)) if explain else self.decode_side

    def images(self, explain: bool) -> tuple[int, str]:
        """The most images one request may carry, and the model-config key that sets it."""
        if explain:
            return self.max_images_explanation, "maxImagesPerExplanation"
        return self.max_images_prediction, "maxImagesPerPrediction"


def explain_name(name: str) -> str:
    """The model name explanations are served under, beside `name`'s predictions (TorchServe: a registration of
    their own, with its own workers and queue; KServe's server answers it too)."""
    return f"{name}-explain"


CGROUP = (Path("/proc/self/cgroup"), Path("/sys/fs/cgroup"))  # this process's cgroup, and where cgroup v2 is mounted


def worker_threads(workers: int, cgroup: tuple[Path, Path] = CGROUP) -> int:
    """torch threads for each of a model's `workers` CPU workers: the cores this process may use, shared.

    The cores are its CPU affinity (taskset, a container's cpuset), capped by its cgroup's CPU quota (a Kubernetes
    CPU limit, `docker run --cpus`), not os.cpu_count(): a worker limited to 2 cores of a 64-core machine that
    started 64 threads would spend its time switching between them, or being throttled.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(*cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores // max(1, workers))


def cgroup_cpu_quota(proc_cgroup: Path, root: Path) -> float | None:
    """CPUs that this process's cgroup v2 quota allows (`cpu.max`: "quota period"); None if unlimited or unknown.

    `proc_cgroup` is /proc/self/cgroup, whose "0::/path" line names the process's cgroup under `root`
    (/sys/fs/cgroup); in a container with its own cgroup namespace that path is "/".
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
        path = next(line[3:] for line in lines if line.startswith("0::"))
        quota, period = (root / path.lstrip("/") / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, StopIteration, ValueError):  # cgroup v1 only, no cpu controller here, or not Linux
        return None


class BadInput(ValueError):
    """A request the handler refuses with a 4xx status and this message; `kind` labels it in the metrics."""

    KINDS = ("empty_body", "bad_body", "not_an_image", "corrupt_image", "too_many_images", "too_many_pixels",
             "bad_option", "no_explanations")  # fmt: skip

    def __init__(self, message: str, status: int = 400, kind: str = "bad_body") -> None:
        super().__init__(message)
        if kind not in self.KINDS:
            raise ValueError(f"unknown BadInput kind {kind!r}; known: {self.KINDS}")
        self.status = status
        self.kind = kind


@dataclass
class Request:
    images: list[Image.Image] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    many: bool = False  # answer with a list (several images) or one object
    error: BadInput | None = None
    rows: list[int] = field(default_factory=list)  # this request's rows in the batch tensor
    id: str | None = None  # an Open Inference Protocol request's id, echoed in its answer
    ood: list[tuple[float, bool]] = field(default_factory=list)  # per image: out-of-distribution score and flag


def shown(value: str, limit: int = 40) -> str:
    """A value as an error message quotes it: repr (control characters escaped), cut to about `limit` characters,
    so that an answer never echoes a long hostile value back."""
    quoted = repr(value)
    return quoted if len(quoted) <= limit else f"{quoted[:limit]}... ({len(value)} characters)"


def status_phrase(message: str, limit: int = 120) -> str:
    """The HTTP reason phrase for an error answer: ASCII only and short.

    TorchServe's worker (ts/protocol/otf_message_handler.py, create_predict_response) frames the phrase with its
    length in characters but writes its UTF-8 bytes: one non-ASCII character in it (a Latin-1 "é" in an option
    header, echoed back in the message) shifts every following field of the frame, and the frontend kills the
    worker ("Worker died") or waits for bytes that never come until the response timeout. The JSON body carries
    the full message.
    """
    return message.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


def decode_image(raw: bytes, budget: int | None = None, min_side: int = 0) -> tuple[Image.Image, int]:
    """Decode one image, and say how many pixels it has whole. `budget` is the request's pixels left, checked from
    the header before decoding; `min_side` decodes it only as big as the model needs (load_image), so that a worker
    never holds a photo whole. The decompression-bomb limit (MAX_PIXELS) applies to the pixels decoded at that
    scale (the serving core turns Pillow's own check, on the header's size, off)."""
    if not raw:
        raise BadInput("empty body: send an image, e.g. curl -T photo.jpg <url>", kind="empty_body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as probe:  # reads the header only
                pixels = probe.width * probe.height
            if budget is not None and pixels > budget:
                raise BadInput(
                    f"the request's images decode to more than its pixel budget ({pixels} pixels in this image, "
                    f"{budget} left); send fewer or smaller images, or raise maxPixelsPerRequest in "
                    "serve/model-config.yaml (then make archive)",
                    413,
                    "too_many_pixels",
                )
            return load_image(raw, min_side=min_side, max_pixels=MAX_PIXELS), pixels
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(
            f"image too large when decoded ({e}); the limit is {MAX_PIXELS} pixels", 413, "too_many_pixels"
        ) from None
    except Image.UnidentifiedImageError:
        raise BadInput(f"not an image in a format this server reads ({FORMATS_TEXT})", kind="not_an_image") from None
    except Exception as e:  # whatever a malformed file makes a decoder raise (OSError, struct.error, IndexError...)
        raise BadInput(
            f"truncated or corrupt image ({type(e).__name__}: {shown(str(e), 80)})", kind="corrupt_image"
        ) from None


def _b64(s: Any) -> bytes:
    if not isinstance(s, str | bytes):
        raise BadInput(f"image data must be base64 strings, got {type(s).__name__}")
    try:
        return base64.b64decode(_text(s), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("JSON image data is not valid base64") from None


def parse_request(
    row: dict[str, Any], headers: dict[str, Any] | None = None, limits: Limits = Limits(), explain: bool = False
) -> Request:
    """One TorchServe request row (raw body, multipart fields, JSON) and its HTTP headers → images + options.

    Options come from X-Topk / X-Target / X-Method headers (TorchServe does not pass the query string to
    handlers), multipart form fields or JSON keys of the same names. The number of images is checked before
    any is decoded, their decoded size before each decode (`limits`; explanations have their own count).
    Anything this cannot use is a BadInput in `error`, never an exception.
    """

    def check_count(n: int) -> None:
        _check_count(n, limits, explain)

    req = Request()
    for name, value in (headers or {}).items():
        key = str(name).lower().removeprefix("x-")
        if str(name).lower().startswith("x-") and key in OPTION_KEYS:
            req.options[key] = _text(value)
    try:
        raws: list[bytes] = []
        for key, value in row.items():
            raws += _row_value(key, value, req, check_count, seen=len(raws))
        if not raws:
            raise BadInput("empty body: send an image, e.g. curl -T photo.jpg <url>", kind="empty_body")
        check_count(len(raws))
        req.many = req.many or len(raws) > 1
        _decode_all(raws, req, limits, explain)
    except BadInput as e:
        req.error = e
    return req


def _check_count(n: int, limits: Limits, explain: bool) -> None:
    """413 for more images in one request than the limit allows, before any is decoded."""
    max_images, limit_key = limits.images(explain)
    if n > max_images:
        kind = "an explanation" if explain else "a prediction"
        raise BadInput(
            f"{n} images in {kind} request; the limit is {max_images} ({limit_key} in serve/model-config.yaml, "
            "then make archive); split them over several requests",
            413,
            "too_many_images",
        )


def _decode_all(raws: list[bytes], req: Request, limits: Limits, explain: bool = False) -> None:
    """Decode a request's images in order, each checked against what is left of its pixel budget first (the
    budget counts the images' full sizes, from their headers: the work a request may ask for)."""
    budget = limits.max_pixels
    for r in raws:
        img, pixels = decode_image(r, budget, limits.min_side(explain))
        req.images.append(img)
        budget -= pixels


V2_HEADER_LENGTH = "inference-header-content-length"  # the binary tensor data extension's header


def parse_json(raw: bytes | bytearray | str) -> Any:
    """A JSON body, or a BadInput naming why not (a body nested deeper than the parser recurses included)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadInput("the JSON body is nested too deeply to read") from None
    except ValueError:  # UnicodeDecodeError included
        raise BadInput("the body is not valid JSON") from None


def v2_body(row: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A request row's Open Inference Protocol request (a JSON object with "inputs"), else None; a body that looks
    like one and cannot be read is a BadInput.

    The JSON is read whatever the Content-Type says: TorchServe decodes it only for application/json and hands
    text/* over as a string, and many v2 clients send none (no image starts with "{"). With the binary tensor
    data extension's Inference-Header-Content-Length header, the JSON is that many bytes and the tensors' data
    follows it (`v2_binary`)."""
    body = row.get("body", row.get("data"))
    length = next((v for k, v in (headers or {}).items() if str(k).lower() == V2_HEADER_LENGTH), None)
    if length is not None and isinstance(body, bytes | bytearray):
        return v2_binary(bytes(body), _text(length))
    if isinstance(body, bytes | bytearray | str) and body.lstrip()[:1] in (b"{", "{"):
        body = parse_json(body)
    return body if isinstance(body, dict) and "inputs" in body else None


def v2_binary(body: bytes, header_length: str) -> dict[str, Any]:
    """A request in the binary tensor data extension: a JSON header of `header_length` bytes, then the data of each
    input whose parameters give `binary_data_size`, in order; a BYTES tensor's elements each prefixed by its
    length (4 bytes, little-endian). The elements become the inputs' "data" as raw bytes."""
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise BadInput(f"Inference-Header-Content-Length must be the JSON header's length in bytes (1 to "
                       f"{len(body)}), got {shown(header_length)}")  # fmt: skip
    offset = int(header_length)
    head = parse_json(body[:offset])
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise BadInput(f"the JSON header is not an inference request: {V2_EXAMPLE}")
    for tensor in head["inputs"]:
        size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor, dict) else None
        if size is None:
            continue
        if not isinstance(size, int) or not 0 <= size <= len(body) - offset:
            raise BadInput(f"binary_data_size {shown(str(size))} runs past the body's {len(body) - offset} bytes")
        chunk, offset = body[offset : offset + size], offset + size
        tensor["data"] = _bytes_elements(chunk) if tensor.get("datatype") == "BYTES" else []
    return head


def _bytes_elements(chunk: bytes) -> list[bytes]:
    """A BYTES tensor's binary data: each element as its 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise BadInput("a BYTES tensor's binary data ends inside an element's 4-byte length")
        n = int.from_bytes(chunk[i : i + 4], "little")
        if i + 4 + n > len(chunk):
            raise BadInput(f"a BYTES element of {n} bytes runs past its tensor's binary data")
        out.append(chunk[i + 4 : i + 4 + n])
        i += 4 + n
    return out


V2_EXAMPLE = '{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["<base64 image>"]}]}'


def parse_v2(body: Any, limits: Limits = Limits()) -> Request:
    """An Open Inference Protocol inference request → images + options (never raises: errors go in `error`).

    One input of datatype BYTES and shape [N]: its N elements are images, base64 strings over REST or raw bytes
    over gRPC. Options are request parameters: topk (and for explanations target, method). The request id is
    kept to be echoed. Counted before any is decoded, each decode checked against the pixel budget, as
    `parse_request` does.
    """
    req = Request(many=True)
    try:
        if not isinstance(body, dict):
            raise BadInput(f"an inference request is a JSON object: {V2_EXAMPLE}")
        if body.get("id") is not None:
            req.id = _text(body["id"])
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadInput('"parameters" must be an object, e.g. {"topk": 3}')
        req.options = {k: _text(v) for k, v in params.items() if k in OPTION_KEYS}
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadInput(f'"inputs" must hold exactly one input, the images: {V2_EXAMPLE}')
        tensor = inputs[0]
        if tensor.get("datatype") != "BYTES":
            raise BadInput(f"the images input must have datatype BYTES, got {shown(_text(tensor.get('datatype')))}")
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise BadInput(f'the images input needs "data": a list of base64 images: {V2_EXAMPLE}', kind="empty_body")
        if tensor.get("shape") != [len(data)]:
            raise BadInput(f"the images input's shape must be [{len(data)}] (one element per image), "
                           f"got {shown(_text(tensor.get('shape')))}")  # fmt: skip
        _check_count(len(data), limits, explain=False)
        raws = [bytes(v) if isinstance(v, bytes | bytearray) else _b64(v) for v in data]
        _decode_all(raws, req, limits)
    except BadInput as e:
        req.error = e
    return req


def _row_value(key: str, value: Any, req: Request, check_count: Callable[[int], None], seen: int) -> list[bytes]:
    """The image bytes one field of a request row holds (options go into `req.options`): a raw body or file
    field, or a JSON body with "data" or "images" (counted, with the `seen` before it, before any base64 is
    decoded)."""
    if key in OPTION_KEYS:
        req.options[key] = _text(value)
        return []
    if isinstance(value, dict):  # application/json body, decoded by TorchServe
        req.options.update({k: _text(v) for k, v in value.items() if k in OPTION_KEYS})
        if "images" in value and isinstance(value["images"], list):
            check_count(seen + len(value["images"]))
            req.many = True
            return [_b64(v) for v in value["images"]]
        if "data" in value:
            return [_b64(value["data"])]
        raise BadInput('JSON body needs "data": "<base64 image>" or "images": ["<base64>", ...]')
    if isinstance(value, list):
        raise BadInput('JSON body must be an object: {"data": "<base64 image>"}')
    if isinstance(value, str):  # a text/* body or form field that is not an option
        raise BadInput(f"field {shown(key)} is text, not an image; send the image bytes (curl -T photo.jpg)")
    if isinstance(value, bytes | bytearray):
        return [bytes(value)]
    # a JSON body that is null, a number or a boolean
    raise BadInput(f'JSON body must be an object: {{"data": "<base64 image>"}}, got {type(value).__name__}')
