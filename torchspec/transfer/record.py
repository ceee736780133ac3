"""The byte layout of one stored hidden-state record, shared by the `local` and `mooncake` stores.

An 8-byte little-endian header length, a JSON header ``{name: [dtype, shape, offset, nbytes]}``, zero
padding up to the data start, then each tensor's raw bytes at a 64-byte-aligned offset from the data
start (so every tensor can be viewed in place with its own dtype). Raw bytes + a dtype name keep every
dtype bit-exact, bf16 included. The local store writes it as one file, the mooncake store as one object.
"""

from __future__ import annotations

import json

import torch

_ALIGN = 64
_LEN_BYTES = 8


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def layout(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[int], int]:
    """(prefix: header length + header + padding up to the data start; each tensor's byte offset in the
    record, in `tensors` order; the record's total bytes)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = [str(t.dtype), list(t.shape), offset, nbytes]
        offset = _aligned(offset + nbytes)
    head = json.dumps(header).encode()
    data_start = _aligned(_LEN_BYTES + len(head))
    prefix = len(head).to_bytes(_LEN_BYTES, "little") + head
    prefix += bytes(data_start - len(prefix))
    return prefix, [data_start + h[2] for h in header.values()], data_start + offset


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its own device (contiguous; no copy when it already is)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def decode(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensor views into `buf` (uint8 [record bytes])."""
    hlen = int.from_bytes(bytes(buf[:_LEN_BYTES].tolist()), "little")
    header = json.loads(bytes(buf[_LEN_BYTES:_LEN_BYTES + hlen].tolist()).decode())
    data_start = _aligned(_LEN_BYTES + hlen)
    return {name: buf[data_start + off:data_start + off + nbytes].view(_dtype(dtype)).reshape(shape)
            for name, (dtype, shape, off, nbytes) in header.items()}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))
