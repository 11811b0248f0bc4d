"""A weights file (safetensors) read as untrusted input: its header checked against the network
before any tensor is read, then its tensors read into the network without a second copy.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensors'
bytes, which the offsets must cover exactly, in order and without gaps. `read_header` checks all of
that against the file's size reading the header alone; `check_fits` compares it with a network
(one built on the meta device costs no memory); `load` then reads the tensors and assigns them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddpmkit.errors import DdpmkitError

MAX_HEADER_BYTES = 16 << 20  # ~150 bytes a tensor: a 100,000-tensor network fits 16 times over
# the dtypes safetensors writes: name -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {dtype: name for name, (dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: its dtype's name, its shape, and where its bytes lie after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """What a safetensors file declares: its tensors, and where their bytes begin in the file."""

    tensors: dict[str, TensorInfo]
    data_start: int


def read_header(path: Path) -> Header:
    """The tensors a safetensors file declares, checked against the file's size; no tensor data is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _unreadable(path, f"it holds {size} bytes, fewer than the 8 of the header length")
            length = int.from_bytes(f.read(8), "little")
            if length > MAX_HEADER_BYTES:
                raise _unreadable(path, f"its header claims {length:,} bytes, over the {MAX_HEADER_BYTES:,} allowed")
            if length > size - 8:
                raise _unreadable(path, f"it is truncated: its header claims {length:,} bytes, {size - 8:,} follow")
            raw = f.read(length)
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from e
    header = _parse(raw, path)
    tensors = {name: _entry(name, value, path) for name, value in header.items() if name != "__metadata__"}
    _check_layout(tensors, size - 8 - length, path)
    return Header(tensors, 8 + length)


def _parse(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise _unreadable(path, "its header is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise _unreadable(path, f"its header is not JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _unreadable(path, "its __metadata__ is not an object of strings")
    return header


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _entry(name: str, value, path: Path) -> TensorInfo:
    """One header entry, its types and its byte count checked."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _unreadable(path, f"tensor {name[:80]} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _unreadable(path, f"tensor {name[:80]} has an unknown dtype {str(dtype)[:20]!r}")
    if not _ints(shape) or len(shape) > 8:
        raise _unreadable(path, f"tensor {name[:80]} has a shape that is not up to 8 sizes >= 0")
    if not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _unreadable(path, f"tensor {name[:80]} has data_offsets that are not [begin, end]")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.numel * DTYPES[dtype][1] != info.end - info.begin:
        raise _unreadable(
            path,
            f"tensor {name[:80]} claims shape {info.shape} of {dtype}, which its {info.end - info.begin:,} "
            "bytes do not hold",
        )
    return info


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_layout(tensors: dict[str, TensorInfo], data_bytes: int, path: Path) -> None:
    """The tensors' bytes must tile the data after the header exactly: in order, no gap, no overlap."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            raise _unreadable(path, f"tensor {name[:80]} starts at byte {info.begin:,}, expected {position:,}")
        position = info.end
    if position != data_bytes:
        raise _unreadable(path, f"its tensors span {position:,} bytes, but {data_bytes:,} follow the header")


def _unreadable(path: Path, why: str) -> DdpmkitError:
    return DdpmkitError(f"cannot read weights {path}: {why}")


# ---- a network and its weights ------------------------------------------------------------------


def check_fits(module: nn.Module, tensors: dict[str, TensorInfo], path: Path) -> None:
    """Refuse weights that are not exactly the module's state: the first difference in one sentence.

    The module may live on the meta device (shapes without memory), so this runs before anything
    the config sizes is allocated. When the config describes more numbers than the file holds, the
    message says so too.
    """
    expected = module.state_dict()
    difference = _first_difference(expected, tensors)
    if difference is None:
        return
    wanted, held = sum(t.numel() for t in expected.values()), sum(t.numel for t in tensors.values())
    sizes = f" (the config describes {wanted:,} numbers, the file holds {held:,})" if wanted > held else ""
    raise DdpmkitError(f"weights {path} do not fit this architecture: {difference}{sizes}")


def _first_difference(expected: dict[str, torch.Tensor], tensors: dict[str, TensorInfo]) -> str | None:
    for name, tensor in expected.items():
        info = tensors.get(name)
        if info is None:
            return f"missing {name}"
        if info.shape != tuple(tensor.shape):
            return f"shape of {name} is {info.shape}, model wants {tuple(tensor.shape)}"
        if info.dtype != DTYPE_NAMES.get(tensor.dtype):
            return f"dtype of {name} is {info.dtype}, model wants {DTYPE_NAMES.get(tensor.dtype)}"
    extra = sorted(set(tensors) - set(expected))
    return f"unexpected {extra[0][:80]}" if extra else None


def load(module: nn.Module, path: Path) -> nn.Module:
    """Load a weights file into `module` after checking it fits; returns the module.

    A module built on the meta device takes the tensors read from the file (no second copy), then
    recomputes its non-persistent buffers (which no weights file holds) through `reset_buffers()`.
    """
    header = read_header(path)
    check_fits(module, header.tensors, path)
    tensors = read_tensors(path, header)
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    module.load_state_dict(tensors, assign=on_meta)
    if on_meta:
        materialise_buffers(module)
    return module


def read_tensors(path: Path, header: Header) -> dict[str, torch.Tensor]:
    """The tensors of a checked header, each read straight from the file into its own new tensor.

    Not safetensors' load_file: its tensors can start at any byte, and some CPU kernels round
    differently on memory that is not aligned, so a network holding them would not reproduce the
    outputs of the one that was saved. Bytes are little-endian, as on every host torch runs on.
    """
    tensors = {}
    try:
        with open(path, "rb") as f:
            for name, info in header.tensors.items():
                tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype][0])
                f.seek(header.data_start + info.begin)
                if info.numel and f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != info.end - info.begin:
                    raise _unreadable(path, f"it ends inside tensor {name[:80]} (the file changed while read)")
                tensors[name] = tensor
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from e
    return tensors


def materialise_buffers(module: nn.Module) -> None:
    """Recompute the non-persistent buffers left on the meta device, through each owner's
    `reset_buffers()`; afterwards nothing of the module may remain on the meta device."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)) and hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise DdpmkitError(f"{left[0]} is in no weights file and cannot be recomputed")
