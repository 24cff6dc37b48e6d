"""One-shot prediction from a run folder: image files through a classifier, or a prompt through a
language model. The image preprocessing here is the one the server shares.

An image of any size, mode or channel count becomes the model's input in these steps, each
reported back in words (`ModelInput.conversion`) so nothing happens silently:

  1. decode (PNG or JPEG only, or rows of 0-255 values); an image over MAX_PIXELS (the server sets
     a lower limit) is refused from its header, before its pixels are decoded, and Pillow's
     decompression-bomb guard refuses headers far beyond that; 16-bit grey scaled to 8 bits;
     transparency composited onto black, the training images' background;
  2. to the model's channels: ITU-R 601 luma ("L") for a 1-channel model, RGB (grey repeated) for 3;
  3. polarity: the Fashion-MNIST/MNIST convention is a light object on a dark background. With
     invert=None (auto) an image whose one-pixel border is mostly light (mean > 127.5) is taken to
     be a dark object on a light background (a photo, a drawing on white) and inverted; True and
     False force it;
  4. a non-square image is padded to a square with its border's median value (the object keeps its
     shape, as Fashion-MNIST's own preparation keeps it), then resized to the model's image_size
     with the bilinear (antialiased when shrinking) resize the training data went through;
  5. the run's own normalisation from model.json: (x/255 - mean) / std.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from nnlab.errors import NnlabError

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 50_000_000  # decoding a larger image would take gigabytes: refused as a likely bomb
DEFAULT_TOP_K = 5  # classes shown per image (all of them when the model has fewer)


class ModelInput(NamedTuple):
    x: Tensor  # (1, C, H, W) float32, normalised as the model was trained
    conversion: list[str]  # every step taken from the file to x, in words


def decode_image(image, name: str | None = None, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:  # noqa: F821
    """A PIL image from bytes, a path, a PIL image or an array of 0-255 values ((H, W) or (H, W, C):
    numpy, or lists of pixel rows as the server's JSON carries them). Anything that does not decode
    as PNG or JPEG, or holds more than `max_pixels` pixels, is a one-line NnlabError that starts
    with `name` (default: the path, "image" for bytes, "pixels" for an array). The pixel count is
    checked from the header, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (np.ndarray, list)):
        return _from_rows(image, name or "pixels", max_pixels)
    if not isinstance(image, (str, Path, bytes, bytearray, memoryview)):
        raise NnlabError(f"{name or 'image'}: expected image bytes, a path, a PIL image or pixel rows, "
                         f"got {type(image).__name__}")
    name = name or (str(image) if isinstance(image, (str, Path)) else "image")
    try:
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    except FileNotFoundError:
        raise NnlabError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise NnlabError(f"{name}: is a folder, not an image file") from None
    except OSError as e:
        raise NnlabError(f"{name}: cannot read ({e.strerror})") from None
    img = None
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in FORMATS:
            raise NnlabError(f"{name}: a {img.format} image; only PNG or JPEG images are read")
        if img.width * img.height > max_pixels:
            raise NnlabError(f"{name}: {img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
        img.load()  # decode now: a truncated file fails here, not later
    except Image.DecompressionBombError:  # a header claiming far more pixels than Pillow's own limit
        raise NnlabError(f"{name}: its header claims an image too large to decode (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise NnlabError(f"{name}: not a PNG or JPEG image (cannot decode it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a damaged file
        kind = img.format if img is not None else "PNG or JPEG"
        raise NnlabError(f"{name}: a damaged {kind} image ({e})") from None
    return img


def _from_rows(rows, name: str, max_pixels: int) -> PIL.Image.Image:  # noqa: F821
    from PIL import Image

    try:
        arr = np.asarray(rows)
    except ValueError:  # ragged rows
        raise NnlabError(f"{name}: rows of different lengths; every row must have the same length") from None
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise NnlabError(f"{name}: expected rows of values (H, W) or (H, W, 1|3|4), got shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise NnlabError(f"{name}: {arr.shape[1]}x{arr.shape[0]} pixels is over the limit of {max_pixels:,}")
    if arr.dtype.kind not in "biuf":
        raise NnlabError(f"{name}: every value must be a number from 0 to 255 (got {arr.dtype}, not numbers)")
    if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 255):
        raise NnlabError(f"{name}: every value must be a number from 0 to 255 (got {arr.min():g}..{arr.max():g}, "
                         "outside 0..255)")
    arr = np.rint(arr).astype(np.uint8)
    return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def image_to_input(image, info: dict, invert: bool | None = None, name: str | None = None,
                   max_pixels: int = MAX_PIXELS) -> ModelInput:
    """The model input for one image (see the module docstring for the steps), from anything
    decode_image reads (bytes, a path, a PIL image, pixel rows), and a classifier's model.json
    `info`. `name` and `max_pixels` go to decode_image: the server names the request's field and
    sets its own, lower, limit."""
    from PIL import Image

    from nnlab.data.images import resize_images

    if info.get("task") != "image":
        raise NnlabError(f"the model takes {info.get('task')} data, not images")
    channels, size = info["model"]["in_channels"], info["model"]["image_size"]
    img = decode_image(image, name, max_pixels)
    steps = [f"decoded {img.format or 'pixels'} {img.width}x{img.height} {img.mode}"]
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64) * (255.0 / (65535.0 if img.mode != "F" else max(1.0, np.max(img))))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        steps.append("scaled to 8 bits")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        steps.append("transparency composited onto black")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
        steps.append("converted to grayscale (luma)" if target == "L" else "converted to RGB")
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1)
    light = float(border.mean()) > 127.5
    if invert if invert is not None else light:
        arr = 255 - arr
        why = "asked" if invert else f"light background, border mean {border.mean():.0f}"
        steps.append(f"inverted ({why}): the model expects a light object on a dark background")
    else:
        why = "asked" if invert is False else f"dark background, border mean {border.mean():.0f}"
        steps.append(f"not inverted ({why})")
    arr = _pad_square(arr, steps)
    x = resize_images(torch.from_numpy(arr)[None], size)
    if x.shape[2] != arr.shape[1]:
        steps.append(f"resized {arr.shape[2]}x{arr.shape[1]} -> {size}x{size} (bilinear)")
    norm = info["normalize"]
    steps.append(f"normalised (x/255 - {norm['mean']:.4f}) / {norm['std']:.4f}")
    return ModelInput((x.to(torch.float32) / 255.0 - norm["mean"]) / norm["std"], steps)


def _pad_square(arr: np.ndarray, steps: list[str]) -> np.ndarray:
    """(C, H, W) padded, centred, to (C, S, S) with S = max(H, W), filled with the border's median."""
    c, h, w = arr.shape
    if h == w:
        return arr
    s = max(h, w)
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1)
    fill = np.median(border, axis=1).astype(np.uint8)  # (C,)
    out = np.broadcast_to(fill[:, None, None], (c, s, s)).copy()
    top, left = (s - h) // 2, (s - w) // 2
    out[:, top:top + h, left:left + w] = arr
    steps.append(f"padded {w}x{h} -> {s}x{s} with the border's median ({', '.join(map(str, fill))})")
    return out


@torch.no_grad()
def classify(model: nn.Module, info: dict, x: Tensor, top_k: int = DEFAULT_TOP_K) -> list[list[dict]]:
    """The top_k classes of each row of x (N, ...): per row a list of {"class", "index",
    "probability"} ordered by probability (softmax of the logits)."""
    classes = info["classes"]
    _check_top_k(top_k, len(classes))
    probs = torch.softmax(model(x).float(), dim=-1)  # (N, classes)
    p, idx = probs.topk(top_k, dim=-1)
    return [[{"class": classes[i], "index": i, "probability": float(q)} for q, i in zip(pr.tolist(), ir.tolist())]
            for pr, ir in zip(p, idx)]


def _check_top_k(top_k, n_classes: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_classes:
        raise NnlabError(f"--top-k: must be between 1 and {n_classes} (the model's classes), got {top_k}")


def predict(run_dir, files=(), prompt: str | None = None, top_k: int | None = None, invert: bool | None = None,
            **generate_options) -> dict:
    """Classify image `files` with an image classifier, or continue `prompt` with a language model
    (generate_options: max_new_tokens, temperature, seed, as nnlab.generate.generate_text; top_k is
    its sampling top-k there). Returns the JSON-able result that `nnlab predict --json` prints."""
    from nnlab.runfolder import load

    model, info = load(run_dir)
    task = info.get("task")
    if task == "text":
        if files:
            raise NnlabError(f"{run_dir}: a language model takes --prompt, not files ({files[0]})")
        if prompt is None:
            raise NnlabError(f"{run_dir}: a language model: give --prompt TEXT")
        return _continue(run_dir, prompt, top_k, generate_options)
    if task != "image":
        raise NnlabError(f"{run_dir}: a {task} model; predict takes image classifiers and language models")
    if prompt is not None or generate_options:
        raise NnlabError(f"{run_dir}: an image classifier takes image files, not --prompt or sampling options")
    if not files:
        raise NnlabError(f"{run_dir}: give one or more PNG or JPEG files")
    top_k = min(DEFAULT_TOP_K, len(info["classes"])) if top_k is None else top_k
    _check_top_k(top_k, len(info["classes"]))  # before any file is read
    inputs = [image_to_input(f, info, invert) for f in files]
    ranked = classify(model, info, torch.cat([i.x for i in inputs]), top_k)
    m, data = info["model"], _data_name(run_dir)
    return {"run": str(run_dir), "task": "image", "model": m["name"],
            "input": {"channels": m["in_channels"], "size": m["image_size"], "normalize": info["normalize"],
                      "convention": f"a light object on a dark background, as in {data}; images on a light "
                                    "background are inverted unless --no-invert"},
            "predictions": [{"file": str(f), "conversion": i.conversion, "top_k": r}
                            for f, i, r in zip(files, inputs, ranked)]}


def _data_name(run_dir) -> str:
    from nnlab.runfolder import read_config

    try:
        return f"the training images ({read_config(run_dir).data.name})"
    except NnlabError:  # the model alone is enough to predict; config.yaml only names the data
        return "the training images"


def _continue(run_dir, prompt: str, top_k: int | None, options: dict) -> dict:
    from nnlab.generate import generate_text

    kw = {**options, **({"top_k": top_k} if top_k is not None else {})}
    text = generate_text(run_dir, prompt, **kw)
    return {"run": str(run_dir), "task": "text", "prompt": prompt, "completion": text[len(prompt):], "text": text,
            "options": kw}


def table(result: dict):
    """A rich table of predict()'s image result: one row per file and class."""
    from rich.table import Table

    t = Table(title=f"{result['model']}: top classes", caption=f"input: {result['input']['convention']}")
    for col in ("file", "class", "probability", "conversion"):
        t.add_column(col, justify="right" if col == "probability" else "left")
    for p in result["predictions"]:
        for rank, c in enumerate(p["top_k"]):
            t.add_row(p["file"] if rank == 0 else "", c["class"], f"{c['probability']:.3f}",
                      "; ".join(p["conversion"]) if rank == 0 else "", end_section=rank == len(p["top_k"]) - 1)
    return t
