"""The IDX file format of MNIST and Fashion-MNIST, read strictly and written atomically.

Layout (big-endian): two zero bytes, a dtype code, the number of dimensions ``ndim``,
then ``ndim`` 4-byte sizes, then exactly ``prod(sizes)`` items. Files may be gzipped.
Anything that does not match this exactly is a DdpmkitError naming the file, because a
silently truncated dataset trains a worse model without anyone noticing.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ddpmkit.errors import DdpmkitError
from ddpmkit.fileio import atomic_write

# IDX dtype code -> big-endian numpy dtype, as in LeCun's description of the format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(source: str | os.PathLike | bytes, *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (raw or gzipped) from a path or bytes into a native-endian numpy array.

    ``ndim`` (optional) is the number of dimensions the caller expects: 1 for labels,
    3 for images. The result is a writable copy, safe to hand to ``torch.from_numpy``.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else _read_file(Path(source))
    if data[:2] == GZIP_MAGIC:
        data = _gunzip(data, name)
    dtype, shape = _parse_header(data, name)
    if ndim is not None and len(shape) != ndim:
        raise DdpmkitError(f"{name} has {len(shape)} dimensions where {ndim} were expected; is it the right IDX file?")
    header_size = 4 + 4 * len(shape)
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise DdpmkitError(
            f"{name} {problem}: its header {shape} promises {expected} bytes of data but it holds {actual}; "
            "delete it and download it again."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write ``array`` as an IDX file (gzipped when ``gzip``), atomically: all or nothing."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    code = next((code for code, dtype in IDX_DTYPES.items() if dtype.newbyteorder("=") == native), None)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use int8, uint8, int16, int32, float32 or float64")
    if not 1 <= array.ndim <= 255 or any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX needs 1 to 255 dimensions each below 2**32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(IDX_DTYPES[code]).tobytes()
    atomic_write(path, _gzip_compress(payload) if gzip else payload)


def _gzip_compress(data: bytes) -> bytes:
    """gzip with a fixed timestamp so the same array always gives the same bytes."""
    return gzip.compress(data, mtime=0)


def _read_file(path: Path) -> bytes:
    """The file's bytes, or a DdpmkitError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise DdpmkitError(f"Cannot read IDX file {path}: {error.strerror or error}.") from error


def _gunzip(data: bytes, name: str) -> bytes:
    """Decompress a gzip stream, turning every flavour of corruption into one clear error."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DdpmkitError(f"{name} is not a valid gzip file ({error}); delete it and download it again.") from error


def _parse_header(data: bytes, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Check the magic number and return the item dtype and the shape from the header."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DdpmkitError(f"{name} is not an IDX file (bad magic number {data[:4].hex() or 'empty'}).")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DdpmkitError(
            f"{name} has unknown IDX dtype code 0x{code:02x}; expected one of "
            f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}."
        )
    if ndim == 0:
        raise DdpmkitError(f"{name} declares 0 dimensions; an IDX file needs at least one.")
    if len(data) < 4 + 4 * ndim:
        raise DdpmkitError(f"{name} is truncated inside its header ({ndim} dimensions declared).")
    return IDX_DTYPES[code], struct.unpack_from(f">{ndim}I", data, 4)
