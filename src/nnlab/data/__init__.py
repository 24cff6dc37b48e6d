"""Data loading for nnlab: IDX files, image, text and tabular data sets.

Every user-facing problem (missing or corrupt file, bad value) raises nnlab.errors.DataError
with a one-line message naming the file and the problem. Nothing here touches the network.
"""

from nnlab.data.idx import read_idx, write_idx
from nnlab.data.images import DEFAULT_FASHION_DIR, FASHION_CLASSES, ImageData, load_images
from nnlab.data.tabular import TabularData, load_tabular
from nnlab.data.text import (
    ByteTokenizer,
    CharTokenizer,
    TextData,
    get_lm_batch,
    load_text,
    tokenizer_from_json,
)

__all__ = [
    "DEFAULT_FASHION_DIR",
    "FASHION_CLASSES",
    "ByteTokenizer",
    "CharTokenizer",
    "ImageData",
    "TabularData",
    "TextData",
    "get_lm_batch",
    "load_images",
    "load_tabular",
    "load_text",
    "read_idx",
    "tokenizer_from_json",
    "write_idx",
]
