"""Serving that holds up, against the real servers: mixed batches answered by kind, bounded work per request,
each request failing alone, hostile option values, keys renewed after they expire, never a stale model, no server
left behind. The tests that take `gathering` run against TorchServe and KServe's model server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from helpers import EXPLAIN_CONFIG, ROOT, TINY_DATA, fit, post_with_headers, real_server, sample_image, scrape
from PIL import Image

from visionapp.bundle import load_bundle
from visionapp.client.api import call, keys
from visionapp.deploy.archive import build_archive
from visionapp.deploy.local import LocalServer

pytestmark = pytest.mark.slow

# Requests gather for up to 1.5 s, so those sent together share a batch; and small limits, to test each.
GATHERING_CONFIG = """minWorkers: 1
maxWorkers: 1
batchSize: 8
maxBatchDelay: 1500
responseTimeout: 120
handler:
  maxImagesPerPrediction: 3
  maxImagesPerExplanation: 1
  maxPixelsPerRequest: 20000
"""
# The explanations' own service (the shipped config) with the same small limits
GATHERING_EXPLAIN_CONFIG = (
    EXPLAIN_CONFIG.read_text()
    .replace("maxImagesPerExplanation: 4", "maxImagesPerExplanation: 1")
    .replace("maxPixelsPerRequest: 100000000", "maxPixelsPerRequest: 20000")
)


@pytest.fixture(scope="module", params=["torchserve", "kserve"])
def gathering(
    request: pytest.FixtureRequest, trained_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """Each server with the small limits above; both batch by the config's batchSize and maxBatchDelay."""
    with real_server(request.param, trained_run, tmp_path_factory.mktemp("gathering"), model_config=GATHERING_CONFIG,
                     explain_config=GATHERING_EXPLAIN_CONFIG) as server:  # fmt: skip
        yield server


def _model_pids(server: LocalServer) -> set[int]:
    """TorchServe's worker processes, or KServe's server process: the same set after a request means it lived."""
    return {p.pid for p in server.processes() if server.server == "kserve" or "ts.sock" in " ".join(p.info["cmdline"])}


def _together(server: LocalServer, requests: list[tuple[str, bytes, str, dict[str, str]]]) -> list[tuple[int, object]]:
    """Send all at once (they share a batch: the server gathers for 1.5 s); answers in the same order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [
            pool.submit(server.post, body, endpoint, ctype, headers) for endpoint, body, ctype, headers in requests
        ]
        return [f.result() for f in futures]


def test_explanations_sent_with_predictions_are_answered_by_their_own_workers(
    gathering: LocalServer, trained_run: Path
) -> None:
    """Predictions and an explanation sent together: each answered by its kind, the explanation by the
    explanations' own model (TorchServe: its own registration and worker), the predictions batched together."""
    image = sample_image(trained_run)
    explanation = ("explanations", image, "application/octet-stream", {"X-Method": "layer_gradcam"})
    prediction = ("predictions", image, "application/octet-stream", {})
    answers = _together(gathering, [prediction, prediction, explanation, prediction, prediction, prediction])
    assert all(status == 200 for status, _ in answers), answers
    for i, (_, answer) in enumerate(answers):
        assert isinstance(answer, dict)
        if i == 2:
            assert "heatmap_png_base64" in answer and answer["method"] == "layer_gradcam"
        else:
            assert "heatmap_png_base64" not in answer
            assert set(answer) <= {"circle", "cross", "square", "star", "triangle"}
    if gathering.server == "torchserve":  # never in the predictions' batches any more
        assert "mixed batch" not in (gathering.dir / "model_log.log").read_text()


def test_the_old_explanations_path_names_the_new_one(gathering: LocalServer, trained_run: Path) -> None:
    if gathering.server != "torchserve":
        pytest.skip("KServe's server answers explanations under both names")
    status, raw = call(f"http://127.0.0.1:{gathering.port}/explanations/classifier", gathering.key,
                       sample_image(trained_run))  # fmt: skip
    answer = json.loads(raw)
    assert status == 308 and "/explanations/classifier-explain" in answer["message"], answer


def test_odd_requests_fail_alone_in_their_batch(gathering: LocalServer, trained_run: Path) -> None:
    image = sample_image(trained_run)
    good = ("predictions", image, "application/octet-stream", {})
    odd = [
        ("predictions", body.encode(), "application/json", {}) for body in ("null", "1.5", "[1, 2]", '{"images": 5}')
    ]
    odd.append(("predictions", b"not an image", "application/octet-stream", {}))
    deep = b'{"data": ' + b"[" * 100_000  # deeper than any JSON parser recurses: TorchServe hands it on as bytes
    odd += [("predictions", deep, ctype, {}) for ctype in ("application/json", "text/plain")]
    answers = _together(gathering, [good, *odd, good])
    assert answers[0][0] == 200 and answers[-1][0] == 200, answers
    for status, answer in answers[1:-1]:
        assert status == 400 and answer["type"] == "BadInput", (status, answer)  # type: ignore[index]


def test_a_mixed_batch_answers_each_request_as_in_process(gathering: LocalServer, trained_run: Path) -> None:
    """Eight different images sent together share one batch (1.5 s gathering) on both servers: each answer and its
    out-of-distribution flag equal the in-process answer for that image alone; KServe's server counts the batch."""
    files = sorted((Path(json.loads((trained_run / "metrics.json").read_text())["data_root"]) / "test").rglob("*.png"))
    files = files[:: max(1, len(files) // 8)][:8]
    before = _batches(gathering)
    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(lambda f: post_with_headers(gathering, f.read_bytes()), files))
    bundle = load_bundle(trained_run / "bundle", runtime="auto")
    for f, (status, headers, answer) in zip(files, answers, strict=True):
        with torch.no_grad():
            probs, _, flags = bundle.answer(bundle.transform.load(f)[None])
        assert status == 200 and flags is not None
        expected = dict(zip(bundle.class_names, probs[0].tolist(), strict=True))
        for name, value in answer.items():  # type: ignore[union-attr]
            assert value == pytest.approx(expected[name], abs=1e-4), f
        assert headers["x-ood"] == ("true" if flags[0] else "false")
    if gathering.server == "kserve":  # one forward pass (or two, where the eighth came after the first ran)
        assert 1 <= _batches(gathering) - before <= 2


def _batches(server: LocalServer) -> float:
    """KServe's server's forward passes so far (its BatchesRun counter); TorchServe logs its batches instead."""
    if server.server != "kserve":
        return 0
    return sum(v for (name, _), v in scrape(server).items() if name == "BatchesRun_total")


def test_kserve_answers_probes_while_a_batch_is_gathered_and_run(gathering: LocalServer, trained_run: Path) -> None:
    """Readiness, health, metadata and /metrics are answered while predictions wait for their batch: the event
    loop hands predictions to the inference thread and never runs a forward pass itself."""
    if gathering.server != "kserve":
        pytest.skip("TorchServe's frontend answers its probes on its own threads")
    image = sample_image(trained_run)
    base = f"http://127.0.0.1:{gathering.port}"
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(gathering.post, image) for _ in range(4)]
        time.sleep(0.3)  # sent, and gathering for 1.5 s
        for path in ("/v2/models/classifier/ready", "/v2/health/live", "/v2/models/classifier", "/metrics"):
            assert call(base + path, "")[0] == 200, path
        assert not any(f.done() for f in pending)  # answered before any prediction was
        assert all(f.result()[0] == 200 for f in pending)


def test_limits_per_request_are_413_naming_the_limit(gathering: LocalServer, trained_run: Path) -> None:
    image = base64.b64encode(sample_image(trained_run)).decode()
    four = json.dumps({"images": [image] * 4}).encode()
    status, answer = gathering.post(four, content_type="application/json")
    assert status == 413 and "maxImagesPerPrediction" in answer["message"], answer  # type: ignore[index]
    two = json.dumps({"images": [image] * 2}).encode()
    status, answer = gathering.post(two, "explanations", content_type="application/json")
    assert status == 413 and "maxImagesPerExplanation" in answer["message"], answer  # type: ignore[index]
    big = json.dumps({"images": [image] * 3}).encode()  # 3 x 4096 pixels fit the 20,000 budget ...
    assert gathering.post(big, content_type="application/json")[0] == 200
    buf = io.BytesIO()
    Image.new("RGB", (200, 120)).save(buf, format="PNG")  # ... 24,000 pixels do not: refused before decoding
    status, answer = gathering.post(buf.getvalue())
    assert status == 413 and "maxPixelsPerRequest" in answer["message"], answer  # type: ignore[index]
    assert gathering.post(sample_image(trained_run))[0] == 200  # and the next request is served


def test_expired_keys_are_renewed_by_the_client(trained_run: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    text = (ROOT / "serve" / "config.properties").read_text()
    # 6 s: the keys expire while the model loads, and make serve-bg still sees it ready (it renews its key)
    config.write_text(text.replace("token_expiration_min=60", "token_expiration_min=0.1"))
    build_archive(trained_run / "bundle", out=tmp_path / "store", model_config=ROOT / "serve" / "model-config.yaml")
    image = tmp_path / "star.png"
    image.write_bytes(sample_image(trained_run))
    with LocalServer(tmp_path / "store", tmp_path / "serve", "classifier", f"TS_CONFIG={config}") as server:
        predict = ["make", "-s", "predict", f"IMG={image}", *server.make_vars]
        first = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0 and "HTTP 200" in first.stdout, first.stdout + first.stderr
        old_key = server.key
        time.sleep(8)
        status, body = call(server.url(), old_key, image.read_bytes())
        assert 400 <= status < 500 and b"InvalidKey" in body, (status, body)  # the old key is refused
        again = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "HTTP 200" in again.stdout, again.stdout + again.stderr
        assert keys(server.dir)["inference"]["key"] != old_key


def _served_version(server: LocalServer) -> str:
    status, body = call(server.url("models", management=True), keys(server.dir)["management"]["key"])
    assert status == 200, body
    return json.loads(body)[0]["modelVersion"]


def test_a_new_run_is_served_not_the_old_archive(tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    tiny = [  # a data set of its own, a tenth of the shared one: two fits' passes over it stay short
        "--config=configs/train.yaml",
        f"--data.init_args.root={tmp_path / 'shapes'}",
        *TINY_DATA,
        "--data.init_args.num_train=150",
        "--data.init_args.num_val=30",
        "--data.init_args.num_test=30",
        "--trainer.fast_dev_run=true",
    ]
    fit(runs, *tiny, "--run_name=first")
    onnx = "EXPORT_ARGS=--forms onnx"  # make archive exports a run without forms first: the quick form here
    archive = ["make", "-s", "archive", f"RUN={runs / 'latest'}", f"MODEL_STORE={store}", onnx]
    subprocess.run(archive, cwd=ROOT, check=True, capture_output=True, timeout=300)  # the first run's .mar
    second = fit(runs, *tiny, "--run_name=second")
    with LocalServer(store, tmp_path / "serve", "classifier", f"RUN={runs / 'latest'}", onnx) as server:
        assert _served_version(server) == second.name  # make serve-bg rebuilt the archive: runs/latest moved


def test_a_failed_start_leaves_no_server_behind(trained_run: Path, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text("minWorkers: 1\nmaxWorkers: 1\nhandler:\n  maxImagesPerPredicton: 3\n")  # a typo: no worker
    build_archive(trained_run / "bundle", out=tmp_path / "store", model_config=config)
    server = LocalServer(tmp_path / "store", tmp_path / "serve", "classifier", "WAIT_TIMEOUT=10")
    with pytest.raises(subprocess.CalledProcessError):
        server.start()
    time.sleep(2)
    assert not server.processes(), server.processes()
    assert "maxImagesPerPredicton" in (tmp_path / "serve" / "model_log.log").read_text()  # the reason, logged
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


# Option values as clients and proxies really send them: Latin-1, invalid UTF-8, control characters, very long.
HOSTILE_OPTIONS = [
    ("predictions", "X-Topk", "\xe9", "topk"),  # curl -H "X-Topk: $(printf '\xe9')": one byte killed the worker
    ("explanations", "X-Target", "\xe9" * 300, "class"),  # held the worker until the response timeout
    ("predictions", "X-Topk", "\xff\xfe\x80", "topk"),  # not UTF-8
    ("predictions", "X-Topk", "9" * 5000, "topk"),  # was echoed whole
    ("explanations", "X-Method", "a\x01\x1b[31m\x7fb", "method"),  # control characters
]


def test_no_option_header_can_hurt_the_worker(gathering: LocalServer, trained_run: Path) -> None:
    """Each hostile value, batched with ordinary predictions (the server gathers for 1.5 s), gets a short 400
    naming the option; the ordinary requests are answered and the worker is the same process after all of them."""
    image = sample_image(trained_run)
    workers = _model_pids(gathering)
    good = ("predictions", image, "application/octet-stream", {})
    for endpoint, header, value, option in HOSTILE_OPTIONS:
        if gathering.server == "kserve" and any(c < " " for c in value):
            # uvicorn's HTTP parser refuses control characters in a header value before any code of ours runs
            status, raw = call(gathering.url(endpoint), "", image, headers={header: value})
            assert status == 400 and b"Invalid HTTP request" in raw, (status, raw)
            continue
        answers = _together(gathering, [good, (endpoint, image, "application/octet-stream", {header: value}), good])
        assert answers[0][0] == 200 and answers[2][0] == 200, answers
        status, answer = answers[1]
        assert status == 400 and option in answer["message"], (header, answer)  # type: ignore[index]
        assert len(answer["message"]) < 300, answer  # type: ignore[index]  # the value cut, never echoed whole
    status, raw = call(gathering.url(), gathering.key, image, headers={"X-Topk": "1" * 8192})
    assert 400 <= status < 500, (status, raw[:200])  # 8 KB: refused by the frontend's header limit
    assert gathering.post(image)[0] == 200
    assert _model_pids(gathering) == workers, "a worker died and was restarted"
    if gathering.server == "torchserve":
        assert "Worker died" not in (gathering.dir / "ts_log.log").read_text()


def test_kserve_with_several_workers_is_refused_before_it_binds_anything(trained_run: Path) -> None:
    """--workers N would start uvicorn's multi-process server, which KServe creates apart from the address --host
    gives (every interface) and which cannot carry this model's explainer pool: refused at once, naming the way to
    scale instead."""
    import sys

    cmd = [sys.executable, "-m", "visionapp.serve.kserve_server", "--bundle", str(trained_run / "bundle"),
           "--model_name", "classifier", "--host", "127.0.0.1", "--enable_grpc", "false", "--workers", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--workers 2" in r.stderr and "replicas" in r.stderr, r.stderr[-2000:]
