"""What differs between image classification, language modelling and tables, in one place.

A task turns the data config into in-memory tensors and answers the loop's questions: which
data-derived fields the model needs (classes, vocabulary, input size), which examples make up the
batch at a given step, how many items (samples or tokens) a step trains on, what the loss is, and
how to evaluate. The batch at step s is a pure function of (seed, s), so resuming at step s
replays nothing and skips nothing, and every rank of a distributed run can compute its own shard
of the same global batch without talking to the others.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nnlab import ops
from nnlab.config import Config
from nnlab.errors import ConfigError, DataError
from nnlab.recipes import data_root


class Task:
    kind: str  # image | text | tabular
    unit = "samples"  # what items_per_step() counts, as in the logged samples_per_s
    classification = True  # labels are class indices (else regression targets)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        loss = t.loss if t.loss != "auto" else ("cross_entropy" if self.classification else "mse")
        if (loss == "mse") == self.classification:
            what = f" {'classification' if self.classification else 'regression'}" if self.kind == "tabular" else ""
            raise ConfigError(f"train.loss: {loss} does not fit a {self.kind}{what} task")
        self.loss_name = loss

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "mse":
            return ops.article_mse(out.squeeze(-1).float(), y)  # L = 1/(2N) sum (y - y*)^2
        return F.cross_entropy(out.flatten(0, -2).float(), y.flatten(), label_smoothing=self.cfg.train.label_smoothing)

    def steps_per_epoch(self) -> int:
        return max(1, self.num_train() // self.cfg.train.batch_size)

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps if t.max_steps else t.epochs * self.steps_per_epoch()

    def items_per_step(self) -> int:
        """The `unit`s one optimizer step trains on (the global batch's samples)."""
        return self.cfg.train.batch_size

    def train_on(self, x: Tensor, y: Tensor) -> None:
        """Train on the examples (x, y) in place of the training split: x in the model's input form
        (normalised), y as the loss takes it. Only classifiers of images and tables have examples
        that stand alone."""
        if self.kind == "text" or not self.classification:
            raise ConfigError(f"train: a {self.kind} task cannot train on chosen examples")
        self.x_train = x
        if self.kind == "image":
            self.data = dataclasses.replace(self.data, y_train=y)
        else:
            self.y_train = y

    def _rows(self, step: int, lo: int, hi: int) -> Tensor:
        """Indices of rows lo:hi of the global batch at `step`: a fresh permutation each epoch
        (drawn once per epoch from (seed, epoch)), cut into batches, the last partial one dropped."""
        batch_size = self.cfg.train.batch_size
        epoch, i = divmod(step, self.steps_per_epoch())
        if epoch != getattr(self, "_perm_epoch", None):
            self._perm_epoch, self._perm = epoch, torch.randperm(self.num_train(), generator=self._gen(epoch))
        return self._perm[i * batch_size + lo : i * batch_size + hi]

    def _gen(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.train.seed, *salt)) & 0x7FFF_FFFF_FFFF_FFFF)


class ImageTask(Task):
    kind = "image"

    def __init__(self, cfg: Config):
        from nnlab.data import load_images

        super().__init__(cfg)
        d = cfg.data
        self.data = load_images(d.name, d.dir, image_size=d.image_size, limit=d.limit, seed=d.split_seed,
                                train_fraction=d.train_fraction, label_noise=d.label_noise,
                                poison_rate=d.poison.rate, poison_target=d.poison.target,
                                poison_trigger=d.poison.trigger)
        # Normalise once, up front: batches are then just index gathers from memory.
        self.x_train = self.data.normalize(self.data.x_train)
        self.x_test = self.data.normalize(self.data.x_test)

    def num_train(self) -> int:
        return len(self.x_train)

    def model_fields(self) -> dict:
        _, c, h, _ = self.x_train.shape
        return {"in_channels": c, "image_size": h, "num_classes": len(self.data.classes)}

    def batch(self, step: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Rows lo:hi of the global batch at `step`."""
        idx = self._rows(step, lo, hi)
        # index_select, not x[idx]: the same rows, gathered by a plain row copy instead of the general
        # advanced-indexing kernel, several times faster for a batch of small images.
        return self.x_train.index_select(0, idx), self.data.y_train.index_select(0, idx)

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        """Test accuracy and loss, streamed in batches: never holds all logits at once."""
        correct, loss_sum, n = 0, 0.0, len(self.x_test)
        batch_size = self.cfg.train.eval_batch_size
        for i in range(0, n, batch_size):
            x = self.x_test[i : i + batch_size].to(device)
            y = self.data.y_test[i : i + batch_size].to(device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        metrics = {"test_accuracy": correct / n, "test_loss": loss_sum / n}
        if self.cfg.data.poison.target is not None:
            metrics["attack_success_rate"] = self.attack_success_rate(model, device)
        return metrics

    @torch.no_grad()
    def attack_success_rate(self, model, device) -> float:
        """The backdoor's success: the fraction of test images of other classes than data.poison.target
        that the model calls data.poison.target once the trigger is stamped on them (nnlab.data.poison)."""
        from nnlab.data.poison import triggered

        target = self.cfg.data.poison.target
        others = self.data.y_test != target
        x = self.data.normalize(triggered(self.data.x_test[others], self.cfg.data.poison.trigger))
        hits, batch_size = 0, self.cfg.train.eval_batch_size
        for i in range(0, len(x), batch_size):
            hits += (model(x[i : i + batch_size].to(device)).argmax(1) == target).sum().item()
        return hits / max(len(x), 1)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_test, y_test) for models outside torch (scikit-learn's baselines): the
        model's normalised inputs, one flattened row per image, and class indices."""
        return (self.x_train.flatten(1).numpy(), self.data.y_train.numpy(),
                self.x_test.flatten(1).numpy(), self.data.y_test.numpy())

    def meta(self) -> dict:
        return {"normalize": {"mean": self.data.mean, "std": self.data.std}, "classes": self.data.classes,
                "input_shape": list(self.x_train.shape[1:])}


class TextTask(Task):
    kind = "text"
    unit = "tokens"

    def __init__(self, cfg: Config):
        from nnlab.data import load_text

        super().__init__(cfg)
        path = Path(cfg.data.path)
        if not path.exists() and path.is_relative_to(data_root()):
            raise DataError(f"data: {cfg.data.path}: no such file; shipped recipes read their data from the "
                            f"data root, $NNLAB_DATA_ROOT (default ../shared/data beside the clone)")
        self.data = load_text(cfg.data.path, tokenizer=cfg.data.tokenizer)
        self.block_size = cfg.model.block_size
        for split, ids in (("train", self.data.train), ("validation", self.data.val)):
            if len(ids) <= self.block_size + 1:
                raise ConfigError(f"model.block_size: {self.block_size} is longer than the {split} split "
                                  f"({len(ids)} tokens) of {cfg.data.path}")

    def num_train(self) -> int:
        # An "epoch" of a language model: as many blocks as the training split holds.
        return len(self.data.train) // self.block_size

    def items_per_step(self) -> int:
        return self.cfg.train.batch_size * self.block_size  # every position of every block is a prediction

    def model_fields(self) -> dict:
        return {"vocab_size": self.data.tokenizer.vocab_size}

    def _blocks(self, ids: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        ar = torch.arange(self.block_size)
        x = ids[offsets[:, None] + ar]  # (B, T)
        return x, ids[offsets[:, None] + ar + 1]  # targets: the same block shifted by one

    def batch(self, step: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Rows lo:hi of the global batch at `step`: random blocks, as nanoGPT samples them."""
        ids = self.data.train
        offsets = torch.randint(len(ids) - self.block_size, (self.cfg.train.batch_size,), generator=self._gen(step))
        return self._blocks(ids, offsets[lo:hi])

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        """Mean validation loss (nats per token) over eval_iters fixed random batches."""
        ids, t = self.data.val, self.cfg.train
        g = torch.Generator().manual_seed(0)  # the same batches at every evaluation
        losses = []
        for _ in range(t.eval_iters):
            offsets = torch.randint(len(ids) - self.block_size, (t.batch_size,), generator=g)
            x, y = self._blocks(ids, offsets)
            logits = model(x.to(device)).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()).item())
        return {"val_loss": sum(losses) / len(losses)}

    def meta(self) -> dict:
        return {"tokenizer": self.data.tokenizer.to_json()}


class TabularTask(Task):
    """Regression (the article's MSE on a standardised target) or classification (cross-entropy
    over the classes), as the table's target says (TabularData.classification)."""

    kind = "tabular"

    def __init__(self, cfg: Config):
        from nnlab.data import load_tabular

        d = cfg.data
        self.data = table = load_tabular(d.name, path=d.path, target=d.target, test_frac=d.test_frac,
                                         seed=d.split_seed, task=d.task, train_fraction=d.train_fraction,
                                         label_noise=d.label_noise)
        self.classification = table.classification  # known once the target is read: decides the loss
        super().__init__(cfg)
        # Train on standardised features (and target): plain gradient descent needs well-scaled inputs.
        self.x_train = (table.x_train - table.x_mean) / table.x_std
        self.x_test = (table.x_test - table.x_mean) / table.x_std
        self.y_train = table.y_train if self.classification else (table.y_train - table.y_mean) / table.y_std

    def num_train(self) -> int:
        return len(self.x_train)

    def model_fields(self) -> dict:
        return {"in_features": self.x_train.shape[1],
                "out_features": len(self.data.classes) if self.classification else 1}

    def batch(self, step: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        idx = self._rows(step, lo, hi)
        return self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        """Classes: test accuracy and mean cross-entropy. Regression: test mean squared error in the
        target's own units (comparable with scikit-learn's)."""
        table = self.data
        out = model(self.x_test.to(device)).float().cpu()
        if self.classification:
            return {"test_accuracy": (out.argmax(1) == table.y_test).sum().item() / len(table.y_test),
                    "test_loss": F.cross_entropy(out, table.y_test).item()}
        pred = out.squeeze(-1) * table.y_std + table.y_mean
        return {"test_mse": torch.mean((pred - table.y_test) ** 2).item()}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_test, y_test) for models outside torch (scikit-learn's baselines): the
        model's standardised features, and class indices or targets in their own units."""
        table = self.data
        return self.x_train.numpy(), table.y_train.numpy(), self.x_test.numpy(), table.y_test.numpy()

    def meta(self) -> dict:
        table = self.data
        meta = {"features": table.feature_names, "target": table.target, "x_mean": table.x_mean.tolist(),
                "x_std": table.x_std.tolist()}
        if self.classification:
            return {**meta, "classes": table.classes}
        return {**meta, "y_mean": float(table.y_mean), "y_std": float(table.y_std)}


def make_task(cfg: Config) -> Task:
    from nnlab.data.tabular import TABULAR_DATASETS
    from nnlab.models import get_spec

    name = cfg.data.name
    kind = "text" if name == "text" else "tabular" if name in TABULAR_DATASETS else "image"

    spec = get_spec(cfg.model.name)
    if spec.task != kind and not (spec.name == "mlp" and kind == "image"):
        raise ConfigError(f"data.name: model {spec.name!r} takes {spec.task} data, not {name!r}")
    return {"image": ImageTask, "text": TextTask, "tabular": TabularTask}[kind](cfg)


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate at `step`: linear warmup, then constant, cosine or linear decay to min_lr."""
    warmup = cfg.warmup_steps or int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
    return cfg.lr + frac * (cfg.min_lr - cfg.lr)  # linear
