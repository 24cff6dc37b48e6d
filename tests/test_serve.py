"""`nnlab serve`: the HTTP API of a tiny seed-cnn and a tiny gpt, checked against the library (the
model's own probabilities, Captum's saliency, generate_text), every kind of bad request (a 4xx JSON
error, and the server answers afterwards), the API token, and streaming against a live uvicorn
server on 127.0.0.1 (TestClient cannot deliver a client that leaves mid-stream).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import nnlab
from conftest import cli_cmd, cli_env, make_images, one_line_error, sample_text
from nnlab.generate import generate_text
from nnlab.serve import create_app
from nnlab.serve.app import is_loopback, listening_socket
from nnlab.serve.batching import Batcher

SMALL_BODY = 64 * 1024  # the test apps' body limit: big enough for a 28x28 image, small enough to exceed


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir, module_one_thread) -> Path:
    return nnlab.train("seed-cnn", [f"data.dir={fmnist_dir}", "train.max_steps=20", "train.batch_size=32",
                                    "train.lr=0.02", "train.momentum=0.9", "train.precision=fp32"],
                       out=str(tmp_path_factory.mktemp("cnn") / "run"))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, text_file, module_one_thread) -> Path:
    return nnlab.train("gpt-shakespeare", [f"data.path={text_file}", "model.preset=tiny", "train.max_steps=20",
                                           "train.eval_iters=1", "train.warmup_steps=0", "train.lr=0.01"],
                       out=str(tmp_path_factory.mktemp("gpt") / "run"))


@pytest.fixture(scope="module")
def onnx_cnn_run(cnn_run, tmp_path_factory) -> Path:
    """A copy of cnn_run with its model exported (cnn_run itself stays without model.onnx)."""
    from nnlab.export import export

    run = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(cnn_run, run)
    export(run)
    return run


@pytest.fixture(scope="module")
def cnn_client(cnn_run):
    with TestClient(create_app(cnn_run, max_body_bytes=SMALL_BODY)) as client:
        yield client


@pytest.fixture(scope="module")
def gpt_client(gpt_run):
    with TestClient(create_app(gpt_run, max_body_bytes=SMALL_BODY, max_new_tokens_cap=50)) as client:
        yield client


def sample_images() -> list:
    x, y = make_images(4, seed=1)
    return list(zip(x, y))


def png(pixels, mode="L", size=None) -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    if size:
        image = image.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def model_probabilities(run, pixels) -> torch.Tensor:
    model, info = nnlab.load(run)
    x = (torch.from_numpy(pixels).float()[None, None] / 255 - info["normalize"]["mean"]) / info["normalize"]["std"]
    with torch.no_grad():
        return torch.softmax(model(x), dim=-1)[0]


# ---- classify -----------------------------------------------------------------------------------


def test_classify_pixels_and_png_give_the_models_probabilities(cnn_run, cnn_client):
    for pixels, label in sample_images():
        expected = model_probabilities(cnn_run, pixels)
        by_json = cnn_client.post("/v1/classify?top_k=10", json={"pixels": pixels.tolist()}).json()["classes"]
        by_png = cnn_client.post("/v1/classify?top_k=10", files={"file": ("x.png", png(pixels), "image/png")}).json()
        assert by_png["classes"] == by_json  # a lossless PNG of the same pixels is the same input
        probs = [c["probability"] for c in by_json]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert {c["name"] for c in by_json} == set(nnlab.load(cnn_run)[1]["classes"])
        for c in by_json:
            assert c["probability"] == pytest.approx(float(expected[c["index"]]), abs=1e-6)
        assert by_json[0]["index"] == label  # the fixture's classes are easy: 20 steps learn them
    top3 = cnn_client.post("/v1/classify?top_k=3", json={"pixels": pixels.tolist()}).json()["classes"]
    assert top3 == by_json[:3]


def test_classify_converts_any_png_or_jpeg_to_the_model_input(cnn_client):
    pixels, label = sample_images()[0]
    # RGB at 4x the size (nearest-neighbour): grey again after "L" and an antialiased shrink.
    big_rgb = cnn_client.post("/v1/classify", files={"file": ("x.png", png(pixels, "RGB", (112, 112)), "image/png")})
    assert big_rgb.status_code == 200 and big_rgb.json()["classes"][0]["index"] == label
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    jpeg = cnn_client.post("/v1/classify", files={"file": ("x.jpg", buf.getvalue(), "image/jpeg")})
    assert jpeg.status_code == 200 and jpeg.json()["classes"][0]["index"] == label


def test_saliency_is_the_gradient_of_the_top_logit(cnn_run, cnn_client):
    from captum.attr import Saliency

    pixels, _ = sample_images()[1]
    answer = cnn_client.post("/v1/classify?saliency=true", json={"pixels": pixels.tolist()}).json()
    model, info = nnlab.load(cnn_run)
    x = (torch.from_numpy(pixels).float()[None, None] / 255 - info["normalize"]["mean"]) / info["normalize"]["std"]
    top = answer["classes"][0]["index"]
    expected = Saliency(model).attribute(x.requires_grad_(), target=top, abs=True)[0].amax(0)  # (28, 28)
    got = torch.tensor(answer["saliency"])
    assert got.shape == (28, 28) and got.max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    as_png = cnn_client.post("/v1/classify?saliency=true&saliency_format=png", json={"pixels": pixels.tolist()})
    image = Image.open(io.BytesIO(base64.b64decode(as_png.json()["saliency"])))
    grey = torch.from_numpy(np.array(image))
    assert grey.shape == (28, 28) and grey.max() == 255  # scaled to its maximum
    assert int(grey.flatten().argmax()) == int(expected.flatten().argmax())


def test_batcher_gives_each_request_its_own_row(cnn_run):
    from nnlab.serve.model import ServedModel

    served = ServedModel(cnn_run)
    images = [served.image(pixels=p.tolist()).x[0] for p, _ in sample_images()] * 4  # 16 requests
    batcher = Batcher(served.probabilities, max_batch=8, wait_ms=200)
    try:
        futures = [batcher.submit(x) for x in images]
        rows = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert batcher.items == 16 and batcher.batches == 2  # all queued within the wait: two full batches
    for x, row in zip(images, rows):
        torch.testing.assert_close(row, served.probabilities(x[None])[0], rtol=1e-5, atol=1e-6)


def test_a_file_gives_the_same_answer_from_predict_and_the_server(cnn_run, cnn_client, cli_main, tmp_path):
    """One conversion for both: a wide RGB photo-like PNG (dark object on white) is padded, inverted
    and resized the same way, so the probabilities and the steps reported are the same."""
    pixels, label = sample_images()[3]
    wide = np.full((28, 40), 7, dtype=np.uint8)
    wide[:, 6:34] = pixels
    path = tmp_path / "wide.png"
    path.write_bytes(png(255 - wide, "RGB", (80, 56)))
    for flag, query in (([], ""), (["--no-invert"], "&invert=false"), (["--invert"], "&invert=true")):
        rc, out, err = cli_main("predict", cnn_run, path, "--top-k", "10", "--json", *flag)
        assert rc == 0, err
        want = json.loads(out)["predictions"][0]
        got = cnn_client.post(f"/v1/classify?top_k=10{query}", files={"file": ("wide.png", path.read_bytes())}).json()
        assert [c["index"] for c in got["classes"]] == [c["index"] for c in want["top_k"]]
        assert [c["probability"] for c in got["classes"]] == pytest.approx(
            [c["probability"] for c in want["top_k"]], abs=1e-6)
        assert got["conversion"] == want["conversion"]
    assert any(s.startswith("padded 80x56 -> 80x80") for s in got["conversion"]), got["conversion"]
    auto = cnn_client.post("/v1/classify", files={"file": ("wide.png", path.read_bytes())}).json()
    assert any(s.startswith("inverted (light background") for s in auto["conversion"])
    assert auto["classes"][0]["index"] == label  # inverted back to what the model was trained on


def test_onnxruntime_backend_gives_the_torch_probabilities(cnn_run, onnx_cnn_run, cnn_client, cli_main):
    rc, _, err = cli_main("serve", cnn_run, "--backend", "onnxruntime", "--port", "0")  # never exported
    one_line_error(rc, err, "model.onnx", f"nnlab export {cnn_run} --format onnx")
    rc, _, err = cli_main("serve", cnn_run, "--backend", "tensorrt", "--port", "0")
    one_line_error(rc, err, "--backend", "tensorrt")
    run = onnx_cnn_run
    with TestClient(create_app(run, backend="onnxruntime")) as onnx_client:
        for pixels, _ in sample_images():
            body = {"json": {"pixels": pixels.tolist()}}
            want, got = (c.post("/v1/classify?top_k=10", **body).json() for c in (cnn_client, onnx_client))
            assert [c["index"] for c in got["classes"]] == [c["index"] for c in want["classes"]]
            assert [c["probability"] for c in got["classes"]] == pytest.approx(
                [c["probability"] for c in want["classes"]], abs=1e-4)
            assert got["conversion"] == want["conversion"]
        r = onnx_client.post("/v1/classify?saliency=true", json={"pixels": pixels.tolist()})
        assert r.status_code == 400 and "--backend torch" in r.json()["detail"]
        card = onnx_client.get("/v1/model").json()
        assert card["backend"] == "onnxruntime" and card["saliency"] is False
        assert card["parameters"] == cnn_client.get("/v1/model").json()["parameters"]
        assert onnx_client.get("/healthz").json()["batched_items"] == len(sample_images())


def test_onnxruntime_backend_generates_the_torch_tokens(gpt_run, tmp_path):
    """A gpt export has no KV cache: each token reruns the context, and the tokens are torch's."""
    from nnlab.export import export

    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    export(run)
    with TestClient(create_app(run, backend="onnxruntime")) as client:
        block = nnlab.load(run)[1]["model"]["block_size"]
        n = block + 10  # past block_size the context is cropped, as generate does without a cache
        r = client.post("/v1/generate", json={"prompt": "First", "max_new_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == generate_text(gpt_run, "First", n, temperature=0)
        streamed = client.post("/v1/generate", json={"prompt": "First", "max_new_tokens": 12, "stream": True})
        events = parse_events(streamed.text)
        assert len(events) == 13 and events[-1] == ("done", {"text": generate_text(gpt_run, "First", 12)})
        assert client.get("/v1/model").json()["backend"] == "onnxruntime"
        assert client.get("/v1/model").json()["attention"] is False
        r = client.post("/v1/attention", json={"text": "First"})
        assert r.status_code == 400 and "--backend torch" in r.json()["detail"]
        r = client.post("/v1/classify", json={"pixels": pixels28})
        assert r.status_code == 400 and "needs an image classifier" in r.json()["detail"]


# ---- generate and the model card ----------------------------------------------------------------


def test_generate_matches_nnlab_generate(gpt_run, gpt_client):
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_k": 5, "seed": 7}):
        r = gpt_client.post("/v1/generate", json={"prompt": "First", "max_new_tokens": 30, **kw})
        assert r.status_code == 200, r.text
        expected = generate_text(gpt_run, "First", 30, **kw)
        assert r.json()["text"] == expected and r.json()["completion"] == expected[len("First"):]
    long = {"prompt": "First", "max_new_tokens": 50, "temperature": 0, "context_shift": 4}
    r = gpt_client.post("/v1/generate", json=long)
    assert r.status_code == 200 and r.json()["text"] == generate_text(gpt_run, **long)
    streamed = gpt_client.post("/v1/generate",
                               json={"prompt": "First", "max_new_tokens": 30, "seed": 3, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = parse_events(streamed.text)
    assert len(events) == 31 and events[-1][0] == "done"
    assert "First" + "".join(e[1]["text"] for e in events[:-1]) == events[-1][1]["text"] == generate_text(
        gpt_run, "First", 30, seed=3)


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def test_model_card_and_openapi(cnn_client, gpt_client):
    card = cnn_client.get("/v1/model").json()
    assert card["architecture"]["name"] == "seed-cnn" and card["parameters"] == 421_642
    assert card["task"] == "image" and len(card["classes"]) == 10 and card["input"]["size"] == 28
    assert 0 <= card["test_metrics"]["test_accuracy"] <= 1 and card["training"]["precision"] == "fp32"
    assert card["training"]["processor"] and card["data"]["name"] == "fashion-mnist"
    lm = gpt_client.get("/v1/model").json()
    assert lm["architecture"]["name"] == "gpt" and "val_loss" in lm["test_metrics"]
    assert lm["server_limits"]["max_new_tokens_cap"] == 50 and lm["tokenizer"]["kind"] == "char"
    paths = cnn_client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/attention", "/v1/model", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]


# ---- bad requests ---------------------------------------------------------------------------------


def chunks(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels and holds none: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


JSON = {"content-type": "application/json"}
pixels28 = [[0] * 28] * 28
CLASSIFY_CASES = {
    "wrong content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "content type"),
    "no content type": (dict(content=b"hello"), 415, "content type"),
    "not an image": (dict(files={"file": ("x.png", b"not an image", "image/png")}), 400, "PNG or JPEG"),
    "truncated png": (dict(files={"file": ("x.png", png(make_images(1, 0)[0][0])[:60], "image/png")}), 400, "file"),
    "5000x5000 pixels": (dict(files={"file": ("x.png", png_header(5000, 5000), "image/png")}), 400, "over the limit"),
    "a decompression bomb": (dict(files={"file": ("x.png", png_header(30000, 30000), "image/png")}), 400, "file"),
    "gif": (dict(files={"file": ("x.gif", b"GIF89a" + b"\0" * 40, "image/gif")}), 400, "PNG or JPEG"),
    "no file field": (dict(files={"image": ("x.png", b"x", "image/png")}), 400, "'file'"),
    "over the limit, declared": (dict(content=b"[" * (SMALL_BODY + 1), headers=JSON), 413, "limit"),
    "over the limit, chunked": (dict(content=chunks(b" " * (4 * SMALL_BODY)), headers=JSON), 413, "limit"),
    "malformed json": (dict(content=b'{"pixels": [[1, 2]', headers=JSON), 400, "not valid JSON"),
    "no pixels": (dict(json={"pix": pixels28}), 400, "pixels"),
    "ragged rows": (dict(json={"pixels": [[1, 2], [3]]}), 400, "same length"),
    "pixel out of range": (dict(json={"pixels": [[0, 256]]}), 400, "0 to 255"),
    "pixel not a number": (dict(json={"pixels": [["a"]]}), 400, "0 to 255"),
    "pixels not rows": (dict(json={"pixels": 5}), 400, "rows"),
}


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_bad_classify_request_is_a_4xx_json_error(cnn_client, case):
    kwargs, status, needle = CLASSIFY_CASES[case]
    r = cnn_client.post("/v1/classify", **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert cnn_client.get("/healthz").json()["status"] == "ok"
    assert cnn_client.post("/v1/classify", json={"pixels": pixels28}).status_code == 200


GENERATE_CASES = {
    "over the cap": ({"prompt": "First", "max_new_tokens": 51}, 400, "0..50"),
    "negative": ({"prompt": "First", "max_new_tokens": -1}, 400, "0..50"),
    "outside the vocabulary": ({"prompt": "First \u00e9\u00e8"}, 400, "U+00E9"),
    "empty prompt": ({"prompt": ""}, 400, "empty"),
    "negative temperature": ({"prompt": "First", "temperature": -1}, 422, "temperature"),
    "top_k 0": ({"prompt": "First", "top_k": 0}, 422, "top_k"),
    "seed too big": ({"prompt": "First", "seed": 2**64}, 422, "seed"),
    "unknown field": ({"prompt": "First", "max_tokens": 5}, 422, "max_tokens"),
    "no prompt": ({"max_new_tokens": 5}, 422, "prompt"),
    "context_shift negative": ({"prompt": "First", "context_shift": -1}, 422, "context_shift"),
    "context_shift past the context": ({"prompt": "First", "context_shift": 10**6}, 400, "context_shift"),
    "not an object": ([1, 2], 422, "body"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_bad_generate_request_is_a_4xx_json_error(gpt_client, case):
    body, status, needle = GENERATE_CASES[case]
    r = gpt_client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert gpt_client.get("/healthz").json()["status"] == "ok"


def test_malformed_or_non_json_generate_body(gpt_client):
    r = gpt_client.post("/v1/generate", content=b'{"prompt": "Fi', headers=JSON)
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = gpt_client.post("/v1/generate", content=b'{"prompt": "First"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = gpt_client.post("/v1/generate", content=b'{"prompt": "' + b"a" * SMALL_BODY + b'"}', headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert gpt_client.post("/v1/generate", json={"prompt": "First", "max_new_tokens": 3}).status_code == 200


def test_each_endpoint_refuses_the_other_kind_of_model(cnn_client, gpt_client):
    r = gpt_client.post("/v1/classify", json={"pixels": pixels28})
    assert r.status_code == 400 and "needs an image classifier" in r.json()["detail"]
    r = cnn_client.post("/v1/generate", json={"prompt": "First"})
    assert r.status_code == 400 and "needs a language model" in r.json()["detail"]
    assert gpt_client.get("/healthz").status_code == cnn_client.get("/healthz").status_code == 200


# ---- the attention of the last token ------------------------------------------------------------


def test_attention_of_the_last_token_is_softmax_of_its_query_and_the_keys(gpt_run, gpt_client):
    """The answer is the last row of softmax(QK^T / sqrt(d_k)) over the last block_size tokens, checked
    against Q and K read from the last layer's projection on an ordinary forward pass."""
    model, info = nnlab.load(gpt_run)
    block, heads = info["model"]["block_size"], info["model"]["n_head"]
    text = sample_text()[:60]  # the run's corpus: every character is in its vocabulary
    answer = gpt_client.post("/v1/attention", json={"text": text}).json()
    assert answer["tokens"] == list(text[-block:]) and answer["cropped"] == len(text) - block
    assert answer["layers"] == info["model"]["n_layer"] and answer["heads"] == heads

    from nnlab.data import tokenizer_from_json

    ids = torch.tensor([tokenizer_from_json(info["tokenizer"]).encode(text[-block:])])
    seen = {}
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: seen.update(qkv=out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    q, k, _ = seen["qkv"][0].split(model.cfg.n_embd, dim=-1)  # each (T, C)
    q, k = q.view(block, heads, -1).transpose(0, 1), k.view(block, heads, -1).transpose(0, 1)  # (H, T, d_k)
    expected = torch.softmax(q[:, -1:] @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)[:, 0]  # (H, T)
    last_layer = torch.tensor(answer["per_head"][-1])
    torch.testing.assert_close(last_layer, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(answer["mean_of_heads"]), torch.tensor(answer["per_head"]).mean(1),
                               rtol=1e-4, atol=1e-5)
    assert torch.tensor(answer["per_head"]).sum(-1).sub(1).abs().max() < 1e-4
    # Only the context counts: the last block_size characters alone give the same map.
    alone = gpt_client.post("/v1/attention", json={"text": text[-block:]}).json()
    assert alone["cropped"] == 0 and alone["per_head"] == answer["per_head"]


ATTENTION_CASES = {
    "empty text": (dict(json={"text": ""}), 400, "empty"),
    "outside the vocabulary": (dict(json={"text": "First \u00e9"}), 400, "U+00E9"),
    "no text": (dict(json={"prompt": "First"}), 422, "text"),
    "text not a string": (dict(json={"text": 5}), 422, "text"),
    "not an object": (dict(json=["First"]), 422, "body"),
    "malformed json": (dict(content=b'{"text": "Fi', headers=JSON), 400, "not valid JSON"),
    "wrong content type": (dict(content=b'{"text": "First"}', headers={"content-type": "text/plain"}), 415,
                           "application/json"),
    "over the limit": (dict(content=b'{"text": "' + b"a" * SMALL_BODY + b'"}', headers=JSON), 413, "limit"),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_bad_attention_request_is_a_4xx_json_error(gpt_client, case):
    kwargs, status, needle = ATTENTION_CASES[case]
    r = gpt_client.post("/v1/attention", **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert gpt_client.get("/healthz").json()["status"] == "ok"
    assert gpt_client.post("/v1/attention", json={"text": "First"}).status_code == 200


def test_attention_needs_a_language_model(cnn_client):
    r = cnn_client.post("/v1/attention", json={"text": "First"})
    assert r.status_code == 400 and "needs a language model" in r.json()["detail"]
    assert cnn_client.get("/v1/model").json()["attention"] is False
    assert cnn_client.get("/healthz").status_code == 200


# ---- the API token and the bind address --------------------------------------------------------


def test_token_is_required_on_every_path_but_healthz(cnn_run):
    with TestClient(create_app(cnn_run, token="s3cret")) as client:
        for path in ("/v1/model", "/openapi.json"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = client.post("/v1/classify", json={"pixels": pixels28})
        assert r.status_code == 401 and "missing API token" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        ok = client.post("/v1/classify", json={"pixels": pixels28}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/healthz").status_code == 200


def test_serving_beyond_loopback_needs_a_token(cnn_run, cli_main, monkeypatch):
    monkeypatch.delenv("NNLAB_SERVE_TOKEN", raising=False)
    rc, out, err = cli_main("serve", cnn_run, "--host", "0.0.0.0")
    one_line_error(rc, err, "--host 0.0.0.0", "token", "NNLAB_SERVE_TOKEN")
    rc, out, err = cli_main("serve", cnn_run, "--port", "70000")
    one_line_error(rc, err, "--port", "70000")
    rc, out, err = cli_main("serve", cnn_run.parent / "missing")
    one_line_error(rc, err, "missing")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, err = cli_main("serve", cnn_run, "--port", port)
    one_line_error(rc, err, f"--port {port}", "cannot listen")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


# ---- a live server ---------------------------------------------------------------------------------


@contextmanager
def live_server(app):
    """uvicorn serving `app` in a thread on 127.0.0.1 and a free port: yields the port."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_the_servers_connections_send_without_waiting_for_acks():
    """Connections accepted on serve's socket have Nagle's algorithm off: with it on, every response's
    body waits for the client's delayed ACK of its headers (about 40 ms a request on Linux)."""
    import asyncio

    async def accept_one() -> int:
        accepted = asyncio.get_running_loop().create_future()

        async def on_connection(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=listening_socket("127.0.0.1", 0))
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(accept_one()) != 0


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def open_stream(port: int, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/generate", json.dumps({**body, "stream": True}), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    return conn, response


def test_stream_live_and_a_client_that_leaves_stops_the_generation(gpt_run):
    app = create_app(gpt_run, max_new_tokens_cap=1_000_000)
    with live_server(app) as port:
        conn, response = open_stream(port, {"prompt": "First", "max_new_tokens": 40, "temperature": 0})
        events = parse_events(response.read().decode())
        conn.close()
        assert events[-1] == ("done", {"text": generate_text(gpt_run, "First", 40, temperature=0)})
        assert len(events) == 41

        # A million tokens would take minutes: the server must stop soon after the client goes.
        conn, response = open_stream(port, {"prompt": "First", "max_new_tokens": 1_000_000})
        first = [response.readline() for _ in range(6)]  # three events: data line, blank line
        assert all(line.startswith(b"data: ") for line in first[::2])
        assert get_json(port, "/healthz")["streams_open"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 10
        while get_json(port, "/healthz")["streams_open"] != 0:
            assert time.monotonic() < deadline, "the stream kept running after its client left"
            time.sleep(0.05)
        assert app.state.model.tokens_generated < 1_000_000
        before = app.state.model.tokens_generated
        time.sleep(0.3)
        assert app.state.model.tokens_generated == before  # no generation runs on in the background
        assert get_json(port, "/healthz")["status"] == "ok"


def test_nnlab_serve_command_answers_on_its_port(cnn_run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(cli_cmd("serve", cnn_run, "--port", port), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = get_json(port, "/healthz")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "nnlab serve did not answer"
                time.sleep(0.1)
        assert health["status"] == "ok"
        assert get_json(port, "/v1/model")["architecture"]["name"] == "seed-cnn"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"127.0.0.1:{port}" in out and "Traceback" not in err


# ---- the page in a browser ---------------------------------------------------------------------------


def open_page(browser, port: int, found: dict):
    """A page of the server at `port`; any request elsewhere is aborted and recorded in found."""
    origin = f"http://127.0.0.1:{port}/"
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin) else (
        found["elsewhere"].append(route.request.url), route.abort()))
    page.on("console", lambda m: m.type == "error" and found["console_errors"].append(m.text))
    page.on("pageerror", lambda e: found["console_errors"].append(str(e)))
    page.goto(origin, wait_until="load")
    return page


def test_the_page_in_headless_chromium(cnn_run, gpt_run, onnx_cnn_run, tmp_path):
    """Draw and upload on a classifier's page (torch and onnxruntime backends), stream text on a
    language model's page; screenshots are saved (and copied into $NNLAB_SERVE_SCREENSHOTS when set)."""
    import os

    from playwright.sync_api import sync_playwright

    from test_report import browser_or_skip

    browser_or_skip()
    found = {"elsewhere": [], "console_errors": []}
    sent = []
    lm = create_app(gpt_run, max_new_tokens_cap=1_000_000)
    with live_server(create_app(cnn_run)) as cnn_port, live_server(lm) as gpt_port, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            page = open_page(browser, cnn_port, found)
            page.on("request", lambda r: r.url.endswith("saliency=true") and r.post_data and sent.append(r.post_data))
            page.wait_for_selector("#classifier:not([hidden])")
            box = page.locator("#draw").bounding_box()
            page.mouse.move(box["x"] + 90, box["y"] + 60)
            page.mouse.down()
            for x, y in ((95, 220), (190, 220), (185, 60)):  # a U shape
                page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
            page.mouse.up()
            page.click("#classify")
            page.wait_for_function("document.body.dataset.state === 'classified'")
            bars = page.eval_on_selector_all("#bars .bar",
                                             "bs => bs.map(b => [b.dataset.name, +b.dataset.probability])")
            # The page shows what the API answers for the pixels it sent.
            pixels = json.loads(sent[-1])["pixels"]
            assert len(pixels) == 28 and max(map(max, pixels)) == 255 and min(map(min, pixels)) == 0
            with TestClient(create_app(cnn_run)) as client:
                api = client.post("/v1/classify?top_k=10", json={"pixels": pixels}).json()["classes"]
            assert [name for name, _ in bars] == [c["name"] for c in api]
            assert [p for _, p in bars] == pytest.approx([c["probability"] for c in api], abs=1e-6)
            red = page.evaluate("""() => { const d = document.getElementById('saliency').getContext('2d')
                .getImageData(0, 0, 280, 280).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 1] + 60) n++; return n; }""")
            assert red > 100  # the saliency overlay is drawn
            page.screenshot(path=tmp_path / "page-draw.png")

            pixels, label = sample_images()[2]
            (tmp_path / "upload.png").write_bytes(png(pixels, "RGB", (56, 56)))
            page.evaluate("document.body.dataset.state = ''")
            page.set_input_files("#file", tmp_path / "upload.png")
            page.wait_for_function("document.body.dataset.state === 'classified'")
            top = page.eval_on_selector("#bars .bar", "b => b.dataset.name")
            assert top == nnlab.load(cnn_run)[1]["classes"][label]
            page.screenshot(path=tmp_path / "page-upload.png")

            page = open_page(browser, gpt_port, found)
            page.wait_for_selector("#generator:not([hidden])")
            # A million tokens cannot finish during the test: text that grows while the page still
            # waits for the end arrived token by token; Stop then ends the stream on the server.
            page.fill("#prompt", "First")
            page.fill("#tokens", "1000000")
            page.click("#generate")
            page.wait_for_function("document.getElementById('output').textContent.length > 40 "
                                   "&& document.body.dataset.state === 'generating'")
            page.click("#stop")
            deadline = time.monotonic() + 10
            while get_json(gpt_port, "/healthz")["streams_open"] != 0:
                assert time.monotonic() < deadline, "Stop left the stream running on the server"
                time.sleep(0.05)
            assert page.evaluate("document.body.dataset.state") == "generating"  # stopped, never done
            assert page.evaluate("document.body.dataset.attention") is None  # no map for a stopped text
            page.fill("#tokens", "40")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("document.body.dataset.state === 'generated'")
            text = generate_text(gpt_run, "First", 40, temperature=0)
            assert page.text_content("#output") == text
            page.screenshot(path=tmp_path / "page-generate.png")

            # The last token's attention map: one row per layer, the API's weights for the whole text.
            page.wait_for_function("document.body.dataset.attention === 'shown'")
            with TestClient(lm) as client:
                want = client.post("/v1/attention", json={"text": text}).json()
            shown = lambda: page.eval_on_selector_all(  # noqa: E731
                "#attention-map .attn-layer", "rows => rows.map(r => [...r.querySelectorAll('.attn-tok')]"
                ".map(c => +c.dataset.weight))")
            assert page.is_visible("#attention-map") and len(shown()) == want["layers"]
            assert shown() == want["mean_of_heads"]  # the numbers the API sent, drawn as they came
            assert page.eval_on_selector_all("#attention-map .attn-layer:first-child .attn-tok",
                                             "cs => cs.map(c => c.title.split(':')[0])") == [
                json.dumps(t) for t in want["tokens"]]
            page.select_option("#attention-head", "1")  # the second head alone
            assert shown() == [layer[1] for layer in want["per_head"]]
            page.screenshot(path=tmp_path / "page-attention.png")

            # On the onnxruntime backend the page asks no saliency (it has no gradients) and still classifies.
            with live_server(create_app(onnx_cnn_run, backend="onnxruntime")) as onnx_port:
                page = open_page(browser, onnx_port, found)
                page.wait_for_selector("#classifier:not([hidden])")
                page.set_input_files("#file", tmp_path / "upload.png")
                page.wait_for_function("document.body.dataset.state === 'classified'")
                assert page.eval_on_selector("#bars .bar", "b => b.dataset.name") == top
                assert page.text_content("#error") == ""
                page.screenshot(path=tmp_path / "page-onnx.png")
        finally:
            browser.close()
    assert found == {"elsewhere": [], "console_errors": []}
    for shot in ("page-draw.png", "page-upload.png", "page-generate.png", "page-attention.png", "page-onnx.png"):
        assert (tmp_path / shot).read_bytes().startswith(b"\x89PNG")
        if os.environ.get("NNLAB_SERVE_SCREENSHOTS"):
            shutil.copy(tmp_path / shot, os.environ["NNLAB_SERVE_SCREENSHOTS"])
    print(f"page screenshots: {tmp_path}")
