"""Layers with two paths: the article's explicit formula (from nnlab.ops) and PyTorch's fast kernel."""

from nnlab.nn import kernels
from nnlab.nn.layers import Conv2d, Dense, MaxPool2d, SelfAttention

__all__ = ["Conv2d", "Dense", "MaxPool2d", "SelfAttention", "kernels"]
