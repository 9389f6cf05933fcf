"""Cloning packets into another batch (vswitch_vmq_sriov.md 1.6, checklist A.10).

A clone's data lives in host memory (safe); it keeps its source and the parsed
fields; it keeps destinations only when asked (a forwarder cloning for egress);
per-packet extension context never follows it (that lives with the batch being
processed, not in the packet).
"""
from __future__ import annotations


from .batch import (ALIGN, DROP, DST0, F_CLONE, F_SAFE, FLAGS, LEN, NDST, NFIELDS, OFF, ROW_PAD,
                    SAFE_LEN, copy_bytes)
from .kernel import kernel


@kernel
def clone_into(meta, data, out_meta, out_data, idx, keep_destinations):
    cap = out_meta.shape[1] - ROW_PAD
    maxd = min(meta.shape[0], out_meta.shape[0]) - DST0
    cursor = 0
    n = 0
    for j in range(idx.shape[0]):
        i = idx[j]
        ln = meta[LEN, i]
        off = meta[OFF, i]
        if n >= cap or cursor + ln > out_data.shape[0]:
            break
        copy_bytes(out_data, cursor, data, off, ln)
        for f in range(NFIELDS):
            out_meta[f, n] = meta[f, i]
        out_meta[OFF, n] = cursor
        out_meta[FLAGS, n] = meta[FLAGS, i] | F_CLONE | F_SAFE
        out_meta[DROP, n] = 0
        out_meta[SAFE_LEN, n] = ln
        if keep_destinations:
            c = min(meta[NDST, i], maxd)
            for k in range(c):
                out_meta[DST0 + k, n] = meta[DST0 + k, i]
            out_meta[NDST, n] = c
        else:
            out_meta[NDST, n] = 0
        cursor = (cursor + ln + ALIGN - 1) & ~(ALIGN - 1)
        n += 1
    return n, cursor
