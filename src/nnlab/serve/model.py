"""The model behind the server: loaded once from a run folder, then asked from many threads.

Everything here is synchronous CPU work (decode an image, a forward pass, a gradient, a decoding
step); the app runs it off the event loop. The weights are frozen (requires_grad False): requests
never train, concurrent forward passes then build no graph through the parameters, and a saliency
map's gradient reaches only its own input.

Images become the model's input through nnlab.predict.image_to_input, the conversion `nnlab
predict` uses, so a file gives the same probabilities from either. Its automatic inversion (an
image on a light background is inverted) leaves the page's canvas, light strokes on black, as
drawn; a request can force it either way (?invert=true|false).

Backends: "torch" runs the run's PyTorch model; "onnxruntime" runs RUN_DIR/model.onnx (written by
`nnlab export`). onnxruntime gives no gradients, so it answers no saliency request; a language
model's export has no KV cache, so generation reruns the whole (cropped) context for every token,
as nnlab.generate does with use_cache=False, and gives the same tokens as the torch backend.
"""

from __future__ import annotations

import base64
import inspect
import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from nnlab.config import read_yaml
from nnlab.errors import NnlabError
from nnlab.generate import generate_stream, generate_text
from nnlab.predict import ModelInput, image_to_input
from nnlab.runfolder import CONFIG, MODEL_INFO, ONNX_MODEL, SUMMARY, load, read_json

BACKENDS = ("torch", "onnxruntime")
MAX_IMAGE_PIXELS = 4096 * 4096  # per request, below predict's limit: many requests decode at once
# The sampling defaults of `nnlab generate`, declared once in generate_text.
GENERATE_DEFAULTS = {k: p.default for k, p in inspect.signature(generate_text).parameters.items()
                     if k in ("max_new_tokens", "temperature", "top_k", "seed")}


class BadRequest(NnlabError):
    """A request the model cannot answer; the message says why (the app sends it as a 4xx)."""


def png_base64(values: Tensor) -> str:
    """A (H, W) map of values >= 0, scaled to its maximum, as a base64 grey PNG."""
    from PIL import Image

    peak = float(values.max())
    grey = (values / peak * 255).round() if peak > 0 else torch.zeros_like(values)
    buf = io.BytesIO()
    Image.fromarray(grey.to(torch.uint8).numpy(), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def rank(probs: Tensor) -> list[tuple[list[float], list[int]]]:
    """Class probabilities (B, num_classes) -> per row (probabilities, indices), likeliest first."""
    values, indices = torch.topk(probs, probs.shape[-1], dim=-1)
    return list(zip(values.tolist(), indices.tolist()))


class ServedModel:
    """A run folder's model, its model.json, and what the endpoints ask of it."""

    def __init__(self, run_dir: str | Path, backend: str = "torch"):
        self.run_dir, self.backend = Path(run_dir), backend
        if backend == "torch":
            self.model, self.info = load(self.run_dir)
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.parameters = sum(p.numel() for p in self.model.parameters())
        elif backend == "onnxruntime":
            self.session, self.info, self.parameters = _onnx_model(self.run_dir)
            if self.info.get("task") == "text":
                self.model = OnnxLanguageModel(self.session, self.info["model"]["block_size"])
        else:
            raise NnlabError(f"--backend: unknown {backend!r}; choose from {', '.join(BACKENDS)}")
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

    @property
    def kind(self) -> str:
        return f"{self.info['model']['name']} ({self.task})"

    def card(self) -> dict:
        """The model card: what the model is, what it was trained on and with, and how well it did."""
        config = read_yaml(self.run_dir / CONFIG) if (self.run_dir / CONFIG).exists() else {}
        summary = read_json(self.run_dir / SUMMARY) if (self.run_dir / SUMMARY).exists() else {}
        metrics = {k: v for k, v in summary.items() if k.startswith(("test_", "val_"))}
        card = {"run": self.run_dir.name, "task": self.task, "architecture": self.info["model"],
                "parameters": self.parameters, "backend": self.backend,
                "saliency": self.is_classifier and self.backend == "torch",
                "attention": self.is_language_model and self.backend == "torch",
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

    def image(self, data: bytes | None = None, pixels=None, invert: bool | None = None) -> ModelInput:
        """A request's image (uploaded PNG/JPEG bytes, or JSON pixel rows) as the model's normalised
        input (1, C, H, W) and the conversion steps, exactly as `nnlab predict` converts a file."""
        if not self.is_classifier:
            raise BadRequest(f"this server holds a {self.kind} model; /v1/classify needs an image classifier")
        if data is None and not isinstance(pixels, list):  # never a str: the library reads a str as a path
            raise BadRequest("pixels: must be a list of rows of numbers 0-255")
        try:
            return image_to_input(data if data is not None else pixels, self.info, invert,
                                  name="file" if data is not None else "pixels", max_pixels=MAX_IMAGE_PIXELS)
        except NnlabError as e:
            raise BadRequest(str(e)) from None

    def probabilities(self, x: Tensor) -> Tensor:
        """Normalised inputs (B, C, H, W) -> class probabilities (B, num_classes)."""
        if self.backend == "onnxruntime":
            logits = torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])
            return torch.softmax(logits.float(), dim=-1)
        with torch.inference_mode():
            return torch.softmax(self.model(x).float(), dim=-1)

    def saliency(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(class probabilities (num_classes,), |d logit_c / d x| (H, W)) for one normalised input
        (1, C, H, W), c the top class, the largest over the channels."""
        if self.backend != "torch":
            raise BadRequest(f"saliency: needs gradients, which the {self.backend} backend does not give; "
                             "serve with --backend torch")
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x).float()
            top = int(logits.argmax(dim=-1))
            (grad,) = torch.autograd.grad(logits[0, top], x)
        return torch.softmax(logits.detach()[0], dim=-1), grad[0].abs().amax(dim=0)

    def ranked(self, x: Tensor) -> list[tuple[list[float], list[int]]]:
        """Normalised inputs (B, C, H, W) -> per row (probabilities, class indices), likeliest first:
        every class, so that any top_k is a slice, taken by the caller without another tensor op."""
        return rank(self.probabilities(x))

    def top_classes(self, ranking: tuple[list[float], list[int]], k: int) -> list[dict]:
        """The first k of a row of ranked(), named."""
        values, indices = ranking
        return [{"index": i, "name": self.classes[i], "probability": v} for v, i in zip(values[:k], indices[:k])]

    # ---- generation ------------------------------------------------------------------------------

    def token_stream(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                     seed: int, context_shift: int = 0) -> Iterator[str]:
        """The text each new token adds to `prompt`, token by token (nnlab.generate; KV-cached with
        the torch backend)."""
        if not self.is_language_model:
            raise BadRequest(f"this server holds a {self.kind} model; /v1/generate needs a language model")
        ids = self._encode(prompt, "prompt")
        block_size = self.model.cfg.block_size
        if context_shift and (self.backend != "torch" or context_shift >= block_size):
            raise BadRequest(f"context_shift: {context_shift} needs the torch backend and must be below the "
                             f"model's block_size {block_size}")
        tokens = generate_stream(self.model, torch.tensor([ids], dtype=torch.long), max_new_tokens,
                                 temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(seed),
                                 use_cache=self.backend == "torch", context_shift=context_shift)
        return self._texts(tokens)

    def _encode(self, text: str, field: str) -> list[int]:
        if not text:
            raise BadRequest(f"{field}: must not be empty")
        try:
            return self.tokenizer.encode(text)
        except NnlabError as e:
            raise BadRequest(f"{field}: {str(e).removeprefix('data: ')}") from None

    def last_token_attention(self, text: str) -> dict:
        """How the last token of `text` attends over its context: the last row of A = softmax(QK^T /
        sqrt(d_k)) of every layer and head, from the explicit attention path that `nnlab explain
        --method attention` reads (nnlab.analysis.explain.attention_maps). The context is the last
        block_size tokens of `text`, as generation sees it.

        Returns {"tokens": the context's tokens as text, "cropped": tokens left out before them,
        "layers", "heads", "per_head": [layer][head][key] weights, "mean_of_heads": [layer][key]};
        each layer's and head's weights sum to 1 over the context."""
        if not self.is_language_model:
            raise BadRequest(f"this server holds a {self.kind} model; /v1/attention needs a language model")
        if self.backend != "torch":
            raise BadRequest(f"attention: needs the PyTorch model's explicit attention path, which the "
                             f"{self.backend} backend does not have; serve with --backend torch")
        from nnlab.analysis.explain import attention_maps

        ids = self._encode(text, "text")
        context = ids[-self.model.cfg.block_size:]
        maps = attention_maps(self.model, torch.tensor([context], dtype=torch.long))  # each (1, H, T, T)
        last = torch.stack([A[0, :, -1, :] for A in maps])  # (layers, heads, T): the last query's row
        rounded = lambda t: [round(float(v), 6) for v in t]  # noqa: E731
        return {"tokens": [self.tokenizer.decode([i]) for i in context], "cropped": len(ids) - len(context),
                "layers": last.shape[0], "heads": last.shape[1],
                "per_head": [[rounded(head) for head in layer] for layer in last],
                "mean_of_heads": [rounded(layer) for layer in last.mean(dim=1)]}

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



def _onnx_model(run_dir: Path):
    """(an onnxruntime session of RUN_DIR/model.onnx, model.json, the parameter count) for a model
    exported by `nnlab export`; the run's weights file is not read."""
    from nnlab.export import session

    try:
        info = read_json(run_dir / MODEL_INFO)
    except NnlabError:
        raise NnlabError(f"{run_dir}: no readable {MODEL_INFO} (not a finished run folder?)") from None
    if info.get("task") not in ("image", "text"):
        raise NnlabError(f"--backend onnxruntime: serves image classifiers and language models; {run_dir} "
                         f"holds a {info.get('task')} model: serve it with --backend torch")
    path = run_dir / ONNX_MODEL
    if not path.is_file():
        raise NnlabError(f"{path}: missing; make it with `nnlab export {run_dir} --format onnx`")
    try:
        sess = session(path)
    except NnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error types for a damaged file
        raise NnlabError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
    return sess, info, _parameters(info)


def _parameters(info: dict) -> int:
    """The parameter count of model.json's architecture (built untrained: no weights are read)."""
    from nnlab.config import parse_model
    from nnlab.models import build_model

    return sum(p.numel() for p in build_model(parse_model(info["model"])).parameters())


class OnnxLanguageModel:
    """An exported language model as generate_stream calls it without a cache: idx (B, T), T at most
    cfg.block_size -> logits (B, T, vocab)."""

    def __init__(self, session, block_size: int):
        self.session, self.cfg = session, SimpleNamespace(block_size=block_size)

    def __call__(self, idx: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {"idx": idx.numpy()})[0])
