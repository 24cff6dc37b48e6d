"""The model behind the server: loaded once from a run folder, then asked from many threads.

Everything here is synchronous CPU work (decode an image, a forward pass, a gradient, a decoding
step); the app runs it off the event loop. The weights are frozen (requires_grad False): requests
never train, concurrent forward passes then build no graph through the parameters, and a saliency
map's gradient reaches only its own input.
"""

from __future__ import annotations

import base64
import inspect
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nnlab.config import read_yaml
from nnlab.errors import NnlabError
from nnlab.generate import generate_stream, generate_text
from nnlab.runfolder import CONFIG, SUMMARY, load, read_json

MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before their pixels are decoded
# The sampling defaults of `nnlab generate`, declared once in generate_text.
GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(generate_text).parameters.items()
                     if k in ("max_new_tokens", "temperature", "top_k", "seed")}


class BadRequest(NnlabError):
    """A request the model cannot answer; the message says why (the app sends it as a 4xx)."""


def decode_image(data: bytes | None = None, pixels=None, in_channels: int = 1, image_size: int = 28) -> Tensor:
    """An uploaded PNG/JPEG file or a JSON list of pixel rows -> uint8 (C, H, W), the model's input size.

    Conversion: Pillow's "L" (ITU-R 601 luma) for one channel or "RGB" for three; then a bilinear
    resize (antialiased when shrinking) to image_size x image_size, aspect ratio not kept; no
    inversion, so drawings should be light on dark like Fashion-MNIST. `pixels` is a list of equal
    rows of 0-255 numbers (grey).
    """
    from PIL import Image, UnidentifiedImageError

    if pixels is not None:
        image = Image.fromarray(_pixel_rows(pixels), mode="L")
    else:
        try:
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        except Image.DecompressionBombError as e:  # a header claiming far more pixels than MAX_IMAGE_PIXELS
            raise BadRequest(f"file: {e}") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise BadRequest("file: not a PNG or JPEG image that Pillow can decode") from None
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise BadRequest(f"file: {image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data after the header
            raise BadRequest(f"file: the image does not decode ({e})") from None
    image = image.convert("L" if in_channels == 1 else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()  # (C, H, W)


def _pixel_rows(pixels) -> np.ndarray:
    if not (isinstance(pixels, list) and pixels and all(isinstance(r, list) and r for r in pixels)):
        raise BadRequest("pixels: must be a non-empty list of non-empty rows of numbers 0-255")
    if len({len(r) for r in pixels}) != 1:
        raise BadRequest("pixels: every row must have the same length")
    if len(pixels) * len(pixels[0]) > MAX_IMAGE_PIXELS:
        raise BadRequest(f"pixels: {len(pixels)}x{len(pixels[0])} is over the limit of {MAX_IMAGE_PIXELS} pixels")
    try:
        values = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError):  # a string or a nested list among the values
        values = None
    if values is None or values.ndim != 2 or not np.all((values >= 0) & (values <= 255)):  # NaN fails too
        raise BadRequest("pixels: every value must be a number from 0 to 255")
    return np.rint(values).astype(np.uint8)


def png_base64(values: Tensor) -> str:
    """A (H, W) map of values >= 0, scaled to its maximum, as a base64 grey PNG."""
    from PIL import Image

    peak = float(values.max())
    grey = (values / peak * 255).round() if peak > 0 else torch.zeros_like(values)
    buf = io.BytesIO()
    Image.fromarray(grey.to(torch.uint8).numpy(), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ServedModel:
    """A run folder's model, its model.json, and what the endpoints ask of it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.model, self.info = load(self.run_dir)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.task = self.info.get("task")
        self.tokens_generated = 0  # by every request so far: a stopped stream stops this count
        self.is_classifier = self.task == "image"
        self.is_language_model = self.task == "text"
        if self.is_language_model:
            from nnlab.data import tokenizer_from_json

            self.tokenizer = tokenizer_from_json(self.info["tokenizer"])
        if self.is_classifier:
            self.classes = self.info["classes"]
            self.in_channels, self.image_size, _ = self.info["input_shape"]
            self.mean, self.std = self.info["normalize"]["mean"], self.info["normalize"]["std"]

    @property
    def kind(self) -> str:
        return f"{self.info['model']['name']} ({self.task})"

    def card(self) -> dict:
        """The model card: what the model is, what it was trained on and with, and how well it did."""
        config = read_yaml(self.run_dir / CONFIG) if (self.run_dir / CONFIG).exists() else {}
        summary = read_json(self.run_dir / SUMMARY) if (self.run_dir / SUMMARY).exists() else {}
        metrics = {k: v for k, v in summary.items() if k.startswith(("test_", "val_"))}
        card = {"run": self.run_dir.name, "task": self.task, "architecture": self.info["model"],
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "recipe": summary.get("recipe"), "data": config.get("data"), "test_metrics": metrics,
                "training": {"steps": summary.get("steps"), "precision": summary.get("precision"),
                             "precision_reason": summary.get("precision_reason"),
                             "processor": (summary.get("machine") or {}).get("cpu") or summary.get("cpu"),
                             "gpu": summary.get("gpu"), "torch": summary.get("torch"),
                             "nnlab": summary.get("nnlab"), "git_commit": summary.get("git_commit")}}
        if self.is_classifier:
            card["classes"] = self.classes
            card["input"] = {"channels": self.in_channels, "size": self.image_size, "normalize": self.info["normalize"]}
        if self.is_language_model:
            card["tokenizer"] = {"kind": self.info["tokenizer"].get("kind"), "vocab_size": self.tokenizer.vocab_size}
        return card

    # ---- classification -------------------------------------------------------------------------

    def image(self, data: bytes | None = None, pixels=None) -> Tensor:
        """A request's image as uint8 (C, H, W) at the model's input size."""
        if not self.is_classifier:
            raise BadRequest(f"this server holds a {self.kind} model; /v1/classify needs an image classifier")
        return decode_image(data, pixels, self.in_channels, self.image_size)

    def _normalise(self, images: Tensor) -> Tensor:
        return (images.float() / 255.0 - self.mean) / self.std  # as training saw them (ImageData.normalize)

    def probabilities(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> class probabilities (B, num_classes)."""
        with torch.inference_mode():
            return torch.softmax(self.model(self._normalise(images)).float(), dim=-1)

    def saliency(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(class probabilities (num_classes,), |d logit_c / d x| (H, W)) for one uint8 (C, H, W) image,
        c the top class and x the normalised model input, the largest over the channels."""
        x = self._normalise(image.unsqueeze(0)).requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x).float()
            top = int(logits.argmax(dim=-1))
            (grad,) = torch.autograd.grad(logits[0, top], x)
        return torch.softmax(logits.detach()[0], dim=-1), grad[0].abs().amax(dim=0)

    def top_classes(self, probs: Tensor, k: int) -> list[dict]:
        values, indices = torch.topk(probs, min(k, len(self.classes)))
        return [{"index": int(i), "name": self.classes[int(i)], "probability": float(v)}
                for v, i in zip(values, indices)]

    # ---- generation ------------------------------------------------------------------------------

    def token_stream(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                     seed: int) -> Iterator[str]:
        """The text each new token adds to `prompt`, token by token (KV-cached, nnlab.generate)."""
        if not self.is_language_model:
            raise BadRequest(f"this server holds a {self.kind} model; /v1/generate needs a language model")
        if not prompt:
            raise BadRequest("prompt: must not be empty")
        try:
            ids = self.tokenizer.encode(prompt)
        except NnlabError as e:
            raise BadRequest(f"prompt: {str(e).removeprefix('data: ')}") from None
        tokens = generate_stream(self.model, torch.tensor([ids], dtype=torch.long), max_new_tokens,
                                 temperature=temperature, top_k=top_k,
                                 generator=torch.Generator().manual_seed(seed))
        return self._texts(tokens)

    def _texts(self, tokens: Iterator[Tensor]) -> Iterator[str]:
        new_ids, sent = [], ""
        try:
            for token in tokens:
                self.tokens_generated += 1
                new_ids.append(int(token))
                text = self.tokenizer.decode(new_ids)
                # A byte tokenizer can stop inside a multi-byte character: wait for the rest of it.
                if not text.endswith("\ufffd"):
                    yield text[len(sent):]
                    sent = text
            if len(text := self.tokenizer.decode(new_ids)) > len(sent):
                yield text[len(sent):]
        finally:
            tokens.close()  # frees the KV cache now, not when the garbage collector finds it

