"""Protocol structures, declared once: little-endian numpy dtypes with fixed offsets.

Every message of VMBus, NVSP and RNDIS is a ``layout(...)`` here or in the module
of its protocol: field name, numpy type and byte offset, and the total size, all
as the reference tables give them (vmbus_netvsp.md). ``layout`` refuses fields
that overlap or run past the size, so a transcription slip fails at import, and
the tests compare each one against the reference's table. Kernels read and write
the same fields through the offsets (``OFF``) exported with each dtype, so the
compiled code and the declarations cannot drift apart.
"""
from __future__ import annotations

import numpy as np

# Little-endian scalar types by their reference spelling.
U8, U16, U32, U64 = np.dtype("u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8")
I32 = np.dtype("<i4")


def array(base: np.dtype, n: int) -> np.dtype:
    return np.dtype((base, (n,)))


def layout(name: str, size: int, fields: list[tuple[str, np.dtype, int]]) -> np.dtype:
    """A packed little-endian structure of ``size`` bytes; ``fields`` are
    (name, dtype, offset). Overlaps and overruns are errors."""
    end = 0
    for fname, dt, off in sorted(fields, key=lambda f: f[2]):
        dt = np.dtype(dt)
        if off < end:
            raise ValueError(f"{name}.{fname} at {off} overlaps the field before it")
        end = off + dt.itemsize
        if end > size:
            raise ValueError(f"{name}.{fname} runs to {end}, past the size {size}")
    dt = np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                   "offsets": [f[2] for f in fields], "itemsize": size})
    return dt


def offsets(dt: np.dtype) -> dict[str, int]:
    """Field -> byte offset, for kernels that address fields directly."""
    return {n: dt.fields[n][1] for n in dt.names}


def encode(dt: np.dtype, **values) -> bytes:
    """The bytes of one structure with the given fields set (others zero)."""
    a = np.zeros(1, dtype=dt)
    for k, v in values.items():
        if k not in dt.names:
            raise KeyError(f"no field {k!r}; fields are {dt.names}")
        a[k] = v
    return a.tobytes()


def decode(dt: np.dtype, buf, offset: int = 0) -> np.void:
    """One structure read from ``buf`` at ``offset``; the length is checked."""
    if offset < 0 or offset + dt.itemsize > len(buf):
        raise ValueError(f"{dt.itemsize}-byte structure at {offset} runs past a "
                         f"{len(buf)}-byte buffer")
    return np.frombuffer(buf, dtype=dt, count=1, offset=offset)[0]
