"""pcap output for captures: one compiled loop serializes a batch, one write() per batch.

Classic libpcap format (magic 0xa1b2c3d4 written little-endian, version 2.4,
LINKTYPE_ETHERNET), microsecond timestamps. A tag the switch holds out of band
is put back into the frame, so the file shows what was on the wire.
"""
from __future__ import annotations

import struct

import numpy as np

from .batch import (copy_bytes, D_EXCLUDED, D_PORT_MASK, DROP, DST0, F_VLAN, FLAGS, LEN,
                    NDST, OFF, SRC_PORT, TCI)
from .kernel import kernel, helper

LINKTYPE_ETHERNET = 1
HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET)


@helper
def _le32(buf, p, v):
    buf[p] = v & 0xFF
    buf[p + 1] = (v >> 8) & 0xFF
    buf[p + 2] = (v >> 16) & 0xFF
    buf[p + 3] = (v >> 24) & 0xFF


@kernel
def pcap_records(meta, data, n, out, ts_ns, snaplen, live_only, port, egress):
    """Write pcap records for the batch into ``out``; returns (bytes used, records).

    ``port`` >= 0 keeps only that port's traffic: packets it sent in (ingress) or
    packets with a live destination on it (``egress``, after forwarding)."""
    pos = 0
    recs = 0
    sec = ts_ns // 1000000000
    usec = (ts_ns // 1000) % 1000000
    for i in range(n):
        if live_only and meta[DROP, i] != 0:
            continue
        if port >= 0:
            if egress:
                hit = False
                for k in range(meta[NDST, i]):
                    d = meta[DST0 + k, i]
                    if d & D_PORT_MASK == port and d & D_EXCLUDED == 0:
                        hit = True
                if not hit:
                    continue
            elif meta[SRC_PORT, i] != port:
                continue
        ln = meta[LEN, i]
        off = meta[OFF, i]
        tagged = (meta[FLAGS, i] & F_VLAN) != 0 and ln >= 12
        wire = ln + 4 if tagged else ln
        cap = min(wire, snaplen)
        if pos + 16 + cap > out.shape[0]:
            break
        _le32(out, pos, sec)
        _le32(out, pos + 4, usec)
        _le32(out, pos + 8, cap)
        _le32(out, pos + 12, wire)
        p = pos + 16
        if tagged:
            # MACs, then the tag held out of band, then the rest, clipped to the snap length
            for j in range(min(12, cap)):
                out[p + j] = data[off + j]
            tci = meta[TCI, i]
            if cap > 12:
                out[p + 12] = 0x81
            if cap > 13:
                out[p + 13] = 0x00
            if cap > 14:
                out[p + 14] = (tci >> 8) & 0xFF
            if cap > 15:
                out[p + 15] = tci & 0xFF
            rest = cap - 16
            if rest > 0:
                copy_bytes(out, p + 16, data, off + 12, rest)
        else:
            copy_bytes(out, p, data, off, cap)
        pos = p + cap
        recs += 1
    return pos, recs


class PcapWriter:
    """Append batches to a pcap file. Not thread-safe; one writer per file."""

    def __init__(self, path, snaplen: int = 262144, buffer_bytes: int = 4 << 20):
        self.path = str(path)
        self.snaplen = snaplen
        self._f = open(self.path, "wb")
        self._f.write(HEADER)
        self._buf = np.zeros(buffer_bytes, dtype=np.uint8)
        self.records = 0

    def write_batch(self, meta, data, n, ts_ns, live_only=True, port=-1, egress=False) -> int:
        used, recs = pcap_records(meta, data, n, self._buf, ts_ns, self.snaplen, live_only,
                                  port, egress)
        if used:
            self._f.write(memoryview(self._buf)[:used])
        self.records += recs
        return recs

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
