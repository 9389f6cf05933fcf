"""In-memory ports: inject batches, collect what leaves. For tests, demos, benchmarks.

One ``MemoryPorts`` kind serves any number of ports of a switch. Frames to send
into the switch wait in an input queue (one flat byte buffer and a table of
(port, offset, length)); what the switch delivers lands in an output store laid
out the same way, with the 802.1Q tag on the wire form the switch chose. Both
directions are single compiled loops per batch.

``replay=True`` makes the input queue a loop (a traffic generator for
benchmarks) and ``keep=False`` makes the output a ring that is overwritten
rather than kept (a sink that still copies every frame).
"""
from __future__ import annotations

import numpy as np

from . import counters as R
from .batch import ALIGN, LEN, OFF, ROW_PAD, copy_bytes, init_packet
from .delivery import emit_frame, tx_failed
from .portkind import PortKind
from .kernel import kernel

Q_PORT, Q_OFF, Q_LEN = 0, 1, 2


class MemoryPorts(PortKind):
    name = "memory"

    def __init__(self, in_frames: int = 65536, in_bytes: int = 1 << 24,
                 out_frames: int = 65536, out_bytes: int = 1 << 24,
                 replay: bool = False, keep: bool = True):
        super().__init__()
        self.inq = np.zeros((3, in_frames), dtype=np.int64)
        self.indata = np.zeros(in_bytes, dtype=np.uint8)
        self.outq = np.zeros((3, out_frames), dtype=np.int64)
        self.outdata = np.zeros(out_bytes, dtype=np.uint8)
        # state: [in_head, in_tail, in_bytes_used, out_count, out_bytes_used, replay, keep]
        self.state = np.zeros(8, dtype=np.int64)
        self.state[5] = int(replay)
        self.state[6] = int(keep)

    # ---- input -------------------------------------------------------------------------
    def inject(self, port, frames) -> int:
        """Queue frames (bytes) to enter the switch from ``port``. Returns how many fit."""
        pid = port if isinstance(port, int) else port.port_id
        if pid not in self.port_ids:
            # The ID indexes the switch's counters and policies: only our own ports.
            raise ValueError(f"port {pid} is not one of this memory port kind's ports "
                             f"{self.port_ids.tolist()}")
        if frames and isinstance(frames[0], (bytes, bytearray, memoryview)):
            lens = np.fromiter((len(f) for f in frames), dtype=np.int64, count=len(frames))
            flat = np.frombuffer(b"".join(bytes(f) for f in frames), dtype=np.uint8)
        else:
            raise TypeError("inject takes a list of byte strings")
        return _enqueue(self.inq, self.indata, self.state, flat, lens, pid)

    def pending(self) -> int:
        return int(self.state[1] - self.state[0])

    def rewind(self) -> None:
        self.state[0] = 0

    def receive(self, batch) -> int:
        n, batch.cursor = _dequeue(self.inq, self.indata, self.state, batch.meta, batch.data)
        return n

    # ---- output ------------------------------------------------------------------------
    def transmit(self, batch, plan, span) -> None:
        _transmit(batch.meta, batch.data, plan, span, self.port_ids, self.outq, self.outdata,
                  self.state, self.switch.counters.table)

    def collect(self, port=None) -> list[bytes]:
        """Frames delivered (to ``port``, or to all) since the last collect; clears them."""
        n = int(self.state[3])
        pid = None if port is None else (port if isinstance(port, int) else port.port_id)
        out = []
        if self.state[6]:
            for j in range(min(n, self.outq.shape[1])):
                if pid is None or self.outq[Q_PORT, j] == pid:
                    o, ln = int(self.outq[Q_OFF, j]), int(self.outq[Q_LEN, j])
                    out.append(bytes(self.outdata[o:o + ln]))
        self.clear_output()
        return out

    def collect_by_port(self) -> dict[int, list[bytes]]:
        n = int(self.state[3])
        out: dict[int, list[bytes]] = {}
        for j in range(min(n, self.outq.shape[1])):
            o, ln = int(self.outq[Q_OFF, j]), int(self.outq[Q_LEN, j])
            out.setdefault(int(self.outq[Q_PORT, j]), []).append(bytes(self.outdata[o:o + ln]))
        self.clear_output()
        return out

    def clear_output(self) -> None:
        self.state[3] = 0
        self.state[4] = 0

    def delivered(self) -> int:
        return int(self.state[3])


@kernel
def _enqueue(inq, indata, state, flat, lens, pid):
    pos = 0
    got = 0
    for j in range(lens.shape[0]):
        ln = lens[j]
        t = state[1]
        if t >= inq.shape[1] or state[2] + ln > indata.shape[0]:
            break
        o = state[2]
        copy_bytes(indata, o, flat, pos, ln)
        inq[Q_PORT, t] = pid
        inq[Q_OFF, t] = o
        inq[Q_LEN, t] = ln
        state[1] = t + 1
        state[2] = o + ln
        pos += ln
        got += 1
    return got


@kernel
def _dequeue(inq, indata, state, meta, data):
    cap = meta.shape[1] - ROW_PAD
    cursor = 0
    n = 0
    while n < cap:
        h = state[0]
        if h >= state[1]:
            if state[5] and state[1] > 0:
                state[0] = 0           # replay: loop over the queued traffic
                h = 0
            else:
                break
        ln = inq[Q_LEN, h]
        if cursor + ln > data.shape[0]:
            break
        o = inq[Q_OFF, h]
        copy_bytes(data, cursor, indata, o, ln)
        init_packet(meta, n, cursor, ln, inq[Q_PORT, h], 0)
        cursor = (cursor + ln + ALIGN - 1) & ~(ALIGN - 1)
        state[0] = h + 1
        n += 1
    if not state[5] and state[0] == state[1]:
        state[0] = 0
        state[1] = 0
        state[2] = 0
    return n, cursor


@kernel
def _transmit(meta, data, plan, span, port_ids, outq, outdata, state, ctr):
    keep = state[6]
    for pi in range(port_ids.shape[0]):
        q = port_ids[pi]
        for j in range(span[q, 0], span[q, 1]):
            i = plan[0, j]
            d = plan[1, j]
            ln = meta[LEN, i]
            c = state[3]
            o = state[4]
            if c >= outq.shape[1] or o + ln + 4 > outdata.shape[0]:
                if keep:
                    tx_failed(ctr, q, ln, d, R.TX_FULL)
                    continue
                c = 0                       # sink: wrap around and overwrite
                o = 0
            w = emit_frame(outdata, o, data, meta[OFF, i], ln, d)
            outq[Q_PORT, c] = q
            outq[Q_OFF, c] = o
            outq[Q_LEN, c] = w
            state[3] = c + 1
            state[4] = o + w
