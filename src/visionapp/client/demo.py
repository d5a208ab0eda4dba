"""A page to try the model: a photo in, its classes, out-of-distribution flag and heatmap out (Gradio).

    make demo                      # = python -m visionapp.client.demo --run runs/latest --port 7860 --server-port 8080

It asks the running server (TorchServe, or KServe's with --server kserve) through the project's own client, the
key found and renewed as `make predict` does; with no server answering on --server-port it loads the run's bundle
in this process and says so. It listens on 127.0.0.1 only, sends nothing anywhere else (Gradio's analytics and
share links off, system fonts) and works offline.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr
import torch
from PIL import Image

from visionapp import imagefiles
from visionapp.attribution.maps import explain, overlay_png
from visionapp.attribution.methods import METHODS
from visionapp.bundle import load_bundle
from visionapp.client.api import call, call_with_key, is_ready
from visionapp.decode import load_image
from visionapp.errors import UserError, run_main
from visionapp.serve.inputs import explain_name

PREDICTED = "(the predicted class)"
PROGRESS = gr.Progress()  # Gradio fills in a tracker for a parameter that defaults to one
HEATMAP_PIXELS = 500_000


class Backend:
    """Where answers come from: the running server, through the project's client, or the bundle in process."""

    def __init__(self, run: Path, port: int, server: str, serve_dir: Path | None = None,
                 management_port: int | None = None, model: str = "classifier") -> None:  # fmt: skip
        self.run, self.server, self.model = run, server, model
        self.base, self.management = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{management_port or port + 1}"
        self.serve_dir = serve_dir or Path(f"logs/serve-{port}")  # where the server keeps its keys
        # class names for the page; the answers when no server runs, from the fastest form, as the servers answer
        self.bundle = load_bundle(run / "bundle", runtime="auto")
        self.remote = is_ready(self.base, self.management, self.serve_dir, model, server)

    @property
    def source(self) -> str:
        where = f"{self.server} at {self.base}" if self.remote else "this process (no server answered)"
        return f"Run `{self.run.resolve().name}`, answered by {where}."

    def _post(self, endpoint: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        model = explain_name(self.model) if endpoint == "explanations" else self.model
        url, got = f"{self.base}/{endpoint}/{model}", dict[str, str]()
        if self.server == "kserve":
            status, raw = call(url, "", body, "image/png", headers=headers, headers_out=got)
        else:
            status, raw = call_with_key(url, self.serve_dir, self.management, body, content_type="image/png",
                                        headers=headers, headers_out=got)  # fmt: skip
        return status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw.decode(errors="replace"), got

    def predict(self, path: str) -> tuple[dict[str, float], str]:
        """The top-5 classes and a line on the out-of-distribution flag."""
        if not self.remote:
            with torch.no_grad():
                probs, scores, flags = self.bundle.answer(self.bundle.transform.load(path)[None])
            answer = dict(zip(self.bundle.class_names, probs[0].tolist(), strict=True))
            ood = None if scores is None or flags is None else (float(scores[0]), bool(flags[0]))
            return answer, ood_line(ood, self.bundle.ood.threshold if self.bundle.ood else None)
        status, answer, headers = self._post("predictions", Path(path).read_bytes(), {"X-Topk": "5"})
        if status != 200:
            raise gr.Error(failure(status, answer))
        ood = (float(headers["x-ood-score"]), headers["x-ood"] == "true") if "x-ood" in headers else None
        return answer, ood_line(ood, float(headers["x-ood-threshold"]) if ood else None)

    def explain(self, path: str, method: str, target: str | None) -> Image.Image:
        if not self.remote:
            e = explain(self.bundle, load_image(path), method, target=target, max_pixels=HEATMAP_PIXELS)
            return Image.open(io.BytesIO(overlay_png(e.image, e.attr_map)))
        headers = {"X-Method": method, **({"X-Target": target} if target else {})}
        status, answer, _ = self._post("explanations", Path(path).read_bytes(), headers)
        if status != 200:
            raise gr.Error(failure(status, answer))
        return Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png_base64"])))


def ood_line(ood: tuple[float, bool] | None, threshold: float | None) -> str:
    if ood is None:
        return "This run has no out-of-distribution score (trained before it)."
    score, flagged = ood
    if flagged:
        return (
            f"**Out of distribution**: score {score:.3g} above the threshold {threshold:.3g}; the classes are a guess."
        )
    return f"In distribution: score {score:.3g}, at or below the threshold {threshold:.3g}."


def failure(status: int, answer: Any) -> str:
    """The server's own message for a refused request."""
    message = answer.get("message") or answer.get("error") if isinstance(answer, dict) else str(answer)
    return f"HTTP {status}: {message}"


def samples(run: Path, per_class: int = 1) -> list[str]:
    """A few images the project made: one test image per class, a held-out shape and a far image."""
    root = json.loads((run / "metrics.json").read_text()).get("data_root")
    if not root:
        return []
    found = [imagefiles.find_images(d)[:per_class] for d in sorted((Path(root) / "test").glob("*")) if d.is_dir()]
    found += [imagefiles.find_images(Path(root) / "ood" / group)[:1] for group in ("near", "far")]
    return [str(f) for files in found for f in files]


def build(backend: Backend) -> gr.Blocks:
    names = backend.bundle.class_names
    with gr.Blocks(title="visionapp demo", analytics_enabled=False) as page:
        gr.Markdown(f"# Try the classifier\n{backend.source}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="a photo", sources=["upload", "clipboard"])
                method = gr.Dropdown(list(METHODS), value="integrated_gradients", label="attribution method")
                target = gr.Dropdown([PREDICTED, *names], value=PREDICTED, label="class to explain")
                button = gr.Button("Predict and explain", variant="primary")
                examples = samples(backend.run)
                if examples:
                    gr.Examples(examples, inputs=image, label="images the project made")
            with gr.Column():
                label = gr.Label(num_top_classes=5, label="classes (calibrated probabilities)", elem_id="classes")
                ood = gr.Markdown(elem_id="ood")
                heatmap = gr.Image(type="pil", label="heatmap", elem_id="heatmap")

        def answer(path: str | None, method: str, target: str, progress: gr.Progress = PROGRESS) -> tuple:
            if not path:
                raise gr.Error("pick or drop an image first")
            progress(0.1, desc="predicting")
            classes, line = backend.predict(path)
            progress(0.4, desc=f"explaining with {method} (seconds for occlusion)")
            overlay = backend.explain(path, method, None if target == PREDICTED else target)
            return classes, line, overlay

        button.click(answer, inputs=[image, method, target], outputs=[label, ood, heatmap])
    return page


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/latest")
    ap.add_argument("--port", type=int, default=7860, help="the page's port (on 127.0.0.1)")
    ap.add_argument("--server-port", type=int, default=8080, help="the inference port of the server to ask")
    ap.add_argument("--server", choices=["torchserve", "kserve"], default="torchserve")
    ap.add_argument("--management-port", type=int, default=None, help="TorchServe's (default server port + 1)")
    ap.add_argument("--dir", default=None, help="the server's folder with key_file.json (default logs/serve-PORT)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = Path(args.run)
    if not (run / "bundle").is_dir():
        raise UserError(f"{run} has no bundle: train first (make train), or pass --run runs/<run>")
    backend = Backend(run, args.server_port, args.server, Path(args.dir) if args.dir else None, args.management_port)
    page = build(backend)
    print(f"demo: http://127.0.0.1:{args.port}  ({backend.source})", flush=True)
    font = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])  # system fonts: nothing fetched
    page.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=args.port, share=False, theme=font, footer_links=[], quiet=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
