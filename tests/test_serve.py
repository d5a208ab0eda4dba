"""End to end: the real servers, started by `make serve-bg` on free ports (TorchServe with token authorisation on,
and KServe's model server over the same serving core), real HTTP requests, stopped by `make stop` with no process
left behind. The tests that take `server` run against each of the two."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import pytest
import torch
import yaml
from helpers import EXPLAIN_CONFIG, MODEL_CONFIG, ROOT, post_with_headers, real_server, scrape
from PIL import Image

from visionapp.bundle import load_bundle
from visionapp.client.api import call
from visionapp.decode import load_image
from visionapp.deploy.archive import build_archive, build_archives
from visionapp.deploy.loadgen import run_load
from visionapp.deploy.local import LocalServer as Server
from visionapp.deploy.local import free_ports
from visionapp.manifest import CARD_FILE
from visionapp.serve.inputs import worker_threads

pytestmark = pytest.mark.slow
T = TypeVar("T")
BODY_TIMEOUT = 3  # seconds KServe's server waits for a body in these tests (30 as shipped)


def start_server(mar_dir: Path, serve_dir: Path, *extra_vars: str, server: str = "torchserve") -> Server:
    return Server(mar_dir, serve_dir, "classifier", *extra_vars, server=server).start()


def stop_server(server: Server) -> None:
    before = server.processes()
    assert before, "no server process found"
    server.stop()
    _, alive = psutil.wait_procs(before, timeout=30)
    assert not alive and not server.processes(), f"left behind: {alive or server.processes()}"


@pytest.fixture(scope="module")
def model_store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    build_archives(trained_run / "bundle", name="classifier", out=store, model_config=MODEL_CONFIG,
                   explain_config=EXPLAIN_CONFIG)  # fmt: skip
    return store


@pytest.fixture(scope="module", params=["torchserve", "kserve"])
def server(
    request: pytest.FixtureRequest, model_store: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The same archive's bundle and model config, served by each server in turn."""
    extra: tuple[str, ...] = ()
    if request.param == "kserve":  # with its gRPC endpoint on, and a short body deadline to test it
        extra = (f"KSERVE_GRPC_PORT={free_ports(1)[0]}", f"BODY_TIMEOUT={BODY_TIMEOUT}")
    tmp = tmp_path_factory.mktemp("serve")
    with real_server(request.param, trained_run, tmp, store=model_store, extra_vars=extra) as s:
        yield s


def torchserve_only(server: Server, why: str) -> None:
    if server.server != "torchserve":
        pytest.skip(f"TorchServe only: {why}")


@pytest.fixture(scope="module")
def sample(trained_run: Path) -> dict[str, bytes]:
    root = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"]) / "test"
    return {c.name: sorted(c.glob("*.png"))[0].read_bytes() for c in sorted(root.iterdir())}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- predictions ----------------------------------------------------------------------------------------------
def test_prediction_is_top_k_class_probabilities(server: Server, sample: dict[str, bytes], trained_run: Path) -> None:
    status, answer = server.post(sample["circle"])
    assert status == 200
    assert isinstance(answer, dict) and len(answer) == 5  # min(5, number of classes)
    assert set(answer) == {"circle", "cross", "square", "star", "triangle"}
    assert list(answer.values()) == sorted(answer.values(), reverse=True)
    assert sum(answer.values()) == pytest.approx(1.0, abs=1e-4)
    status, answer = server.post(sample["circle"], headers={"X-Topk": "2"})
    assert status == 200 and len(answer) == 2


def test_multiple_images_multipart_and_json(server: Server, sample: dict[str, bytes]) -> None:
    boundary = "visionapp-test-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + sample[n]
        + b"\r\n"
        for n in ("star", "square")
    )
    status, answer = server.post(
        parts + f"--{boundary}--\r\n".encode(), content_type=f"multipart/form-data; boundary={boundary}"
    )
    assert status == 200 and isinstance(answer, list) and len(answer) == 2
    body = json.dumps({"images": [base64.b64encode(sample[n]).decode() for n in ("cross", "circle", "star")]})
    status, answer = server.post(body.encode(), content_type="application/json")
    assert status == 200 and isinstance(answer, list) and len(answer) == 3
    status, answer = server.post(
        json.dumps({"data": base64.b64encode(sample["cross"]).decode()}).encode(), content_type="application/json"
    )
    assert status == 200 and isinstance(answer, dict)


def test_served_probabilities_equal_in_process(server: Server, sample: dict[str, bytes], trained_run: Path) -> None:
    bundle = load_bundle(trained_run / "bundle")
    for raw in sample.values():
        status, answer = server.post(raw, headers={"X-Topk": "5"})
        assert status == 200
        with torch.no_grad():
            probs = bundle.probabilities(bundle.transform(load_image(raw))[None])[0]
        expected = dict(zip(bundle.class_names, probs.tolist(), strict=True))
        for name, p in answer.items():  # type: ignore[union-attr]
            assert p == pytest.approx(expected[name], abs=1e-4)


def test_served_ood_flag_equals_in_process(server: Server, sample: dict[str, bytes], trained_run: Path) -> None:
    """Each answer's out-of-distribution score and flag (response headers; v2 outputs) are the bundle's own."""
    bundle = load_bundle(trained_run / "bundle")
    assert bundle.ood is not None
    root = Path(json.loads((trained_run / "metrics.json").read_text())["data_root"])
    others = [sorted((root / "ood" / kind).rglob("*.png"))[0].read_bytes() for kind in ("near", "far")]
    images = [sample["star"], *others]
    with torch.no_grad():
        _, scores, flags = bundle.answer(torch.stack([bundle.transform(load_image(raw)) for raw in images]))
    assert scores is not None and flags is not None
    for raw, score, flag in zip(images, scores.tolist(), flags.tolist(), strict=True):
        status, headers, answer = post_with_headers(server, raw)
        assert status == 200 and isinstance(answer, dict) and len(answer) == 5  # the top-k body keeps its shape
        assert headers["x-ood"] == ("true" if flag else "false")
        assert float(headers["x-ood-score"]) == pytest.approx(score, abs=1e-3)
        assert float(headers["x-ood-threshold"]) == pytest.approx(bundle.ood.threshold, rel=1e-4)
        assert headers["x-ood-method"] == bundle.ood.method
    body = json.dumps({"images": [base64.b64encode(raw).decode() for raw in images]}).encode()
    status, headers, answer = post_with_headers(server, body, "application/json")
    assert status == 200 and headers["x-ood"] == ", ".join("true" if f else "false" for f in flags.tolist())
    status, v2 = v2_post(server, v2_request(images))
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["ood"]["datatype"] == "BOOL" and outputs["ood"]["data"] == flags.tolist()
    assert outputs["ood_score"]["data"] == pytest.approx(scores.tolist(), abs=1e-3)


# --- the Open Inference Protocol (KServe v2), on both servers ---------------------------------------------------
def v2_request(images: list[bytes], **parameters: object) -> dict:
    data = [base64.b64encode(i).decode() for i in images]
    images = {"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}
    body: dict = {"id": "req-7", "inputs": [images]}
    if parameters:
        body["parameters"] = parameters
    return body


def v2_post(server: Server, body: object) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.port}/v2/models/classifier/infer"
    status, raw = call(url, server.key, json.dumps(body).encode(), "application/json")
    return status, json.loads(raw)


def test_v2_infer_answers_labels_and_probabilities_as_in_process(
    server: Server, sample: dict[str, bytes], trained_run: Path
) -> None:
    names = ["star", "circle", "cross"]
    status, answer = v2_post(server, v2_request([sample[n] for n in names], topk=3))
    assert status == 200, answer
    assert answer["id"] == "req-7" and answer["model_name"] == "classifier"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["labels"]["datatype"] == "BYTES" and outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["labels"]["shape"] == outputs["probabilities"]["shape"] == [3, 3]
    bundle = load_bundle(trained_run / "bundle")
    with torch.no_grad():
        probs = bundle.probabilities(torch.stack([bundle.transform(load_image(sample[n])) for n in names]))
    labels, values = outputs["labels"]["data"], outputs["probabilities"]["data"]
    for row in range(len(names)):
        assert values[row * 3 : row * 3 + 3] == sorted(values[row * 3 : row * 3 + 3], reverse=True)  # best first
        for label, p in zip(labels[row * 3 : row * 3 + 3], values[row * 3 : row * 3 + 3], strict=True):
            assert p == pytest.approx(float(probs[row, bundle.class_names.index(label)]), abs=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": 5}, 400, "inputs"),  # (a body without "inputs" is this project's own JSON on TorchServe)
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "BYTES"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}, 400, "shape"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["***"]}]}, 400, "base64"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400, "not an image"),
        ("topk", 400, "topk"),
        ("many", 413, "maxImagesPerPrediction"),
    ],
)
def test_v2_errors_answer_with_an_error_that_names_the_problem(
    server: Server, sample: dict[str, bytes], body: object, status: int, words: str
) -> None:
    if body == "topk":
        body = v2_request([sample["star"]], topk="\xe9" * 200)  # a hostile value, cut when echoed
    elif body == "many":
        body = v2_request([sample["star"]] * 65)  # counted before any is decoded
    got, answer = v2_post(server, body)
    assert got == status and set(answer) == {"error"}, (got, answer)
    assert words.lower() in answer["error"].lower() and len(answer["error"]) < 400, answer
    assert v2_post(server, v2_request([sample["cross"]]))[0] == 200  # and the next request is served


def top1(trained_run: Path, image: bytes) -> str:
    bundle = load_bundle(trained_run / "bundle")
    with torch.no_grad():
        return bundle.class_names[int(bundle.probabilities(bundle.transform(load_image(image))[None])[0].argmax())]


def test_a_v2_client_no_one_here_wrote_gets_the_answer(
    server: Server, sample: dict[str, bytes], trained_run: Path
) -> None:
    """The kserve SDK's REST client (httpx), protocol v2, against each server (TorchServe: with its key)."""
    import asyncio

    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def infer() -> object:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        images = InferInput("images", [1], "BYTES", [base64.b64encode(sample["triangle"]).decode()])
        # its defaults: JSON without a Content-Type (which KServe's own infer route would read as binary)
        headers = {"Authorization": f"Bearer {server.key}"} if server.key else {}
        try:
            return await client.infer(f"http://127.0.0.1:{server.port}", InferRequest("classifier", [images]),
                                      model_name="classifier", headers=headers)  # fmt: skip
        finally:
            await client.close()

    response = asyncio.run(infer())
    labels = next(o for o in response.outputs if o.name == "labels")  # type: ignore[attr-defined]
    assert labels.data[0] == top1(trained_run, sample["triangle"])


def _raw_post(server: Server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST with exactly these headers (http.client adds only Host, Content-Length and Accept-Encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    auth = {"Authorization": f"Bearer {server.key}"} if server.key else {}
    conn.request("POST", path, body=body, headers={**auth, **headers})
    r = conn.getresponse()
    status, raw = r.status, r.read()
    conn.close()
    return status, json.loads(raw)


@pytest.mark.parametrize("shape", ["no id", "no Content-Type", "text/plain", "binary extension"])
def test_every_valid_v2_request_is_answered(
    server: Server, sample: dict[str, bytes], trained_run: Path, shape: str
) -> None:
    """The protocol's id is optional; clients send JSON with or without a Content-Type; the binary tensor data
    extension carries raw image bytes after a JSON header whose length a header gives."""
    body, headers = v2_request([sample["star"], sample["cross"]]), {"Content-Type": "application/json"}
    if shape == "no id":
        del body["id"]
    raw = json.dumps(body).encode()
    if shape == "no Content-Type":
        headers = {}
    elif shape == "text/plain":
        headers = {"Content-Type": "text/plain"}
    elif shape == "binary extension":
        data = b"".join(len(i).to_bytes(4, "little") + i for i in (sample["star"], sample["cross"]))
        images = {"name": "images", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(data)}}
        head = json.dumps({"id": "req-7", "inputs": [images]}).encode()
        raw, headers = head + data, {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream"}  # fmt: skip
    status, answer = _raw_post(server, "/v2/models/classifier/infer", raw, headers)
    assert status == 200, answer
    assert ("id" in answer) == (shape != "no id") and answer.get("id", "req-7") == "req-7"
    labels = next(o for o in answer["outputs"] if o["name"] == "labels")
    assert labels["shape"][0] == 2
    assert labels["data"][0] == top1(trained_run, sample["star"])


def test_nobody_can_unload_the_model_on_kserve(server: Server, sample: dict[str, bytes]) -> None:
    """KServe's model-repository verbs (load, unload) are off: over REST (404, naming the flag that turns them on)
    and over gRPC; the model answers after each attempt."""
    if server.server != "kserve":
        pytest.skip("KServe's server only: TorchServe's management API is on its own port, loopback and keyed")
    import asyncio

    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    for verb in ("unload", "load"):
        status, answer = _raw_post(server, f"/v2/repository/models/classifier/{verb}", b"", {})
        assert status == 404 and "--enable-repository-verbs" in answer["error"], answer
    grpc_port = next(v.split("=")[1] for v in server.make_vars if v.startswith("KSERVE_GRPC_PORT="))

    async def unload() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="classifier"))  # fmt: skip

    with pytest.raises(grpc.aio.AioRpcError, match="repository verbs are off"):
        asyncio.run(unload())
    assert json.loads(call(f"http://127.0.0.1:{server.port}/v2/models/classifier/ready", "")[1])["ready"] is True
    assert server.post(sample["star"])[0] == 200


def test_a_stalled_body_is_answered_408_on_kserve(server: Server, sample: dict[str, bytes]) -> None:
    """A client that sends half its body and stalls: 408 once the deadline passes (BODY_TIMEOUT), its connection
    closed; the server answers others meanwhile. (TorchServe's frontend waits on such a client: docs/deploy.md.)"""
    if server.server != "kserve":
        pytest.skip("KServe's server only: TorchServe's frontend has no body deadline")
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT + 30) as s:
        head = f"POST /predictions/classifier HTTP/1.1\r\nHost: x\r\nContent-Length: {len(sample['star'])}\r\n\r\n"
        s.sendall(head.encode() + sample["star"][:100])
        start = time.monotonic()
        assert server.post(sample["cross"])[0] == 200  # the stalled one holds nothing up
        answer = b""
        while chunk := s.recv(65536):  # headers and body may come apart; the server closes after it
            answer += chunk
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within" in answer, answer[:200]
    assert waited < BODY_TIMEOUT + 10
    print(f"stalled body answered 408 after {waited:.1f} s")


def test_v2_over_grpc_takes_raw_bytes(server: Server, sample: dict[str, bytes], trained_run: Path) -> None:
    """KServe's server over gRPC: the image's bytes as they are (raw_input_contents), the same answer."""
    if server.server != "kserve":
        pytest.skip("KServe's server only: TorchServe's gRPC API is its own, not the Open Inference Protocol")
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    grpc_port = next(v.split("=")[1] for v in server.make_vars if v.startswith("KSERVE_GRPC_PORT="))

    async def infer() -> object:
        client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}")
        images = InferInput("images", [1], "BYTES")
        images.set_data_from_numpy(np.array([sample["circle"]], dtype=np.object_), binary_data=True)
        try:
            return await client.infer(InferRequest("classifier", [images], request_id="g-1", parameters={"topk": 2}))
        finally:
            await client.close()

    response = asyncio.run(infer())
    labels = next(o for o in response.outputs if o.name == "labels")  # type: ignore[attr-defined]
    assert response.id == "g-1" and list(labels.shape) == [1, 2]  # type: ignore[attr-defined]
    assert labels.as_numpy().ravel()[0] in (
        top1(trained_run, sample["circle"]),
        top1(trained_run, sample["circle"]).encode(),
    )


def test_v1_explain_verb_answers_a_heatmap(server: Server, sample: dict[str, bytes], trained_run: Path) -> None:
    """KServe's explain verb, POST /v1/models/<name>:explain with the image as the body, on both servers (with an
    image content type: KServe's v1 reads application/octet-stream as JSON)."""
    url = f"http://127.0.0.1:{server.port}/v1/models/{server.explain_model}:explain"  # the explanations' own name
    status, raw = call(url, server.key, sample["square"], "image/png", headers={"X-Method": "layer_gradcam"})
    assert status == 200, raw[:300]
    answer = json.loads(raw)
    assert answer["method"] == "layer_gradcam" and answer["heatmap_png_base64"]
    assert answer["predicted"] == top1(trained_run, sample["square"])


def test_readiness_means_the_model_answered_and_needs_no_key(server: Server) -> None:
    """KServe's server: the protocol's health and metadata endpoints, no key. TorchServe: its frontend checks the
    key on every path of the inference port and has no /v2/health routes, so the probe is the project's client run
    inside the pod (the management key read from the server's folder); both say ready only after the warm-up."""
    ready = subprocess.run([sys.executable, "-m", "visionapp.client.api", "ready", "--server", server.server,
                            "--port", str(server.port), "--management-port", str(server.management_port),
                            "--dir", str(server.dir)], timeout=60)  # fmt: skip
    assert ready.returncode == 0
    if server.server == "torchserve":
        assert "warm-up prediction answered" in (server.dir / "model_log.log").read_text()
        return
    base = f"http://127.0.0.1:{server.port}"
    assert json.loads(call(f"{base}/v2/health/live", "")[1]) == {"live": True}
    assert json.loads(call(f"{base}/v2/health/ready", "")[1]) == {"ready": True}
    assert json.loads(call(f"{base}/v2/models/classifier/ready", "")[1])["ready"] is True
    status, raw = call(f"{base}/v2/models/classifier", "")
    metadata = json.loads(raw)
    assert status == 200 and [i["name"] for i in metadata["inputs"]] == ["images"]
    assert {o["name"] for o in metadata["outputs"]} == {"labels", "probabilities", "ood_score", "ood"}
    assert "warm-up prediction answered" in (server.dir / "kserve.out").read_text()


# --- every image Pillow can open is served ---------------------------------------------------------------------
def _formats(png: bytes) -> dict[str, bytes]:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    gray16 = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    frames = [img, img.rotate(90)]
    return {
        "jpeg": _encode(img, "JPEG"),
        "jpeg_cmyk": _encode(img.convert("CMYK"), "JPEG"),
        "jpeg_exif_rotated": _encode(img, "JPEG", exif=exif),
        "png_gray": _encode(img.convert("L"), "PNG"),
        "png_16bit": _encode(gray16, "PNG"),
        "png_palette": _encode(img.convert("P"), "PNG"),
        "png_rgba": _encode(img.convert("RGBA"), "PNG"),
        "gif_animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": _encode(img, "WEBP"),
        "bmp": _encode(img, "BMP"),
        "tiff": _encode(img, "TIFF"),
        "one_pixel": _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "elongated": _encode(img.resize((2000, 3)), "PNG"),
    }


def test_every_image_kind_is_served(server: Server, sample: dict[str, bytes]) -> None:
    for name, raw in _formats(sample["star"]).items():
        status, answer = server.post(raw)
        assert status == 200, (name, answer)
        assert isinstance(answer, dict) and len(answer) == 5, name


def _huge_images() -> dict[str, bytes]:
    """What a batch of allowed images can hold: 6000 x 6000 16-bit grey PNGs (36 MP each, under the 40 MP a
    decode may reach) and 10,000 x 10,000 JPEGs (100 MP: the whole of maxPixelsPerRequest), each well under the
    10 MiB a body may have."""
    side = 6000
    grey16 = Image.fromarray((np.add.outer(np.arange(side), np.arange(side)) * 5).astype(np.uint16))
    photo = Image.linear_gradient("L").resize((10_000, 10_000)).convert("RGB")
    return {"png_16bit_36MP": _encode(grey16, "PNG"), "jpeg_100MP": _encode(photo, "JPEG", quality=50)}


def _peak_growth(process: psutil.Process, request: Callable[[], T], times: int) -> tuple[list[T], int]:
    """`request` sent `times` at once, the answers, and how far the process's resident memory rose above where it
    was before (sampled every 20 ms)."""
    before, peak, done = process.memory_info().rss, [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(times) as pool:
            answers = [f.result() for f in [pool.submit(request) for _ in range(times)]]
    finally:
        done.set()
        watcher.join()
    return answers, peak[0] - before


def test_a_batch_of_huge_images_is_answered_in_bounded_memory(server: Server, sample: dict[str, bytes]) -> None:
    """Eight such images at once, each answered 200 (the decode keeps what the model's input needs, the 16-bit
    one through a lookup table, the JPEG at an eighth a side); the worker's memory growth is printed for
    docs/deploy.md, never asserted (it depends on the allocator and the machine)."""
    worker = server.model_process()
    for name, raw in _huge_images().items():
        answers, growth = _peak_growth(worker, partial(server.post, raw), times=8)
        assert [status for status, _ in answers] == [200] * 8, (name, answers[0])
        print(f"{server.server} {name} x 8: worker memory grew {growth / 1e6:.0f} MB at its peak")
    assert server.post(sample["star"])[0] == 200


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert load_image(_encode(img, "JPEG", exif=exif)).size == (10, 40)


# --- bad inputs: a 4xx JSON error that names the problem, and the worker carries on ----------------------------
def _bomb() -> bytes:
    return _encode(Image.new("1", (10_000, 10_000)), "PNG")  # ~12 kB that decodes to 100 megapixels


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n"


@pytest.mark.parametrize(
    ("name", "body", "status", "words"),
    [
        ("empty", lambda s: b"", 400, "empty body"),
        ("not an image", lambda s: b"hello, this is text", 400, "not an image"),
        ("truncated", lambda s: s["star"][: len(s["star"]) // 3], 400, "truncated or corrupt"),
        ("bad base64", None, 400, "base64"),
        ("decompression bomb", lambda s: _bomb(), 413, "too large"),
        ("EPS (runs Ghostscript)", lambda s: _eps(), 400, "not an image in a format this server reads"),
    ],
)
def test_bad_input_gets_a_4xx_that_names_it(
    server: Server, sample: dict[str, bytes], name, body, status, words
) -> None:
    if body is None:
        got, answer = server.post(b'{"data": "***not base64***"}', content_type="application/json")
    else:
        got, answer = server.post(body(sample))
    assert got == status, (name, answer)
    assert words.lower() in json.dumps(answer).lower()
    ok, _ = server.post(sample["cross"])  # the next good request succeeds
    assert ok == 200


def test_body_over_the_size_limit_gets_413(server: Server, sample: dict[str, bytes]) -> None:
    # Both servers refuse it from the Content-Length alone (10 MiB: TorchServe's max_request_size, the KServe
    # adapter's own check), before any byte of the body is read; curl -T sends the same Expect: 100-continue.
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.putrequest("POST", "/predictions/classifier")
    conn.putheader("Authorization", f"Bearer {server.key}")
    conn.putheader("Content-Length", str(11 * 1024 * 1024))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert server.post(sample["cross"])[0] == 200


def test_requests_without_or_with_a_wrong_token_are_refused(server: Server, sample: dict[str, bytes]) -> None:
    torchserve_only(server, "KServe's server has no token authorisation; it listens on loopback only")
    url = server.url()
    status, raw = call(url, "", sample["star"])
    assert status in (400, 401) and b"Token Authorization failed" in raw
    status, raw = call(url, "wrong-key", sample["star"])
    assert status in (400, 401) and b"Token Authorization failed" in raw


# --- explanations ----------------------------------------------------------------------------------------------
def test_explanation_returns_class_probability_and_heatmap(server: Server, sample: dict[str, bytes]) -> None:
    status, answer = server.post(sample["triangle"], endpoint="explanations", headers={"X-Method": "layer_gradcam"})
    assert status == 200, answer
    assert answer["method"] == "layer_gradcam" and answer["class"] == answer["predicted"]  # type: ignore[index]
    png = Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png_base64"])))  # type: ignore[index]
    assert png.size == Image.open(io.BytesIO(sample["triangle"])).size
    status, answer = server.post(
        sample["triangle"], endpoint="explanations", headers={"X-Target": "circle", "X-Method": "occlusion"}
    )
    assert status == 200 and answer["class"] == "circle"  # type: ignore[index]
    status, answer = server.post(sample["triangle"], endpoint="explanations", headers={"X-Target": "hexagon"})
    assert status == 400 and "circle, cross, square, star, triangle" in answer["message"]  # type: ignore[index]
    status, answer = server.post(sample["triangle"], endpoint="explanations", headers={"X-Method": "lime"})
    assert status == 400 and "integrated_gradients" in answer["message"]  # type: ignore[index]


def _photo(width: int, height: int) -> bytes:
    """A camera-sized JPEG: a shaded background with a star on it (1-2 MB at 24 megapixels)."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([0.3 + 0.5 * x + 0 * y, 0.4 + 0.4 * y + 0 * x, 0.7 - 0.3 * x * y], axis=2) * 255
    img = Image.fromarray(pixels.astype(np.uint8))
    from PIL import ImageDraw

    cx, cy, r = width / 2, height / 2, height / 3
    points = [(cx + (r if i % 2 == 0 else r / 2.5) * np.sin(i * np.pi / 5),
               cy - (r if i % 2 == 0 else r / 2.5) * np.cos(i * np.pi / 5)) for i in range(10)]  # fmt: skip
    ImageDraw.Draw(img).polygon(points, fill=(240, 200, 20))
    return _encode(img, "JPEG", quality=85)


def test_a_camera_sized_photo_is_explained_at_a_bounded_cost(server: Server) -> None:
    """24 megapixels explained: the overlay comes back at most maxHeatmapPixels (aspect kept, size said), the answer
    stays small and the worker's memory grows by less than 500 MB."""
    photo = _photo(6000, 4000)
    worker = server.model_process(explanations=True)
    server.post(photo, endpoint="explanations", headers={"X-Method": "layer_gradcam"})  # the first allocates once
    before = worker.memory_info().rss
    status, raw = call(server.url("explanations"), server.key, photo, headers={"X-Method": "integrated_gradients"})
    grown = worker.memory_info().rss - before
    assert status == 200, raw[:300]
    answer = json.loads(raw)
    width, height = answer["heatmap_size"]
    png = Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png_base64"])))
    assert png.size == (width, height) and width * height <= 500_000 and abs(width / height - 1.5) < 0.01
    assert len(raw) < 2_000_000, len(raw)
    assert grown < 500e6, f"the worker grew by {grown / 1e6:.0f} MB"
    assert server.processes() and worker.is_running()


def test_logs_keep_access_and_metrics_without_per_request_chatter(server: Server, sample: dict[str, bytes]) -> None:
    """serve/log4j2.xml (passed by make serve): every request in access_log.log, once; the metrics on /metrics;
    ts_log.log holds start-up and warnings, not TorchServe's per-batch scheduling lines (its default config logs
    ~20 per request, each written twice); the console (torchserve.out for make serve-bg) shows the handler's own
    log but not the worker's per-batch line."""
    torchserve_only(server, "its log4j2 configuration")
    access = server.dir / "access_log.log"
    before = access.read_text().count("POST /predictions/classifier") if access.exists() else 0
    for _ in range(3):
        assert server.post(sample["star"])[0] == 200
    time.sleep(1)  # the worker's metric lines reach the frontend through its stdout reader
    assert access.read_text().count("POST /predictions/classifier") == before + 3
    assert any(n == "HandlerTime" for n, _ in scrape(server))  # metrics: on /metrics (Prometheus mode), not a log
    ts_log = (server.dir / "ts_log.log").read_text()
    assert "Model classifier loaded" in ts_log and ts_log.count("Torchserve version") == 1
    for chatter in ("Flushing req.cmd", "Sending response for jobId", "result=[METRICS]", "ACCESS_LOG"):
        assert chatter not in ts_log, chatter
    console = (server.dir / "torchserve.out").read_text()
    assert "with classes" in console and "Backend received inference" not in console
    assert f"on cpu, torch threads: {worker_threads(1)}" in console  # one worker: every core it may use
    assert "Backend received inference" in (server.dir / "model_log.log").read_text()


# --- Prometheus metrics ----------------------------------------------------------------------------------------
def test_prometheus_metrics_count_what_was_served(server: Server, sample: dict[str, bytes]) -> None:
    """TorchServe's own queue and request counters (the autoscaling signal) and the handler's metrics
    (serve/metrics.yaml) move by exactly what this test sends."""

    def m(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        # explanations are served (and labelled) under their own model name, on both servers
        explained = name.startswith("ExplanationSeconds") or ("Endpoint", "explanations") in labels
        model = {("ModelName", server.explain_model if explained else "classifier"), ("Level", "Model")}
        return scrape(server).get((name, frozenset(model | set(labels))), 0.0)

    predictions, explained = (("Endpoint", "predictions"),), (("Method", "layer_gradcam"),)
    # the same names and labels on both servers
    series = [("ImagesPerRequest_count", predictions), ("ImagesPerRequest_sum", predictions),
              ("ExplanationSeconds_count", explained), ("ExplanationSeconds_sum", explained),
              ("BadInputs_total", (("Kind", "not_an_image"),)), ("BadInputs_total", (("Kind", "bad_option"),)),
              *[("Predictions_total", (("Class", c),)) for c in sample]]  # fmt: skip
    before = {k: m(*k) for k in series}
    torchserve = server.server == "torchserve"
    requests_before = sum(v for (n, _), v in scrape(server).items() if n == "ts_inference_requests_total")

    top1 = []
    images = [base64.b64encode(sample[c]).decode() for c in ("star", "cross")]
    for body, content_type in ((sample["star"], "application/octet-stream"),
                               (json.dumps({"images": images}).encode(), "application/json")):  # fmt: skip
        status, answer = server.post(body, content_type=content_type)
        assert status == 200, answer
        top1 += [next(iter(a)) for a in (answer if isinstance(answer, list) else [answer])]  # answers sort by p
    assert server.post(sample["star"], headers={"X-Topk": "99"})[0] == 400  # parsed (1 image), then refused
    assert server.post(b"not an image")[0] == 400
    status, _ = server.post(sample["circle"], endpoint="explanations", headers={"X-Method": "layer_gradcam"})
    assert status == 200

    expected = dict(zip(series, [3, 4, 1, None, 1, 1, *(top1.count(c) for c in sample)], strict=True))
    deadline = time.monotonic() + 20  # the worker's metric lines reach the frontend through its stdout reader
    while True:
        got = {k: m(*k) - before[k] for k in series}
        counted = {k: v for k, v in got.items() if expected[k] is not None}
        if counted == {k: v for k, v in expected.items() if v is not None} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == {k: v for k, v in expected.items() if v is not None}
    assert got[("ExplanationSeconds_sum", explained)] > 0  # seconds spent explaining
    samples = scrape(server)
    if torchserve:
        requests = sum(v for (n, _), v in samples.items() if n == "ts_inference_requests_total")
        assert requests - requests_before == 5  # every request the frontend answered, 4xx included
        assert any(n.startswith("ts_queue_latency_microseconds") for n, _ in samples)  # the HPA signal


# --- load and faults -------------------------------------------------------------------------------------------
def test_make_predict_as_the_readme_gives_it(server: Server, sample: dict[str, bytes], tmp_path: Path) -> None:
    """`make predict IMG=... [EXPLAIN=1 TARGET=...]`: the client finds the key itself; the heatmap is written
    to <image name>_heatmap.png in the working directory."""
    image = tmp_path / "visionapp-test-star.png"
    image.write_bytes(sample["star"])
    heatmap = ROOT / "visionapp-test-star_heatmap.png"
    make = ["make", "-s", "predict", f"IMG={image}", *server.make_vars]
    try:
        out = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "HTTP 200" in out.stdout, out.stdout + out.stderr
        explain = [*make, "EXPLAIN=1", "TARGET=circle"]
        out = subprocess.run(explain, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and '"class": "circle"' in out.stdout, out.stdout + out.stderr
        assert Image.open(heatmap).size == Image.open(image).size
    finally:
        heatmap.unlink(missing_ok=True)


def test_make_describe_names_what_is_served_and_its_model_card(server: Server, trained_run: Path) -> None:
    """make describe: TorchServe's customized describe (its management API) or GET /models/<name> on KServe's
    server: the model, its version (the run's name), the form answering, the OOD threshold, then the model card."""
    out = subprocess.run(["make", "-s", "describe", *server.make_vars], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    head, card = out.stdout.split("\n}\n", 1)
    about = json.loads(head + "}")
    bundle = load_bundle(trained_run / "bundle")
    assert about["model"] == "classifier" and about["version"] == trained_run.resolve().name
    assert about["classes"] == bundle.class_names and about["arch"] == bundle.meta["arch"]
    assert bundle.ood is not None and about["ood"] == {"method": bundle.ood.method, "threshold": bundle.ood.threshold}
    assert card.strip() == (trained_run / "bundle" / CARD_FILE).read_text().strip()


def test_load_with_a_worker_killed_midway(server: Server, sample: dict[str, bytes]) -> None:
    torchserve_only(server, "KServe's server runs the model in its own process, which Kubernetes restarts")
    url = server.url()
    warm = run_load(url, server.key, sample["star"], requests=48, concurrency=16, max_seconds=60)
    assert warm["ok"] == 48, warm
    worker = next(p for p in server.processes() if "model_service_worker" in " ".join(p.cmdline()))
    os.kill(worker.pid, signal.SIGKILL)
    during = run_load(url, server.key, sample["star"], requests=32, concurrency=16, max_seconds=60)
    assert during["answered"] == 32, during  # every request gets an HTTP answer, even if an error
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and server.post(sample["star"])[0] != 200:
        time.sleep(1)
    after = run_load(url, server.key, sample["star"], requests=32, concurrency=16, max_seconds=60)
    assert after["ok"] == 32, after
    assert worker.pid not in [p.pid for p in server.processes()]  # a new worker answered


# --- the .mar packs the model config it is given --------------------------------------------------------------
def test_archive_packs_the_model_config_it_is_given(trained_run: Path, tmp_path: Path) -> None:
    config = tmp_path / "my-config.yaml"
    config.write_text("batchSize: 4\nmaxBatchDelay: 5\n")
    mar = build_archive(trained_run / "bundle", out=tmp_path / "store", model_config=config)
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert yaml.safe_load(z.read(manifest["model"]["configFile"])) == {"batchSize": 4, "maxBatchDelay": 5}


@pytest.mark.parametrize(
    "text, message", [(None, "is missing"), ("batchSize: [8", "not valid YAML"), ("- 8\n", "must be a YAML mapping")]
)
def test_archive_names_a_bad_model_config(trained_run: Path, tmp_path: Path, text: str | None, message: str) -> None:
    config = tmp_path / "bad.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as e:
        build_archive(trained_run / "bundle", out=tmp_path / "store", model_config=config)
    assert str(config) in str(e.value)
    assert not (tmp_path / "store" / "classifier.mar").exists()


def test_make_archive_works_from_a_non_editable_install(trained_run: Path, tmp_path: Path) -> None:
    """`pip install .` (no checkout on the path) then `make archive`: the handler and the serving code come from
    the installed package, the model config from the path the Makefile gives; a run without forms is exported
    first (here its ONNX form only), and the form travels in the .mar."""
    site_dir = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site_dir), str(ROOT)]
    assert subprocess.run(pip, capture_output=True, text=True, timeout=600).returncode == 0
    (site_dir / "visionapp" / "serve" / "INSTALLED").write_text("the non-editable copy")  # travels if it is used
    env = {**os.environ, "PYTHONPATH": str(site_dir)}
    where = subprocess.run([sys.executable, "-c", "import visionapp; print(visionapp.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(site_dir))
    run = tmp_path / "run"  # a copy: the export writes into the bundle
    shutil.copytree(trained_run / "bundle", run / "bundle")
    make = ["make", "-s", "archive", f"RUN={run}", f"MODEL_STORE={tmp_path / 'store'}", "EXPORT_ARGS=--forms onnx"]
    proc = subprocess.run(make, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "store" / "classifier.mar") as z:
        names = set(z.namelist())
    assert {"handler.py", "model.json", "visionapp/serve/handler.py", "visionapp/bundle.py", "model.onnx"} <= names
    assert "visionapp/forms.py" in names and "MODEL_CARD.md" in names  # the card travels with the model
    assert "visionapp/serve/INSTALLED" in names  # packed from the installed copy, not from the checkout
    assert not any(n.startswith("visionapp/train/") for n in names)  # the training stack stays out


# --- the .mar is self-contained ----------------------------------------------------------------------------------
def test_mar_serves_where_the_project_is_not_installed(
    model_store: Path, sample: dict[str, bytes], tmp_path: Path
) -> None:
    # A venv that sees this venv's packages (torch, torchvision, Pillow, captum, torchserve) through a plain
    # path entry, which does not run their .pth files: the editable install of visionapp is invisible there.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    bare_site = next((bare / "lib").glob("python*/site-packages"))
    (bare_site / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    python = str(bare / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch, torchvision, PIL, captum, ts"]).returncode == 0
    assert subprocess.run([python, "-c", "import visionapp"], capture_output=True).returncode != 0
    # TorchServe runs its workers with the Python that runs the torchserve launcher: launch it with the bare one.
    launcher = bare / "bin" / "torchserve"
    launcher.write_text(f"#!{python}\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n")
    launcher.chmod(0o755)
    s = start_server(model_store, tmp_path / "serve", f"TORCHSERVE={launcher}")
    try:
        status, answer = s.post(sample["square"])
        assert status == 200 and len(answer) == 5  # type: ignore[arg-type]
        status, _ = s.post(sample["square"], endpoint="explanations", headers={"X-Method": "layer_gradcam"})
        assert status == 200
        worker = next(p for p in s.processes() if "model_service_worker" in " ".join(p.cmdline()))
        assert worker.cmdline()[0] == python
    finally:
        stop_server(s)
