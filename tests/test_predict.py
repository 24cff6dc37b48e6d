"""`nnlab predict`: image files give the model's own predictions on the same tensors; colour, odd
sizes, light backgrounds and JPEG are converted as documented; a language model continues a prompt
as `generate` does; bad input is a one-line error that leaves the run folder as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nnlab
from conftest import one_line_error
from nnlab.predict import image_to_input
from nnlab.runfolder import read_config
from nnlab.tasks import make_task

pytestmark = pytest.mark.usefixtures("one_thread")
N = 40  # test images written as files


def _train(recipe: str, sets: list[str], out: Path) -> Path:
    return nnlab.train(recipe, [*sets, "train.log_every=1000", "train.eval_every=1000"], out=str(out))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, fmnist_dir) -> Path:
    torch.set_num_threads(1)
    return _train("seed-cnn", [f"data.dir={fmnist_dir}", "train.max_steps=20", "train.batch_size=32"],
                  tmp_path_factory.mktemp("predict") / "cnn")


@pytest.fixture(scope="module")
def test_split(cnn_run):
    """(uint8 images (N, 28, 28), the model's normalised inputs (N, 1, 28, 28), the model's logits)."""
    task = make_task(read_config(cnn_run))
    model, _ = nnlab.load(cnn_run)
    with torch.no_grad():
        logits = model(task.x_test[:N])
    return task.data.x_test[:N, 0].numpy(), task.x_test[:N], logits


def _write(folder: Path, images, name: str, convert=lambda im: im, ext: str = "png") -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, a in enumerate(images):
        p = folder / f"{name}{i}.{ext}"
        convert(Image.fromarray(a)).save(p)
        paths.append(p)
    return paths


def _predict(cli_main, run, *args) -> dict:
    rc, out, err = cli_main("predict", run, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def _top1(result: dict) -> list[int]:
    return [p["top_k"][0]["index"] for p in result["predictions"]]


def test_png_files_get_the_models_predictions_on_the_same_tensors(cnn_run, test_split, cli_main, tmp_path):
    images, x, logits = test_split
    files = _write(tmp_path / "png", images, "gray")
    result = _predict(cli_main, cnn_run, *files, "--top-k", "3")
    assert _top1(result) == logits.argmax(1).tolist()
    probs = torch.softmax(logits, 1)
    for p, row in zip(result["predictions"], probs):
        assert [c["index"] for c in p["top_k"]] == row.topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor([c["probability"] for c in p["top_k"]]), row.topk(3).values)
        assert any("not inverted" in s for s in p["conversion"]), p["conversion"]
    # The tensor itself, not only its argmax: the files decode to exactly the model's input.
    info = nnlab.load(cnn_run)[1]
    torch.testing.assert_close(image_to_input(files[0], info).x, x[:1], rtol=0, atol=0)
    assert result["input"]["channels"] == 1 and "dark background" in result["input"]["convention"]


def test_rgb_inverted_and_jpeg_images_are_converted(cnn_run, test_split, cli_main, tmp_path):
    images, _, logits = test_split
    want = logits.argmax(1).tolist()
    rgb = _predict(cli_main, cnn_run, *_write(tmp_path / "rgb", images, "rgb", lambda im: im.convert("RGB")))
    assert _top1(rgb) == want  # grey repeated in R, G, B has the same luma
    assert "converted to grayscale (luma)" in rgb["predictions"][0]["conversion"]
    light = _write(tmp_path / "light", 255 - images, "light")
    inv = _predict(cli_main, cnn_run, *light)
    assert _top1(inv) == want  # a dark object on white is inverted back
    assert all(any(s.startswith("inverted (light background") for s in p["conversion"]) for p in inv["predictions"])
    kept = _predict(cli_main, cnn_run, *light, "--no-invert")
    assert _top1(kept) != want and "not inverted (asked)" in kept["predictions"][0]["conversion"]
    jpeg = _predict(cli_main, cnn_run, *_write(tmp_path / "jpg", images, "q", ext="jpg"))
    assert np.mean(np.array(_top1(jpeg)) == np.array(want)) >= 0.9  # lossy, but the same pictures


def test_odd_sizes_are_resized_and_padded(cnn_run, test_split, cli_main, tmp_path):
    images, x, logits = test_split
    info = nnlab.load(cnn_run)[1]
    big = _write(tmp_path / "big", images, "big", lambda im: im.resize((56, 56), Image.NEAREST))
    result = _predict(cli_main, cnn_run, *big)
    assert "resized 56x56 -> 28x28 (bilinear)" in result["predictions"][0]["conversion"]
    assert np.mean(np.array(_top1(result)) == logits.argmax(1).numpy()) >= 0.9
    # A 28-wide, 20-high image keeps its shape: 4 rows of the border's median above and below it.
    wide = images[0, 4:24].copy()
    wide[0], wide[-1] = 7, 7  # top and bottom rows set the border's median
    got = image_to_input(wide, info)
    assert got.x.shape == (1, 1, 28, 28) and any(s.startswith("padded 28x20 -> 28x28") for s in got.conversion)
    n = info["normalize"]
    torch.testing.assert_close(got.x[0, 0, 4:24], (torch.from_numpy(wide).float() / 255 - n["mean"]) / n["std"])
    torch.testing.assert_close(got.x[0, 0, :4], torch.full((4, 28), (7 / 255 - n["mean"]) / n["std"]))


def test_transparency_is_composited_onto_black(cnn_run, test_split):
    images, x, _ = test_split
    info = nnlab.load(cnn_run)[1]
    # White everywhere, opaque only where the image is: over black this is the image itself.
    la = Image.fromarray(np.stack([np.full_like(images[0], 255), images[0]], axis=-1), mode="LA")
    got = image_to_input(la, info)
    assert "transparency composited onto black" in got.conversion
    torch.testing.assert_close(got.x, x[:1], atol=2 / 255 / info["normalize"]["std"], rtol=0)


def test_pixel_rows_are_an_image_too(cnn_run, test_split):
    """The server's JSON body: rows of 0-255 values, as lists."""
    from nnlab.errors import NnlabError

    images, x, _ = test_split
    info = nnlab.load(cnn_run)[1]
    torch.testing.assert_close(image_to_input(images[0].tolist(), info).x, x[:1], rtol=0, atol=0)
    for bad, needle in (([[1, 2], [3]], "different lengths"), ([[0, 256]], "0..255"), ([["a"]], "numbers"),
                        ([1, 2, 3], "shape")):
        with pytest.raises(NnlabError, match=needle):
            image_to_input(bad, info)


def test_language_model_continues_a_prompt_as_generate_does(tmp_path_factory, text_file, cli_main):
    from nnlab.generate import generate_text

    torch.set_num_threads(1)
    run = _train("gpt-shakespeare", [f"data.path={text_file}", "model.preset=tiny", "train.max_steps=5",
                                     "train.eval_iters=1"], tmp_path_factory.mktemp("predict") / "gpt")
    result = _predict(cli_main, run, "--prompt", "First", "--max-new-tokens", "12", "--temperature", "0")
    assert result["text"] == generate_text(run, "First", max_new_tokens=12, temperature=0)
    assert result["text"] == "First" + result["completion"] and len(result["completion"]) == 12
    rc, _, err = cli_main("predict", run, "some.png")
    one_line_error(rc, err, "--prompt")


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_bad_input_is_one_line_and_changes_nothing(cnn_run, test_split, cli_main, tmp_path):
    images = test_split[0]
    good = _write(tmp_path / "ok", images[:1], "ok")[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])  # a PNG header, its data cut off
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    gif = tmp_path / "pic.gif"
    Image.fromarray(images[0]).save(gif)
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    before = _digest(cnn_run)
    for args, needle in [((cnn_run, corrupt), "corrupt.png"), ((cnn_run, tmp_path / "missing.png"), "no such file"),
                         ((cnn_run, text), "not a PNG or JPEG"), ((cnn_run, gif), "GIF"),
                         ((empty_run, good), "model.json"), ((cnn_run, good, "--top-k", "0"), "--top-k"),
                         ((cnn_run, good, "--top-k", "11"), "between 1 and 10"), ((cnn_run,), "PNG or JPEG"),
                         ((cnn_run, good, "--prompt", "hi"), "--prompt")]:
        rc, out, err = cli_main("predict", *args)
        one_line_error(rc, err, needle)
    assert _digest(cnn_run) == before


def test_table_on_screen(cnn_run, test_split, cli_main, tmp_path):
    files = _write(tmp_path / "t", test_split[0][:2], "t")
    rc, out, err = cli_main("predict", cnn_run, *files, "--top-k", "2")
    assert rc == 0, err
    assert "t0.png" in out and "t1.png" in out and "probability" in out and "normalised" in out
