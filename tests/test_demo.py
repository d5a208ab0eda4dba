"""The demo page in a real browser: `python -m visionapp.client.demo` against the real TorchServe, driven by
Playwright with Debian's Chromium (no browser can be downloaded here); and the run report opened in the same browser."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, real_server

from visionapp.deploy.local import LocalServer, free_ports

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with real_server("torchserve", trained_run, tmp_path_factory.mktemp("demo")) as s:
        yield s


@pytest.fixture(scope="module")
def demo(server: LocalServer, trained_run: Path) -> Iterator[str]:
    (port,) = free_ports(1)
    args = ["--run", str(trained_run), "--port", str(port), "--server-port", str(server.port), "--dir", str(server.dir),
            "--management-port", str(server.management_port)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "visionapp.client.demo", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _first(run: Path, *parts: str) -> Path:
    root = Path(json.loads((run / "metrics.json").read_text())["data_root"])
    return sorted(root.joinpath(*parts).rglob("*.png"))[0]


@needs_browser
@pytest.mark.parametrize("kind", [("test", "star"), ("ood", "far")])
def test_a_dropped_photo_gets_the_servers_classes_flag_and_heatmap(
    demo: str, server: LocalServer, browser, trained_run: Path, kind: tuple[str, str]
) -> None:
    image = _first(trained_run, *kind)
    status, expected = server.post(image.read_bytes(), headers={"X-Topk": "5"})
    assert status == 200 and isinstance(expected, dict)
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(demo)
    page.get_by_role("button", name="Predict and explain").wait_for(timeout=60_000)  # the page has rendered
    assert "answered by torchserve" in page.inner_text("body")  # says which server it shows
    page.set_input_files("input[type=file]", str(image))
    page.get_by_role("button", name="Predict and explain").click()
    page.wait_for_function("() => { const i = document.querySelector('#heatmap img'); return i && i.naturalWidth > 0 }",
                           timeout=120_000)  # fmt: skip
    shown = page.inner_text("#classes").split("classes (calibrated probabilities)", 1)[-1].strip()  # after its label
    top = next(iter(expected))
    assert shown.split()[0] == top  # the heading: the server's top class
    for name, p in expected.items():  # every bar, as the server's probability in whole percent
        assert f"{name}\n{round(p * 100)}%" in shown, (name, p, shown)
    flag = page.inner_text("#ood")
    served_flag = server_ood(server, image)
    assert flag.startswith("Out of distribution" if served_flag else "In distribution"), flag
    assert not errors, errors
    page.close()


def server_ood(server: LocalServer, image: Path) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/predictions/classifier", body=image.read_bytes(),
                 headers={"Authorization": f"Bearer {server.key}", "Content-Type": "image/png"})  # fmt: skip
    r = conn.getresponse()
    r.read()
    return r.getheader("X-OOD") == "true"


@needs_browser
def test_the_run_report_loads_every_image_without_console_errors(browser, trained_run: Path) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((trained_run / "report.html").as_uri())
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth])")
    assert len(sizes) >= 4 and all(width for _, width in sizes), sizes  # reliability, OOD, confusion, mistakes
    assert "Out of distribution" in page.inner_text("body")
    assert not errors, errors
    page.close()
