"""KServe's server's guard, as an ASGI middleware around a stand-in app (no server started): the model-repository
verbs off unless a key is set, then only with it; body size and length refused from the headers; a body that does
not arrive in time answered 408. The end-to-end cases (an unload attempt, a stalled client) are in test_serve.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from visionapp.serve.kserve_server import _KEY_CHECKED, MAX_REQUEST_BYTES, Guard, GuardedRepository

KEY = "k" * 24


def _request(path: str, method: str = "POST", headers: dict[str, str] | None = None,
             chunks: list[bytes] | None = None, stall: bool = False, **guard: Any) -> tuple[int, Any]:  # fmt: skip
    """Send one request through a Guard around an app that answers 200 with the body it read; the status and the
    JSON answer."""
    body = b"".join(chunks or [])
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if method == "POST" and not any(k == b"content-length" for k, _ in raw_headers):
        raw_headers.append((b"content-length", str(len(body) + (100 if stall else 0)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": raw_headers}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks or []) - 1 or stall}
                for i, c in enumerate(chunks or [b""])]  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a stalled client
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        received, more = b"", True
        while more:
            m = await receive()
            received, more = received + m.get("body", b""), m.get("more_body", False)
        answer = json.dumps({"read": received.decode(), "key_checked": _KEY_CHECKED.get()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": answer})

    asyncio.run(Guard(app, **guard)(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_repository_verbs_are_off_unless_a_key_is_set_then_need_it() -> None:
    status, answer = _request("/v2/repository/models/classifier/unload")
    assert status == 404 and "--enable-repository-verbs" in answer["error"]
    for given in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}):
        status, answer = _request("/v2/repository/models/classifier/unload", headers=given, repository_key=KEY)
        assert status == 401 and "VISIONAPP_REPOSITORY_KEY" in answer["error"], given
    status, answer = _request("/v2/repository/models/classifier/unload", headers={"Authorization": f"Bearer {KEY}"},
                              repository_key=KEY)  # fmt: skip
    assert status == 200 and answer["key_checked"] is True
    status, answer = _request("/v2/models/classifier/infer", chunks=[b"{}"], repository_key=KEY)
    assert status == 200 and answer["key_checked"] is False  # other paths never count as checked


def test_the_repository_extension_refuses_what_no_key_check_let_through() -> None:
    """Over gRPC (no Guard in the way) load and unload are refused by the extension itself."""
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository

    repository = GuardedRepository(ModelRepository())
    for verb in (repository.load, repository.unload):
        with pytest.raises(InvalidInput, match="repository verbs are off"):
            asyncio.run(verb("classifier"))


def test_bodies_are_refused_from_their_headers_or_their_arrival() -> None:
    assert _request("/predictions/classifier", headers={"Content-Length": str(MAX_REQUEST_BYTES + 1)})[0] == 413
    assert _request("/predictions/classifier", headers={"Content-Length": "12x"})[0] == 413
    empty_length = _request("/predictions/classifier", headers={"Transfer-Encoding": "chunked",
                                                                         "Content-Length": ""})  # fmt: skip
    assert empty_length[0] == 413
    status, answer = _request("/predictions/classifier", chunks=[b"ab", b"cd", b"ef"])
    assert status == 200 and answer["read"] == "abcdef"  # a body in pieces reaches the route whole
    status, answer = _request("/predictions/classifier", chunks=[b"half"], stall=True, body_timeout=0.2)
    assert status == 408 and "did not arrive within 0.2 s" in answer["error"]
    assert _request("/v2/health/ready", method="GET")[0] == 200  # a GET reads no body
