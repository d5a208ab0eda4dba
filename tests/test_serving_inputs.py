"""Request parsing (the project's own API and the Open Inference Protocol) and the worker's threads, without a
server (the end-to-end suite is test_serve.py, against both servers)."""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionapp.serve.inputs import (
    BadInput,
    Limits,
    cgroup_cpu_quota,
    parse_request,
    parse_v2,
    v2_body,
    worker_threads,
)


def _png(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_raw_body_is_one_image() -> None:
    req = parse_request({"body": bytearray(_png())})
    assert req.error is None and len(req.images) == 1 and not req.many


def test_multipart_fields_are_several_images_and_options() -> None:
    req = parse_request({"a": _png(), "b": _png((3, 3)), "topk": b"2"})
    assert req.error is None and len(req.images) == 2 and req.many and req.options == {"topk": "2"}


def test_json_base64_and_options_from_headers() -> None:
    body = {"images": [base64.b64encode(_png()).decode()], "method": "occlusion"}
    req = parse_request({"body": body}, {"X-Target": "star", "Authorization": "Bearer k", "X-Other": "1"})
    assert req.error is None and req.many and len(req.images) == 1
    assert req.options == {"method": "occlusion", "target": "star"}


def test_errors_name_the_problem() -> None:
    cases = {
        "empty body": {"body": b""},
        "not an image": {"body": b"hello"},
        "base64": {"body": {"data": "***"}},
        '"data"': {"body": {"image": "abc"}},
        "is text": {"body": "some text"},
    }
    for words, row in cases.items():
        req = parse_request(row)
        assert req.error is not None and words in str(req.error) and req.error.status == 400, (words, req.error)


def test_worker_threads_share_the_cores_this_process_may_use(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    no_quota = (tmp_path / "no_proc_self_cgroup", tmp_path)  # whatever quota the machine running the tests has
    assert worker_threads(1, no_quota) == cores
    assert worker_threads(2, no_quota) == max(1, cores // 2)
    assert worker_threads(10 * cores, no_quota) == 1
    # Pinned to one core (as taskset or a container's cpuset does), whatever the machine has: one thread.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from visionapp.serve.inputs import worker_threads; print(worker_threads(1))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "1\n"


def test_worker_threads_respect_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    """A cgroup v2 tree as the kernel writes it: /proc/self/cgroup names the cgroup, its cpu.max the quota."""
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    limit = tmp_path / "sys_fs_cgroup" / "kubepods" / "pod1" / "ctr" / "cpu.max"
    limit.parent.mkdir(parents=True)
    cgroup = (proc, tmp_path / "sys_fs_cgroup")
    for text, quota in [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000\n", 0.5)]:
        limit.write_text(text)
        assert cgroup_cpu_quota(*cgroup) == quota
    cores = len(os.sched_getaffinity(0))
    limit.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads at most, for one worker
    assert worker_threads(1, cgroup) == min(cores, 2)
    limit.write_text("50000 100000\n")  # half a CPU: one thread
    assert worker_threads(1, cgroup) == 1
    proc.write_text("4:cpu,cpuacct:/docker/abc\n")  # cgroup v1 only: no quota read, the affinity decides
    assert cgroup_cpu_quota(*cgroup) is None and worker_threads(1, cgroup) == cores


def test_any_exception_while_decoding_is_that_requests_corrupt_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decoders raise more than OSError on crafted files (struct.error, IndexError, ...): each is a 400."""
    import struct

    from visionapp.serve import inputs

    for error in (struct.error("unpack requires a buffer of 4 bytes"), IndexError("tuple index out of range")):

        def broken(raw: bytes, error: Exception = error, **options: object) -> None:
            raise error

        monkeypatch.setattr(inputs, "load_image", broken)
        png = io.BytesIO()
        Image.new("RGB", (4, 4)).save(png, "PNG")  # a header that reads; the decoder then raises
        with pytest.raises(inputs.BadInput, match="truncated or corrupt image") as e:
            inputs.decode_image(png.getvalue())
        assert e.value.kind == "corrupt_image" and e.value.status == 400


def test_long_or_hostile_values_are_quoted_short_and_the_status_phrase_is_ascii() -> None:
    from visionapp.serve.inputs import shown, status_phrase

    assert shown("9" * 5000).endswith("... (5000 characters)") and len(shown("9" * 5000)) < 70
    assert shown("a\x01b") == "'a\\x01b'"
    phrase = status_phrase("unknown class 'é\x00'")
    assert phrase.isascii() and len(phrase.encode()) == len(phrase) and "\\xe9" in phrase


# --- the Open Inference Protocol -----------------------------------------------------------------------------------
def _v2(data: list, **extra: object) -> dict:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)], "data": data}], **extra}


def test_v2_base64_over_rest_and_raw_bytes_over_grpc_are_images() -> None:
    b64 = base64.b64encode(_png()).decode()
    req = parse_v2(_v2([b64, _png((3, 3))], id="r-1", parameters={"topk": 2}))
    assert req.error is None and [i.size for i in req.images] == [(8, 6), (3, 3)]
    assert req.id == "r-1" and req.options == {"topk": "2"} and req.many


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (None, "JSON object"),
        ({"inputs": "x"}, "exactly one input"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
        ({"inputs": [{"datatype": "BYTES", "shape": [3], "data": ["aGk="]}]}, "shape must be [1]"),
        ({"inputs": [{"datatype": "BYTES", "shape": [1], "data": [7]}]}, "base64 strings"),
        ({**_v2(["aGk="]), "parameters": [1]}, "parameters"),
    ],
)
def test_v2_requests_it_cannot_use_name_the_problem(body: object, words: str) -> None:
    req = parse_v2(body)
    assert req.error is not None and req.error.status == 400 and words in str(req.error), req.error


def test_v2_images_are_counted_before_any_is_decoded() -> None:
    req = parse_v2(_v2(["not even base64"] * 3), Limits(max_images_prediction=2))
    assert req.error is not None and req.error.status == 413 and "maxImagesPerPrediction" in str(req.error)


def test_a_v2_request_is_found_in_a_torchserve_row_json_or_not() -> None:
    body = _v2(["aGk="])
    assert v2_body({"body": body}) == body
    assert v2_body({"body": b'  {"inputs": []}'}) == {"inputs": []}  # JSON sent without its content type
    assert v2_body({"body": {"data": "aGk="}}) is None and v2_body({"body": _png()}) is None
    assert v2_body({"body": '{"inputs": []}'}) == {"inputs": []}  # text/plain: TorchServe hands over a string
    for unreadable, words in ((b"{not json", "not valid JSON"), (b'{"data": ' + b"[" * 100_000, "nested too deeply")):
        with pytest.raises(BadInput, match=words):
            v2_body({"body": unreadable})


def _binary_request(images: list[bytes], **extra: object) -> tuple[bytes, dict[str, str]]:
    """A request in the binary tensor data extension, as Triton's and KServe's clients send it."""
    data = b"".join(len(i).to_bytes(4, "little") + i for i in images)
    images_input = {"name": "images", "datatype": "BYTES", "shape": [len(images)],
                    "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    head = json.dumps({"inputs": [images_input], **extra}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def test_the_binary_data_extension_is_read_and_its_errors_named() -> None:
    png = _png()
    body, headers = _binary_request([png, png], parameters={"topk": 2})
    request = v2_body({"body": body}, headers)
    assert request is not None and request["inputs"][0]["data"] == [png, png]
    req = parse_v2(request)
    assert req.error is None and len(req.images) == 2 and req.options == {"topk": "2"} and req.id is None
    for header, cut, words in (("x", 0, "Inference-Header-Content-Length"), (None, 3, "runs past"),
                               ("9999999", 0, "Inference-Header-Content-Length")):  # fmt: skip
        h = {"inference-header-content-length": header or headers["Inference-Header-Content-Length"]}
        with pytest.raises(BadInput, match=words):
            v2_body({"body": body[: len(body) - cut]}, h)


def test_admission_refuses_past_its_limit_and_frees_its_place() -> None:
    from visionapp.serve.core import Admission

    gate = Admission(running=1, waiting=1)
    with gate.admit():
        assert gate.refusal() is None  # one running, room for one waiting
        with gate.admit():
            refusal = gate.refusal()
            assert refusal is not None and refusal.status == 503 and refusal.retry_after is not None
            assert refusal.retry_after >= 1 and "maxExplanationsWaiting" in refusal.message
    with pytest.raises(RuntimeError), gate.admit():  # a failed explanation frees its place too
        raise RuntimeError("explainer died")
    assert gate.admitted == 0 and gate.refusal() is None


def test_images_are_decoded_only_as_big_as_the_model_needs() -> None:
    """load_image's min_side: a big JPEG decoded at a reduced DCT scale, any image shrunk by a whole factor while
    both sides keep min_side; 16-bit grey through the lookup table equals the float64 scaling exactly; a
    48-megapixel JPEG stays under the decompression-bomb limit at the scale it is decoded at."""
    from visionapp.decode import load_image
    from visionapp.serve.inputs import MAX_PIXELS
    from visionapp.transforms import EvalPreset

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8))
    jpeg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpeg, "JPEG")
    photo.save(png, "PNG")
    for raw in (jpeg.getvalue(), png.getvalue()):
        small = load_image(raw, min_side=128)
        assert min(small.size) >= 128 and min(small.size) < 2 * 128 * 2, small.size
        assert abs(small.width / small.height - 4 / 3) < 0.02
    assert load_image(png.getvalue()).size == (4000, 3000)  # min_side 0: whole
    grey = np.random.default_rng(1).integers(0, 65536, (40, 50)).astype(np.uint16)
    sixteen = io.BytesIO()
    Image.fromarray(grey).save(sixteen, "PNG")
    expected = (grey.astype(np.float64) / 65535 * 255).round().astype(np.uint8)
    assert (np.asarray(load_image(sixteen.getvalue()))[..., 0] == expected).all()
    huge = io.BytesIO()
    Image.linear_gradient("L").resize((8000, 6000)).save(huge, "JPEG", quality=30)  # 48 MP
    decoded = load_image(huge.getvalue(), min_side=128, max_pixels=MAX_PIXELS)
    assert decoded.size == (200, 150)  # an eighth a side (DCT scaling), then a fifth (box reduce)
    with pytest.raises(Image.DecompressionBombError):
        load_image(huge.getvalue(), max_pixels=MAX_PIXELS)  # decoded whole it would be 48 megapixels
    preset = EvalPreset(image_size=64)
    assert preset.decode_side == 128 and preset.load(jpeg.getvalue()).shape == (3, 64, 64)
