"""Image classification data sets: Fashion-MNIST, MNIST (IDX files) and scikit-learn's digits.

Everything is returned as uint8 tensors (N, 1, H, W) plus int64 labels; the model sees
`ImageData.normalize(x)`, i.e. (x/255 - mean)/std with mean and std of the training pixels.
Keeping uint8 until the last moment costs a quarter of the memory of float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nnlab.data.idx import read_idx
from nnlab.data.poison import check_poison, poison
from nnlab.data.sampling import check_fractions, flip_labels, train_subset
from nnlab.errors import DataError

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_DATASETS = ("fashion-mnist", "mnist", "digits")
_FASHION_HINT = "install it with `apt-get install dataset-fashion-mnist` or set data.dir"
_MNIST_HINT = "set data.dir to a folder with the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...)"


@dataclass
class ImageData:
    """A train/test split of 10-class images: x uint8 (N, 1, H, W), y int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: float  # of training pixels scaled to [0, 1]
    std: float
    poisoned: torch.Tensor | None = None  # indices of the backdoored training images (nnlab.data.poison)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 model input (x/255 - mean)/std, on x's device."""
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std


def _find(dir: str, stem: str, hint: str) -> str:
    """The path of `stem` or `stem.gz` in dir (uncompressed first: it is faster to read)."""
    for cand in (os.path.join(dir, stem), os.path.join(dir, stem + ".gz")):
        if os.path.isfile(cand):
            return cand
    raise DataError(f"data: {os.path.join(dir, stem)}[.gz]: no such file; {hint}")


def _load_idx_split(dir: str, hint: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_path = _find(dir, IDX_FILES[f"{split}_images"], hint)
    lbl_path = _find(dir, IDX_FILES[f"{split}_labels"], hint)
    x = read_idx(img_path, dtype="uint8", ndim=3)
    y = read_idx(lbl_path, dtype="uint8", ndim=1)
    if len(x) != len(y):
        raise DataError(f"data: {img_path} has {len(x)} images but {lbl_path} has {len(y)} labels")
    if len(y) and int(y.max()) > 9:
        bad = int(np.argmax(y > 9))
        raise DataError(f"data: {lbl_path}: label {int(y[bad])} at index {bad} is outside 0..9")
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).to(torch.int64)


def _load_idx_dataset(name: str, dir: str | None) -> tuple:
    if name == "fashion-mnist":
        dir, hint, classes = dir or DEFAULT_FASHION_DIR, _FASHION_HINT, FASHION_CLASSES
    else:
        hint, classes = _MNIST_HINT, DIGIT_CLASSES
        if not dir:
            raise DataError(f"data: {name} has no default location; {hint}")
    if not os.path.isdir(dir):
        raise DataError(f"data: {dir}: no such directory; {hint}")
    x_train, y_train = _load_idx_split(dir, hint, "train")
    x_test, y_test = _load_idx_split(dir, hint, "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"data: {dir}: training images are {tuple(x_train.shape[2:])} "
                        f"but test images are {tuple(x_test.shape[2:])}")
    return x_train, y_train, x_test, y_test, classes


def _load_digits(seed: int) -> tuple:
    """scikit-learn's 1797 8x8 digits (bundled, no download), split 80/20 stratified by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # Values are 0..16; stretch to the 0..255 range the IDX data sets use so one normalize fits all.
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr),
            torch.from_numpy(x_te), torch.from_numpy(y_te), DIGIT_CLASSES)


def resize_images(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size) bilinearly; the result is uint8 again."""
    if tuple(x.shape[2:]) == (size, size):
        return x
    shrinking = size < min(x.shape[2:])
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    # Chunks keep the float32 intermediate small for 60,000-image sets.
    for i in range(0, x.shape[0], chunk):
        r = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=shrinking)
        out[i:i + chunk] = r.round().clamp(0, 255).to(torch.uint8)
    return out


def pixel_stats(x: torch.Tensor) -> tuple[float, float]:
    """Exact mean and (population) std of uint8 pixels scaled to [0, 1].

    A 256-bin histogram avoids a float64 copy of all the pixels (376 MB for Fashion-MNIST).
    """
    counts = np.bincount(x.numpy().ravel(), minlength=256).astype(np.float64)
    n = counts.sum()
    if n == 0:
        raise DataError("data: no training images to compute normalization statistics from")
    v = np.arange(256, dtype=np.float64) / 255.0
    mean = float((counts * v).sum() / n)
    std = float(np.sqrt((counts * (v - mean) ** 2).sum() / n))
    return mean, (std if std > 0 else 1.0)  # a constant image set would otherwise divide by zero


def load_images(name: str, dir: str | None = None, image_size: int | None = None,
                limit: int | None = None, seed: int = 0, train_fraction: float = 1.0,
                label_noise: float = 0.0, poison_rate: float = 0.0, poison_target: int | None = None,
                poison_trigger: str = "patch") -> ImageData:
    """Load an image data set by name: "fashion-mnist", "mnist" or "digits".

    fashion-mnist/mnist read the four standard IDX files (each raw or .gz) from `dir`
    (fashion-mnist defaults to DEFAULT_FASHION_DIR; mnist needs `dir`). digits is bundled with
    scikit-learn and split 80/20 deterministically with `seed` (the IDX sets have a fixed split).
    `image_size` resizes to image_size x image_size (bilinear); `limit` keeps the first `limit`
    training and the first `limit` test images. Then `train_fraction` keeps a stratified subset of
    the training images and `label_noise` flips that fraction of their labels (nnlab.data.sampling;
    both drawn from `seed`). Then `poison_rate` plants a BadNets backdoor for class `poison_target`
    (nnlab.data.poison, drawn from `seed`). mean/std describe the returned training pixels.
    """
    if name not in IMAGE_DATASETS:
        raise DataError(f"data: unknown image data set {name!r} (choose from {', '.join(IMAGE_DATASETS)})")
    if limit is not None and limit < 1:
        raise DataError(f"data: limit must be a positive number of images, got {limit}")
    if image_size is not None and image_size < 1:
        raise DataError(f"data: image_size must be positive, got {image_size}")
    check_fractions(train_fraction, label_noise)
    if name == "digits":
        x_tr, y_tr, x_te, y_te, classes = _load_digits(seed)
    else:
        x_tr, y_tr, x_te, y_te, classes = _load_idx_dataset(name, dir)
    if limit is not None:
        # clone(): a slice would keep the full 60,000-image arrays alive.
        x_tr, y_tr, x_te, y_te = (t[:limit].clone() for t in (x_tr, y_tr, x_te, y_te))
    if train_fraction < 1:
        keep = torch.from_numpy(train_subset(len(y_tr), train_fraction, seed, y=y_tr.numpy()))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if label_noise:
        y_tr = torch.from_numpy(flip_labels(y_tr.numpy(), label_noise, len(classes), seed))
    if image_size is not None:
        x_tr, x_te = resize_images(x_tr, image_size), resize_images(x_te, image_size)
    check_poison(poison_rate, poison_target, len(classes))
    poisoned = None
    if poison_rate > 0:  # after resizing: the trigger keeps its size in the images the model sees
        x_tr, y_tr, poisoned = poison(x_tr, y_tr, poison_rate, poison_target, poison_trigger, seed)
    mean, std = pixel_stats(x_tr)
    return ImageData(name, x_tr, y_tr, x_te, y_te, list(classes), mean, std, poisoned)
