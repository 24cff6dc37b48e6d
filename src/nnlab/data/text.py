"""Character-level language-modelling data: tokenizers, the nanoGPT 90/10 split and random batches.

A tokenizer maps text to a list of integer ids and back, and serializes to a small JSON dict
so a saved model can be reloaded with exactly the vocabulary it was trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch

from nnlab.errors import DataError

TRAIN_FRACTION = 0.9  # nanoGPT's shakespeare_char split: first 90% train, last 10% validation


class CharTokenizer:
    """One id per distinct character of a corpus, ids in sorted character order."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise DataError("data: char tokenizer: the vocabulary lists a character twice")
        if not chars:
            raise DataError("data: char tokenizer: empty vocabulary")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of `text`: its sorted set of characters."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text`; a character outside the vocabulary raises DataError."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise DataError(f"data: character {c!r} (U+{ord(c):04X}) is not in the tokenizer's "
                            f"{self.vocab_size}-character vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; an id outside 0..vocab_size-1 raises DataError."""
        ids = [int(i) for i in ids]
        # Checked explicitly: a negative id would otherwise index from the end without complaint.
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise DataError(f"data: token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}")
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_json(cls, d: dict) -> "CharTokenizer":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise DataError("data: char tokenizer: 'chars' must be a string")
        return cls(chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256): needs no corpus and encodes any text."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; a model can emit byte sequences that are not UTF-8, hence "replace"."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < 256), None)
        if bad is not None:
            raise DataError(f"data: token id {bad} is outside the byte vocabulary 0..255")
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}

    @classmethod
    def from_json(cls, d: dict) -> "ByteTokenizer":
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


Tokenizer = Union[CharTokenizer, ByteTokenizer]
_KINDS = {"char": CharTokenizer, "byte": ByteTokenizer}


def tokenizer_from_json(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its to_json() dict, dispatching on d["kind"]."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in _KINDS:
        raise DataError(f"data: unknown tokenizer kind {kind!r} (expected one of {', '.join(_KINDS)})")
    return _KINDS[kind].from_json(d)


@dataclass
class TextData:
    """Token ids of the training and validation text (1-D int64) and the tokenizer that made them."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: Tokenizer


def load_text(path: str | os.PathLike, tokenizer: str = "char", limit_chars: int | None = None) -> TextData:
    """Read a UTF-8 text file and split it nanoGPT-style.

    The *text* is cut at int(0.9 * len(text)) characters: the first part is training data, the
    rest validation. A char tokenizer's vocabulary comes from the whole (possibly limited) text,
    so validation never holds an unknown character. `limit_chars` keeps only the first
    `limit_chars` characters (for quick runs). Raises DataError for a missing file, invalid
    UTF-8 (naming the byte offset), empty text, or text too short to give both splits.
    """
    if tokenizer not in _KINDS:
        raise DataError(f"data: unknown tokenizer {tokenizer!r} (expected one of {', '.join(_KINDS)})")
    if limit_chars is not None and limit_chars < 1:
        raise DataError(f"data: limit_chars must be positive, got {limit_chars}")
    if not os.path.isfile(path):
        raise DataError(f"data: {path}: no such file" if not os.path.exists(path) else f"data: {path}: not a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data: {path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data: {path}: not valid UTF-8 at byte offset {e.start} "
                        f"(byte 0x{raw[e.start]:02x})") from None
    if limit_chars is not None:
        text = text[:limit_chars]
    if not text.strip():
        raise DataError(f"data: {path}: empty text")
    tok: Tokenizer = CharTokenizer.from_text(text) if tokenizer == "char" else ByteTokenizer()
    cut = int(TRAIN_FRACTION * len(text))
    train = torch.tensor(tok.encode(text[:cut]), dtype=torch.int64)
    val = torch.tensor(tok.encode(text[cut:]), dtype=torch.int64)
    # A batch needs block_size + 1 tokens, so each split needs at least 2.
    if len(train) < 2 or len(val) < 2:
        raise DataError(f"data: {path}: text too short to split: {len(text)} characters give {len(train)} "
                        f"training and {len(val)} validation tokens (need at least 2 each)")
    return TextData(train, val, tok)


def get_lm_batch(data: torch.Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of next-token examples: x (B, T) and y = x shifted left by one, both int64.

    Offsets are torch.randint(len(data) - block_size, (batch_size,), generator=generator), so
    the same generator state gives the same batch (nanoGPT's sampling, made reproducible).
    """
    if batch_size < 1 or block_size < 1:
        raise DataError(f"data: batch_size and block_size must be positive, got {batch_size} and {block_size}")
    if len(data) <= block_size:
        raise DataError(f"data: {len(data)} tokens are too few for block_size {block_size} "
                        f"(need at least {block_size + 1}); use a smaller block_size or more text")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    # One gather instead of a Python loop of slices: idx[b, t] = ix[b] + t.
    idx = ix[:, None] + torch.arange(block_size)
    return data[idx].to(torch.int64), data[idx + 1].to(torch.int64)
