"""A small client for the served model: finds TorchServe's inference key itself (KServe's server has none).

python -m visionapp.client.api predict photo.jpg [more.jpg ...] [--port 8080] [--dir logs/serve-8080]
python -m visionapp.client.api explain photo.jpg [--target star] [--method occlusion] [--save heatmap.png]
python -m visionapp.client.api infer photo.jpg [more.jpg ...]  # the same over the Open Inference Protocol (v2)
python -m visionapp.client.api wait [--timeout 120]        # until the model answers (used by make serve-bg)
python -m visionapp.client.api ready                       # exit 0 if the model answers now (a readiness probe)
python -m visionapp.client.api describe                    # what is served: model, version, form, OOD, model card
Add --server kserve for KServe's model server.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from visionapp.serve.inputs import explain_name


def keys(serve_dir: str | Path) -> dict[str, Any]:
    """TorchServe writes its keys to key_file.json in the directory it was started from (and rewrites it when
    a key is renewed): {"management": {"key": ...}, "inference": {"key": ...}, "API": {"key": ...}}."""
    path = Path(serve_dir) / "key_file.json"
    if not path.is_file():
        raise SystemExit(f"no {path}: is the server running (make serve / make serve-bg)?")
    return json.loads(path.read_text())


def inference_key(serve_dir: str | Path) -> str:
    return keys(serve_dir)["inference"]["key"]


def renew_key(serve_dir: str | Path, management: str, kind: str = "inference") -> str:
    """A fresh `kind` key (inference or management) from TorchServe's token API (the management port, authorised by
    the API key, which does not expire); TorchServe writes it to key_file.json. Inference and management keys expire
    after token_expiration_min (serve/config.properties)."""
    status, body = call(f"{management}/token?type={kind}", keys(serve_dir)["API"]["key"], timeout=10)
    if status != 200:
        raise SystemExit(f"could not renew the {kind} key at {management} (HTTP {status}: {body[:200]!r})")
    return str(keys(serve_dir)[kind]["key"])


def expired(status: int, body: bytes) -> bool:
    """TorchServe's answer to an expired (or wrong) key: 400/401 with InvalidKeyException / token error."""
    return status in (400, 401) and (b"InvalidKeyException" in body or b"Token Authorization" in body)


def call_with_key(
    url: str, serve_dir: str | Path, management: str, body: bytes | None = None, **kwargs: Any
) -> tuple[int, bytes]:
    """`call` with the server's current inference key, renewed once if TorchServe refuses it as expired."""
    status, answer = call(url, inference_key(serve_dir), body, **kwargs)
    if expired(status, answer):
        status, answer = call(url, renew_key(serve_dir, management), body, **kwargs)
    return status, answer


# The server is on loopback: never route through an http_proxy from the environment (urlopen's global
# opener would, and it also keeps whatever proxy settings were in force at its first use).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(
    url: str,
    key: str,
    body: bytes | None = None,
    content_type: str = "application/octet-stream",
    timeout: float = 120,
    headers: dict[str, str] | None = None,
    headers_out: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """POST `body` (GET without one) with the key; the status and body, and the response's headers into
    `headers_out` when given (lower-case names)."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=headers or {})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            if headers_out is not None:
                headers_out.update((k.lower(), v) for k, v in r.headers.items())
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        if headers_out is not None:
            headers_out.update((k.lower(), v) for k, v in e.headers.items())
        return e.code, e.read()


def is_ready(base: str, management: str, serve_dir: Path, model: str, server: str = "torchserve") -> bool:
    """Whether `model` answers now. KServe's server: its keyless /v2/health/ready. TorchServe: a worker of the
    model is READY, as the management API describes it (with the management key from the server's folder); the
    handler marks a worker ready only after a warm-up prediction, so both mean the model has answered once."""
    try:
        if server == "kserve":
            return call(f"{base}/v2/models/{model}/ready", "", timeout=5)[0] == 200
        key = json.loads((serve_dir / "key_file.json").read_text())["management"]["key"]
        status, body = call(f"{management}/models/{model}", key, timeout=5)
        if expired(status, body):  # a model slower to load than token_expiration_min: the key ran out meanwhile
            status, body = call(
                f"{management}/models/{model}", renew_key(serve_dir, management, "management"), timeout=5
            )
        return status == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0].get("workers", []))
    except (OSError, ValueError, KeyError):  # not up yet: no key file, connection refused, no answer
        return False


def wait_ready(base: str, management: str, serve_dir: Path, model: str, timeout: float, server: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(base, management, serve_dir, model, server):
            return
        time.sleep(0.5)
    raise SystemExit(f"the {server} server at {base} did not become ready in {timeout:.0f}s; see its logs")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["predict", "explain", "infer", "wait", "ready", "describe"])
    ap.add_argument("--server", choices=["torchserve", "kserve"], default="torchserve")
    ap.add_argument("images", nargs="*")
    ap.add_argument("--port", type=int, default=8080, help="inference port")
    ap.add_argument("--management-port", type=int, default=None, help="management port (default port + 1)")
    ap.add_argument("--dir", default=None, help="the server's directory with key_file.json (default logs/serve-PORT)")
    ap.add_argument("--model", default="classifier")
    ap.add_argument("--target", default=None, help="explain: class name to explain (default: the predicted one)")
    ap.add_argument("--method", default=None, help="explain: attribution method")
    ap.add_argument("--save", default=None, help="explain: write the heatmap overlay PNG here")
    ap.add_argument("--timeout", type=float, default=180)
    return ap


def send(args: argparse.Namespace, url: str, management: str, img: str) -> int:
    """One image to `url` as the command says; prints the answer (and the OOD headers in words); the HTTP status."""
    options = {f"X-{k}": v for k, v in (("Target", args.target), ("Method", args.method)) if v}
    serve_dir = Path(args.dir or f"logs/serve-{args.port}")
    body_bytes = Path(img).read_bytes()
    if args.command == "infer":
        data = base64.b64encode(body_bytes).decode("ascii")
        images = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [data]}
        body_bytes = json.dumps({"id": Path(img).name, "inputs": [images]}).encode()
    ctype = "application/json" if args.command == "infer" else "application/octet-stream"
    got: dict[str, str] = {}
    if args.server == "kserve":
        status, body = call(url, "", body_bytes, ctype, headers=options, headers_out=got)
    else:
        status, body = call_with_key(url, serve_dir, management, body_bytes, content_type=ctype, headers=options,
                                     headers_out=got)  # fmt: skip
    answer: Any = json.loads(body) if body.startswith((b"{", b"[")) else body.decode(errors="replace")
    if args.command == "explain" and status == 200 and args.save:
        Path(args.save).write_bytes(base64.b64decode(answer["heatmap_png_base64"]))
        answer["heatmap_png_base64"] = f"<written to {args.save}>"
    print(f"{img}: HTTP {status} {json.dumps(answer, indent=2)}")
    if "x-ood" in got:  # the out-of-distribution answer rides in headers: the body keeps its top-k shape
        flagged = got["x-ood"] == "true"
        side = "above" if flagged else "at or below"
        print(
            f"  {'OUT OF DISTRIBUTION' if flagged else 'in distribution'}: {got['x-ood-method']} score "
            f"{got['x-ood-score']} ({side} the threshold {got['x-ood-threshold']})"
        )
    return status


def describe(args: argparse.Namespace, base: str, management: str, serve_dir: Path) -> int:
    """Prints what the server says it serves (model, version, form, OOD method and threshold), then the model card:
    TorchServe's customized describe on its management API, GET /models/<name> on KServe's server."""
    if args.server == "kserve":
        status, body = call(f"{base}/models/{args.model}", "")
    else:
        url = f"{management}/models/{args.model}?customized=true"
        status, body = call(url, keys(serve_dir)["management"]["key"])
        if expired(status, body):
            status, body = call(url, renew_key(serve_dir, management, "management"))
    if status != 200:
        print(f"describe {args.model}: HTTP {status} {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    about = json.loads(body)
    if args.server == "torchserve":  # the handler's answer, which TorchServe parses when it is JSON
        about = about[0]["customizedMetadata"]
        about = json.loads(about) if isinstance(about, str) else about
    card = about.pop("model_card")
    print(json.dumps(about, indent=2))
    print(card if card else "(this bundle has no model card)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_intermixed_args(argv)  # images may follow the options, as `make predict` passes them
    base = f"http://127.0.0.1:{args.port}"
    serve_dir = Path(args.dir or f"logs/serve-{args.port}")
    management = f"http://127.0.0.1:{args.management_port or args.port + 1}"
    if args.command == "ready":
        return 0 if is_ready(base, management, serve_dir, args.model, args.server) else 1
    if args.command == "wait":
        wait_ready(base, management, serve_dir, args.model, args.timeout, args.server)
        print(f"ready: {base}/predictions/{args.model}")
        return 0
    if args.command == "describe":
        return describe(args, base, management, serve_dir)
    if not args.images:
        ap.error("give at least one image")
    missing = [img for img in args.images if not Path(img).is_file()]
    if missing:
        ap.error(f"no such image file: {', '.join(missing)}")
    endpoint = {"predict": "predictions", "explain": "explanations"}.get(args.command)
    # explanations have a model name of their own (their own workers and queue, on both servers)
    model = explain_name(args.model) if args.command == "explain" else args.model
    url = f"{base}/{endpoint}/{model}" if endpoint else f"{base}/v2/models/{args.model}/infer"
    failed = sum(send(args, url, management, img) != 200 for img in args.images)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
