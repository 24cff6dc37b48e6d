"""Layers with two readable paths (the article's formula from nnlab.ops, and torch's functional
path) and, where nnlab.kernels has one that applies, a fast op."""

from nnlab.nn.layers import Conv2d, ConvPoolReLU, Dense, MaxPool2d, SelfAttention

__all__ = ["Conv2d", "ConvPoolReLU", "Dense", "MaxPool2d", "SelfAttention"]
