"""Loads and stores on byte arrays, for kernels: little-endian (virtio headers,
AF_PACKET ring headers, VMBus/NVSP/RNDIS fields, e1000 descriptors) and
big-endian (network byte order: IP and TCP headers).

np.int64 and not int(): numba types int(uint8) as uint64, and uint64 mixed with
the int64 offsets becomes float64. Callers check the bounds first.
"""
from __future__ import annotations

import numpy as np

from .kernel import helper


@helper
def le16(a, p):
    return np.int64(a[p]) | (np.int64(a[p + 1]) << 8)


@helper
def le32(a, p):
    return (np.int64(a[p]) | (np.int64(a[p + 1]) << 8) | (np.int64(a[p + 2]) << 16)
            | (np.int64(a[p + 3]) << 24))


@helper
def put_le32(a, p, v):
    a[p] = v & 0xFF
    a[p + 1] = (v >> 8) & 0xFF
    a[p + 2] = (v >> 16) & 0xFF
    a[p + 3] = (v >> 24) & 0xFF


@helper
def put_le(a, p, v, n):
    for k in range(n):
        a[p + k] = (v >> (8 * k)) & 0xFF


@helper
def be16(a, p):
    return (np.int64(a[p]) << 8) | np.int64(a[p + 1])


@helper
def put_be16(a, p, v):
    a[p] = (v >> 8) & 0xFF
    a[p + 1] = v & 0xFF
