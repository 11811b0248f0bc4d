"""IDX reader and writer: exact round trips, and every malformed file is a DdpmkitError."""

import contextlib
import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ddpmkit.data.idx import IDX_DTYPES, read_idx, write_idx
from ddpmkit.errors import DdpmkitError

IMAGES = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


GOOD = idx_bytes(0x08, IMAGES.shape, IMAGES.tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_reads_raw_and_gzipped_files(tmp_path, compress):
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(GOOD) if compress else GOOD)
    out = read_idx(path, ndim=3)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, IMAGES)


def test_reads_bytes_and_big_endian_types():
    values = np.array([[-2, 70000], [3, -1]], dtype=">i4")
    out = read_idx(idx_bytes(0x0C, (2, 2), values.tobytes()))
    assert out.dtype == np.dtype("int32")
    np.testing.assert_array_equal(out, [[-2, 70000], [3, -1]])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"x", "magic"),
        (b"", "magic"),
        (idx_bytes(0x0A, (1,), b"x"), "dtype code 0x0a"),
        (GOOD[:-1], "truncated"),
        (GOOD + b"\x00", "trailing bytes"),
        (GOOD[:10], "truncated inside its header"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
        (b"\x1f\x8b" + b"not really gzip", "gzip"),
        (gzip.compress(GOOD)[:-8], "gzip"),
    ],
)
def test_malformed_files_are_refused(tmp_path, data, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(DdpmkitError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_wrong_number_of_dimensions_is_refused():
    with pytest.raises(DdpmkitError, match="3 dimensions where 1 were expected"):
        read_idx(GOOD, ndim=1)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DdpmkitError, match="Cannot read IDX file"):
        read_idx(tmp_path / "nope")


def test_write_is_atomic_and_deterministic(tmp_path):
    path = tmp_path / "a.gz"
    write_idx(path, IMAGES, gzip=True)
    first = path.read_bytes()
    write_idx(path, IMAGES, gzip=True)
    assert path.read_bytes() == first and gzip.decompress(first) == GOOD
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]  # no temp file left behind


def test_write_refuses_types_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.zeros((), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


idx_arrays = st.sampled_from(sorted(IDX_DTYPES)).flatmap(
    lambda code: hnp.arrays(IDX_DTYPES[code], hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
)


@settings(max_examples=60, deadline=None)
@given(array=idx_arrays, compress=st.booleans())
def test_write_then_read_is_identity(tmp_path_factory, array, compress):
    path = tmp_path_factory.mktemp("idx") / "a"
    write_idx(path, array, gzip=compress)
    out = read_idx(path)
    assert out.shape == array.shape and out.dtype == array.dtype.newbyteorder("=")
    assert out.tobytes() == array.astype(out.dtype).tobytes()  # bit-identical, NaNs included


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_raise_only_ddpmkit_errors(data):
    with contextlib.suppress(DdpmkitError):
        read_idx(data)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(GOOD) - 1), compress=st.booleans())
def test_every_truncation_is_refused(cut, compress):
    data = gzip.compress(GOOD, mtime=0) if compress else GOOD
    with pytest.raises(DdpmkitError):
        read_idx(data[: cut * len(data) // len(GOOD)])


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(GOOD) - 1), value=st.integers(0, 255))
def test_corrupted_bytes_raise_only_ddpmkit_errors(position, value):
    data = bytearray(GOOD)
    data[position] = value
    try:
        out = read_idx(bytes(data))
    except DdpmkitError:
        return
    assert out.size * out.itemsize + 4 + 4 * out.ndim == len(data)
