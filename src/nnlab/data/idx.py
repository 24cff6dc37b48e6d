"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
then one big-endian uint32 per dimension, then the values in C order, big-endian. The files are
often gzip-compressed; we detect that from the content (gzip's magic bytes 1f 8b), not from the
file name, because renamed or already-decompressed files are common.

Every problem with a file raises DataError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import gzip as _gzip
import os
import zlib

import numpy as np

from nnlab.errors import DataError

# IDX type code -> big-endian numpy dtype (the codes the format defines).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_KIND_NAMES = {1: "labels", 3: "images"}
GZIP_MAGIC = b"\x1f\x8b"


def _expected(type_code: int, ndim: int) -> str:
    kind = _KIND_NAMES.get(ndim, f"{ndim}-D arrays")
    return f"0x{(type_code << 8) | ndim:08x} for {_TYPE_NAMES[type_code]} {kind}"


def _read_bytes(path: str | os.PathLike) -> bytes:
    """The file's content, gunzipped if it starts with the gzip magic bytes."""
    if not os.path.exists(path):
        raise DataError(f"data: {path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"data: {path}: is a directory, expected an IDX file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data: {path}: cannot read: {e.strerror or e}") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return _gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        # BadGzipFile (an OSError), a cut-off stream (EOFError) or a bad deflate block (zlib.error).
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data: {path}: corrupt gzip data: {msg}") from None


def read_idx(path: str | os.PathLike, dtype: str | None = None, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-byte-order, writable numpy array.

    `dtype` (e.g. "uint8") and `ndim` optionally pin what the caller expects; a file of another
    kind is rejected as a wrong magic number, with the expected one in the message.
    Raises DataError for a missing file, a corrupt gzip stream, a wrong magic number, a cut-off
    header, or data shorter (or longer) than the header's dimensions say.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"data: {path}: truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    type_code, nd = data[2], data[3]
    want_type = next((c for c, n in _TYPE_NAMES.items() if n == dtype), None) if dtype else None
    if dtype is not None and want_type is None:
        raise ValueError(f"unsupported IDX dtype {dtype!r}")
    ok = data[0] == 0 and data[1] == 0 and type_code in IDX_TYPES and nd >= 1
    if ok and want_type is not None and type_code != want_type:
        ok = False
    if ok and ndim is not None and nd != ndim:
        ok = False
    if not ok:
        if want_type is not None or ndim is not None:
            exp_type = want_type if want_type is not None else (type_code if type_code in IDX_TYPES else 0x08)
            expected = _expected(exp_type, ndim if ndim is not None else max(nd, 1))
        else:
            expected = "0x0000TTNN: two zero bytes, a type code 08-0e, a dimension count"
        raise DataError(f"data: {path}: wrong IDX magic number 0x{magic:08x} (expected {expected})")

    header_len = 4 + 4 * nd
    if len(data) < header_len:
        raise DataError(f"data: {path}: truncated header: {nd} dimensions need {header_len} bytes, found {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    dt = IDX_TYPES[type_code]
    need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    found = len(data) - header_len
    if found < need:
        raise DataError(f"data: {path}: truncated: expected {need} bytes of data, found {found}")
    if found > need:
        # Extra bytes mean the header and the data disagree; trusting either could misalign every image.
        raise DataError(f"data: {path}: {found - need} bytes of trailing data after the {need} the header describes")
    arr = np.frombuffer(data, dtype=dt, count=need // dt.itemsize, offset=header_len)
    # astype copies: the result is writable (torch.from_numpy wants that) and in native byte order.
    return arr.astype(dt.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write `array` as an IDX file (gzip-compressed if `gzip`); the inverse of read_idx."""
    arr = np.asarray(array)
    code = next((c for c, dt in IDX_TYPES.items() if dt.newbyteorder("=") == arr.dtype.newbyteorder("=")), None)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {arr.dtype}")
    if arr.ndim < 1 or arr.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {arr.ndim}")
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=IDX_TYPES[code]).tobytes()
    with open(path, "wb") as f:
        f.write(_gzip.compress(payload) if gzip else payload)
