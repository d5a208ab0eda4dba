"""Explanations apart from predictions, against each real server: predictions answered while explanations run
(their latency recorded, never asserted), a full explanation queue answered 503 at once while predictions still
answer 200, and the two queues told apart in the metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest
from helpers import EXPLAIN_CONFIG as EXPLAIN_CONFIG_FILE
from helpers import real_server, rendered, sample_image, scrape

from visionapp.client.api import call, keys
from visionapp.deploy.local import LocalServer

pytestmark = pytest.mark.slow

# The shipped explanations' config, with one explanation waiting at most: a third sent at once is refused.
EXPLAIN_CONFIG = EXPLAIN_CONFIG_FILE.read_text().replace("maxExplanationsWaiting: 4", "maxExplanationsWaiting: 1")
OCCLUSION = {"X-Method": "occlusion"}  # hundreds of model passes per image: the slowest method


@pytest.fixture(scope="module", params=["torchserve", "kserve"])
def apart(
    request: pytest.FixtureRequest, trained_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    assert "maxExplanationsWaiting: 1" in EXPLAIN_CONFIG
    with real_server(request.param, trained_run, tmp_path_factory.mktemp("apart"), explain_config=EXPLAIN_CONFIG) as s:
        yield s


def _timed(server: LocalServer, endpoint: str, image: bytes, headers: dict[str, str] | None = None) -> tuple:
    start = time.monotonic()
    status, raw = call(server.url(endpoint), server.key, image, headers=headers, timeout=300)
    return status, raw, time.monotonic() - start, time.monotonic()


def test_predictions_answer_while_explanations_run(apart: LocalServer, trained_run: Path) -> None:
    image = sample_image(trained_run)
    idle = [_timed(apart, "predictions", image)[2] for _ in range(10)]
    with ThreadPoolExecutor(6) as pool:
        explanations = [pool.submit(_timed, apart, "explanations", image, OCCLUSION) for _ in range(2)]
        time.sleep(0.3)
        during = [_timed(apart, "predictions", image) for _ in range(10)]
        answered = [f.result() for f in explanations]
    assert all(status == 200 for status, *_ in during), [d[:2] for d in during]
    assert all(status == 200 for status, *_ in answered), [a[:2] for a in answered]
    busy = [seconds for _, _, seconds, done in during if done < min(a[3] for a in answered)]
    print(f"\n{apart.server}: prediction p50 idle {sorted(idle)[5] * 1e3:.0f} ms; while 2 occlusion explanations "
          f"ran: {len(busy)} predictions, p50 {sorted(busy)[len(busy) // 2] * 1e3 if busy else float('nan'):.0f} ms; "
          f"explanations took {', '.join(f'{a[2]:.1f}' for a in answered)} s")  # fmt: skip


def test_a_full_explanation_queue_is_refused_at_once(apart: LocalServer, trained_run: Path) -> None:
    image = sample_image(trained_run)
    with ThreadPoolExecutor(8) as pool:
        explanations = [pool.submit(_timed, apart, "explanations", image, OCCLUSION) for _ in range(5)]
        time.sleep(0.5)
        prediction = _timed(apart, "predictions", image)
        results = [f.result() for f in explanations]
    assert prediction[0] == 200  # predictions are never refused for explanation load
    refused = [r for r in results if r[0] == 503]
    answered = [r for r in results if r[0] == 200]
    assert refused and answered and len(refused) + len(answered) == 5, [r[:2] for r in results]
    first_done = min(r[3] for r in answered)
    assert all(r[3] < first_done for r in refused), "a refusal waited for an explanation to finish"
    assert b"maxExplanationsWaiting" in refused[0][1]  # the message names the limit
    status, raw, _, _ = _timed(apart, "explanations", image, OCCLUSION)  # and once the queue drains, served again
    assert status == 200, raw[:200]


def test_the_two_queues_are_apart_in_the_metrics(apart: LocalServer, trained_run: Path) -> None:
    names = {(name, dict(labels).get("model_name") or dict(labels).get("ModelName")) for name, labels in scrape(apart)}
    if apart.server == "torchserve":  # queue latency per registration: the HPA's signal stays the predictions'
        queues = {model for name, model in names if name.startswith("ts_queue_latency_microseconds")}
        assert {"classifier", "classifier-explain"} <= queues, names
    else:  # predictions run on the event loop's thread: no queue of theirs to count
        assert ("ExplanationsInFlight", "classifier-explain") in names, names
    assert ("ExplanationsRefused_total", "classifier-explain") in names, names


def test_a_refusal_says_when_to_come_back(apart: LocalServer, trained_run: Path) -> None:
    import http.client

    image = sample_image(trained_run)

    def post() -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", apart.port, timeout=300)
        headers = {**OCCLUSION, "Authorization": f"Bearer {apart.key}"} if apart.key else OCCLUSION
        conn.request("POST", "/explanations/classifier-explain", body=image, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Retry-After")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post(), range(4)))
    refused = [retry for status, retry in results if status == 503]
    assert refused and all(retry is not None and int(retry) >= 1 for retry in refused), results


def _explain_workers(server: LocalServer) -> list[dict]:
    """TorchServe's management API's description of the explanations' registration: its workers, pid and status."""
    url = f"http://127.0.0.1:{server.management_port}/models/{server.explain_model}"
    status, body = call(url, keys(server.dir)["management"]["key"])
    assert status == 200, body
    return json.loads(body)[0]["workers"]


def _liveness_probe(server: LocalServer) -> int:
    """The Deployment's liveness probe, its own command, run against the local TorchServe: its management port
    here for the pod's 8081, and the management key sent (in the pod, tokens are off and loopback decides)."""
    command = rendered("k8s/deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]
    python, flag, code = command["command"]
    assert (python, flag) == ("python", "-c") and "127.0.0.1:8081" in code
    key = keys(server.dir)["management"]["key"]
    with_key = (f"import urllib.request as r; o = r.build_opener(); "
                f"o.addheaders = [('Authorization', 'Bearer {key}')]; r.install_opener(o)\n")  # fmt: skip
    code = with_key + code.replace("127.0.0.1:8081", f"127.0.0.1:{server.management_port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode


def test_a_dead_explainer_is_replaced(apart: LocalServer, trained_run: Path) -> None:
    """SIGKILL of the explanations' process (as an out-of-memory kill does). KServe's server says not ready, answers
    503 with Retry-After meanwhile, and explains again within 30 s. TorchServe restarts its worker itself, or its
    recovery fails and leaves it UNLOADING (pytorch/serve#2423, a race in its asynchronous worker thread): the test
    takes either, as the pod would: a new worker READY explains again; none, and the registration lists no READY
    worker, and the Deployment's liveness probe, its own command run here, fails (a new pod then). Predictions
    answer throughout."""
    image = sample_image(trained_run)
    if apart.server == "torchserve":
        assert _liveness_probe(apart) == 0  # alive: both registrations have a READY worker
    victim = apart.model_process(explanations=True)  # KServe's explainer process; TorchServe's explain worker
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    if apart.server == "torchserve":
        # An explanation that arrives while its worker is down is never answered (docs/deploy.md): the client's
        # timeout ends it. The management API then tells a replaced worker from a stuck one.
        with suppress(TimeoutError):
            call(apart.url("explanations"), apart.key, image, headers={"X-Method": "layer_gradcam"}, timeout=5)
        start, workers = time.monotonic(), _explain_workers(apart)
        while time.monotonic() - start < 40 and not any(w["status"] == "READY" for w in workers):
            time.sleep(1)
            workers = _explain_workers(apart)
        print(f"torchserve: explanations' workers {time.monotonic() - start:.0f} s after the kill: {workers}")
        assert victim.pid not in {int(w["pid"]) for w in workers if w["status"] == "READY" and w.get("pid")}
        replaced = any(w["status"] == "READY" for w in workers)
        assert _liveness_probe(apart) == (0 if replaced else 1)  # a stuck worker: the pod is restarted
        if replaced:
            status, raw = call(apart.url("explanations"), apart.key, image, headers={"X-Method": "layer_gradcam"},
                               timeout=120)  # fmt: skip
            assert status == 200 and "heatmap_png_base64" in json.loads(raw), raw[:300]
        assert apart.post(image)[0] == 200
        return
    time.sleep(0.3)  # the pool sees its process gone at once; a new one takes seconds to import torch
    status, raw = call(f"http://127.0.0.1:{apart.port}/v2/models/classifier/ready", "")  # the probes' path
    assert status == 503 or json.loads(raw).get("ready") is False, (status, raw)
    start, seen, raw = time.monotonic(), [], b""
    while time.monotonic() - start < 30:
        status, raw = call(apart.url("explanations"), apart.key, image, headers={"X-Method": "layer_gradcam"},
                           timeout=30)  # fmt: skip
        seen.append(status)
        if status == 200:
            break
        assert status == 503, raw[:300]  # never a 500: the caller is told to come back
        time.sleep(1)
    print(f"{apart.server}: explanations after the kill {seen}, 200 after {time.monotonic() - start:.1f} s")
    assert seen[-1] == 200 and "heatmap_png_base64" in json.loads(raw)
    assert apart.post(image)[0] == 200
