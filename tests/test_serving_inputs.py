"""Request parsing of the TorchServe handler, without a server (the end-to-end suite is test_serve.py)."""

import base64
import io

from PIL import Image

from visionapp.serving import parse_request


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
