"""Where packets enter and leave the switch: the protocol edge on both sides.

``edge_ingress`` runs as a batch enters: parse (which moves a leading 802.1Q tag
out of band), count what each source port sent, drop runts. ``finalize`` runs
as it leaves: count every drop on its source port and every exclusion on its
destination port (reasons included), drop packets left with no live
destination, and lay out the delivery plan: (packet, destination word) pairs
grouped by destination port, in arrival order, for the port kinds to transmit.
vswitch_vmq_sriov.md 1.4 (protocol edge), 1.5 (ReportFilteredNetBufferLists),
2.7 (counters).
"""
from __future__ import annotations

import numpy as np

from . import counters as R
from .batch import (copy_bytes, D_EXCLUDED, D_PORT_MASK, D_REASON_SHIFT, D_TAGGED, DROP, DST0,
                    F_BCAST, F_MCAST, F_RUNT, F_TRUNC, F_VLAN, FLAGS, LEN, NDST, SRC_PORT)
from .counters import (DROP_IN, DROP_IN_BASE, DROP_OUT, DROP_OUT_BASE, EXT_DROP_IN,
                       EXT_DROP_OUT, EXT_REASON_BASE,
                       RX_BCAST, RX_BYTES, RX_MCAST, RX_PKTS, TX_BCAST, TX_BYTES, TX_MCAST,
                       TX_PKTS)
from .parse import clear_fields, parse_one
from .kernel import kernel, helper

class DeliveryPlan:
    """Reused arrays: ``plan[:, span[q,0]:span[q,1]]`` are port q's deliveries."""

    def __init__(self, capacity: int, max_dest: int, max_ports: int):
        self.plan = np.zeros((2, capacity * max_dest), dtype=np.int64)
        self.span = np.zeros((max_ports + 1, 2), dtype=np.int64)
        self.total = 0


@kernel
def edge_ingress(meta, data, ctr, start, n):
    # DROP and NDST were set where the packet was received (init_packet) or injected.
    clear_fields(meta, start, n)
    for i in range(start, n):
        parse_one(meta, data, i)
        p = meta[SRC_PORT, i]
        if p < 0 or p >= ctr.shape[0]:
            # A source no port could have: count it on the default port and drop it.
            meta[SRC_PORT, i] = 0
            p = 0
            if meta[DROP, i] == 0:
                meta[DROP, i] = R.SOURCE_NOT_CONNECTED
        fl = meta[FLAGS, i]
        ctr[p, RX_PKTS] += 1
        ctr[p, RX_BYTES] += meta[LEN, i] + (4 if fl & F_VLAN else 0)
        if fl & F_MCAST:
            if fl & F_BCAST:
                ctr[p, RX_BCAST] += 1
            else:
                ctr[p, RX_MCAST] += 1
        if (fl & F_RUNT or (fl & F_TRUNC and meta[LEN, i] < 14)) and meta[DROP, i] == 0:
            meta[DROP, i] = R.RUNT


@kernel
def finalize(meta, ctr, plan, span, n):
    span[:, 0] = 0
    span[:, 1] = 0
    for i in range(n):
        alive = meta[DROP, i] == 0
        live = 0
        # Exclusions count on their port even when the packet was dropped later.
        for k in range(meta[NDST, i]):
            d = meta[DST0 + k, i]
            q = d & D_PORT_MASK
            if d & D_EXCLUDED:
                r = (d >> D_REASON_SHIFT) & 0xFFFF
                ctr[q, DROP_OUT_BASE + r] += 1
                ctr[q, DROP_OUT] += 1
                if r >= EXT_REASON_BASE:
                    ctr[q, EXT_DROP_OUT] += 1
            elif alive:
                live += 1
                span[q, 1] += 1
        if alive and live == 0:
            meta[DROP, i] = R.NO_DEST
        r = meta[DROP, i]
        if r != 0:
            p = meta[SRC_PORT, i]
            ctr[p, DROP_IN_BASE + r] += 1
            ctr[p, DROP_IN] += 1
            if r >= EXT_REASON_BASE:
                ctr[p, EXT_DROP_IN] += 1
    pos = 0
    for q in range(span.shape[0]):
        c = span[q, 1]
        span[q, 0] = pos
        span[q, 1] = pos
        pos += c
    for i in range(n):
        if meta[DROP, i] != 0:
            continue
        fl = meta[FLAGS, i]
        for k in range(meta[NDST, i]):
            d = meta[DST0 + k, i]
            if d & D_EXCLUDED:
                continue
            q = d & D_PORT_MASK
            j = span[q, 1]
            plan[0, j] = i
            plan[1, j] = d
            span[q, 1] = j + 1
            ctr[q, TX_PKTS] += 1
            ctr[q, TX_BYTES] += meta[LEN, i] + (4 if d & D_TAGGED else 0)
            if fl & F_MCAST:
                if fl & F_BCAST:
                    ctr[q, TX_BCAST] += 1
                else:
                    ctr[q, TX_MCAST] += 1
    return pos


@helper
def tx_failed(ctr, q, ln, d, reason):
    """Take back a delivery ``finalize`` counted on port ``q`` that its port kind could
    not make, and count it as dropped there with ``reason``."""
    ctr[q, TX_PKTS] -= 1
    ctr[q, TX_BYTES] -= ln + (4 if d & D_TAGGED else 0)
    ctr[q, DROP_OUT] += 1
    ctr[q, DROP_OUT_BASE + reason] += 1


@kernel
def tx_failed_span(ctr, q, meta, plan, j0, j1, reason):
    """tx_failed for the deliveries plan[:, j0:j1] of port ``q``: a port kind that
    could take none of them (its NIC not ready, its filter closed)."""
    for j in range(j0, j1):
        tx_failed(ctr, q, meta[LEN, plan[0, j]], plan[1, j], reason)


@helper
def emit_frame(out, pos, data, off, ln, d):
    """Copy a frame to ``out[pos:]`` as the destination receives it: with the 802.1Q
    tag the switch decided on (D_TAGGED), else untagged. Returns the bytes written;
    the caller checks room for ``ln + 4``."""
    if d & D_TAGGED and ln >= 12:
        tci = (d >> 48) & 0xFFFF
        copy_bytes(out, pos, data, off, 12)
        out[pos + 12] = 0x81
        out[pos + 13] = 0x00
        out[pos + 14] = (tci >> 8) & 0xFF
        out[pos + 15] = tci & 0xFF
        copy_bytes(out, pos + 16, data, off + 12, ln - 12)
        return ln + 4
    copy_bytes(out, pos, data, off, ln)
    return ln
