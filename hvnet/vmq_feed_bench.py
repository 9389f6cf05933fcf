"""``hvnet bench feed``: how VMQ's queues are fed from the uplink, measured two ways.

Issue 6 leaves the feed open (AF_PACKET fanout, AF_XDP queues, or a compiled
demultiplexer of one ring) to be measured. This compares the two that run on
any Linux host, on a real veth in a namespace of its own:

- ``one ring, compiled demultiplexer``: what the switch does. One TPACKET_V3
  ring; one thread takes each batch out of it, checks it (``edge_ingress``) and
  sorts it into queues (``Vmq.steer``: MAC filters, reference
  ``vswitch_vmq_sriov.md`` 3.1).
- ``fanout, two rings``: two ring sockets in one ``PACKET_FANOUT_CBPF`` group,
  whose classic BPF program picks the socket by destination MAC, so the kernel
  sorts; a thread per ring takes and checks its batches.

Each round first sends ``frames`` 64-byte frames, two destination MACs in turn,
into the rings while nobody reads them (the send time includes the kernel's
fanout program), then times draining them: the wall time, the readers' CPU time,
and, frame by frame, whether each reached its destination MAC's queue. Rounds alternate the two. Only
the feed is measured: what follows it (the switch's pipeline, the delivery into
VMs) is ``hvnet bench vmq``.
"""
from __future__ import annotations

import ctypes
import os
import socket
import statistics
import struct
import threading
import time

import numpy as np

from switch.afpacket import RingSocket
from switch.batch import DMAC, QUEUE
from switch.delivery import edge_ingress
from switch.kernel import kernel
from switch.port import mac_to_int
from switch.switch import Switch
from switch.vmq import Vmq

from . import pktgen
from .netns import Netns

MACS = ("02:00:00:00:0a:01", "02:00:00:00:0b:01")
SRC = "02:00:00:00:0c:01"
SOL_PACKET, PACKET_FANOUT, PACKET_FANOUT_DATA, PACKET_STATISTICS = 263, 18, 22, 6
PACKET_FANOUT_CBPF = 6
SKF_LL_OFF = (-0x200000) & 0xFFFFFFFF
BLOCK_SIZE, BLOCK_NR = 1 << 20, 160            # 160 MiB a ring: a round's frames fit
RETIRE_MS = 100
MODES = ("one ring, compiled demultiplexer", "fanout, two rings")


def mac_program(mac: str) -> bytes:
    """Classic BPF for a fanout group: socket 1 for frames to ``mac``, else 0."""
    m = mac_to_int(mac).to_bytes(6, "big")
    hi, lo = int.from_bytes(m[:2], "big"), int.from_bytes(m[2:], "big")
    # The kernel runs a fanout program with the frame pulled to its network header:
    # the Ethernet header is reached from SKF_LL_OFF (linux/filter.h).
    ins = [(0x28, 0, 0, SKF_LL_OFF),       # ldh [ll+0]  destination MAC, first two bytes
           (0x15, 0, 3, hi),               # jeq #hi     else ret #0
           (0x20, 0, 0, SKF_LL_OFF + 2),   # ld  [ll+2]  its last four
           (0x15, 0, 1, lo),               # jeq #lo     else ret #0
           (0x06, 0, 0, 1),                # ret #1
           (0x06, 0, 0, 0)]                # ret #0
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def _join_fanout(socks: list[RingSocket], group: int, mac: str) -> None:
    for s in socks:
        s.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, (group & 0xFFFF) | (PACKET_FANOUT_CBPF << 16))
    code = mac_program(mac)
    prog = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(code) // 8, ctypes.addressof(prog))
    socks[0].sock.setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, fprog)   # the kernel copies it


def _stats(s: RingSocket) -> tuple[int, int]:
    """(packets, drops) since the last call (tpacket_stats_v3)."""
    p, d, _ = struct.unpack("III", s.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12))
    return p, d


def _send(ifname: str, frames: int) -> tuple[float, list[int]]:
    """Send ``frames`` frames alternating the two MACs in runs of 64; the seconds it
    took and how many went to each MAC."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, pktgen.PACKET_QDISC_BYPASS, 1)
    sock.bind((ifname, 0))
    try:
        built = [pktgen.build_frame(64, SRC, m, "10.8.0.9", "10.8.0.1", 7, 7) for m in MACS]
        ts, out = np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64)
        t0 = time.perf_counter()
        sent, k, each = 0, 0, [0, 0]
        while sent < frames:
            f = built[k & 1]
            n = min(64, frames - sent)
            pktgen.send_paced(sock.fileno(), f, len(f), 0, n, 0, time.time_ns() + 10**10,
                              ts, out)
            if out[1]:
                raise RuntimeError(f"the veth refused {int(out[1])} frames")
            sent += int(out[0])
            each[k & 1] += int(out[0])
            k += 1
        return time.perf_counter() - t0, each
    finally:
        sock.close()


@kernel
def misplaced(meta, n, macs, queues, fixed):
    """Frames of ``meta[:, :n]`` not in their destination MAC's queue (``queues[k]``
    for ``macs[k]``; another MAC has none): the ring's own queue when ``fixed`` >= 0
    (fanout), else the one steering wrote."""
    bad = 0
    for i in range(n):
        q = fixed if fixed >= 0 else meta[QUEUE, i]
        want = -1
        for k in range(macs.shape[0]):
            if meta[DMAC, i] == macs[k]:
                want = queues[k]
        if want != q:
            bad += 1
    return bad


class _Reader(threading.Thread):
    """Drains one ring: receive, check and (``vmq``) steer each batch."""

    def __init__(self, sock: RingSocket, sw: Switch, want: int, vmq: Vmq | None,
                 queues: np.ndarray, fixed: int):
        super().__init__(daemon=True)
        self.sock, self.sw, self.want, self.vmq = sock, sw, want, vmq
        self.macs = np.array([mac_to_int(m) for m in MACS], dtype=np.int64)
        self.queues, self.fixed = queues, fixed
        self.batch = sw.new_batch()
        self.got = 0
        self.wrong = 0
        self.cpu = 0.0
        self.start_evt = threading.Event()

    def run(self):
        b, ctr, bad = self.batch, self.sw.counters.table, np.zeros(2, dtype=np.int64)
        self.start_evt.wait()
        c0 = time.thread_time()
        last = time.monotonic()
        while self.got < self.want and time.monotonic() - last < 0.5:   # or gone missing
            b.reset()
            n, cursor = self.sock.receive(1, b.meta, b.data, 0, 0, bad)
            b.n, b.cursor = n, cursor
            if n:
                edge_ingress(b.meta, b.data, ctr, 0, n)
                if self.vmq is not None:
                    self.vmq.steer(b)
                self.wrong += misplaced(b.meta, n, self.macs, self.queues, self.fixed)
                self.got += n
                last = time.monotonic()
        self.cpu = time.thread_time() - c0


def _round(ifs: tuple[str, str], mode: str, frames: int, sw: Switch, vmq: Vmq,
           queues: list[int], group: int) -> dict:
    fanout = mode == MODES[1]
    # Blocks retire when full or after RETIRE_MS: with the uplink's 1 ms they would
    # go out part-filled while the sender runs, and the rings overflow.
    socks = [RingSocket(ifs[1], version=3, block_size=BLOCK_SIZE, block_nr=BLOCK_NR,
                        rx_nr=1, tx_nr=1, retire_ms=RETIRE_MS)
             for _ in range(2 if fanout else 1)]
    try:
        if fanout:
            _join_fanout(socks, group, MACS[1])
        for s in socks:
            _stats(s)                                    # from zero
        q0 = vmq.q_pkts.copy()
        sent_s, each = _send(ifs[0], frames)
        time.sleep(RETIRE_MS / 1000 * 2)                 # the last block retires
        if fanout:      # ring k is MACS[k]'s: the program sends MACS[1] to socket 1
            readers = [_Reader(s, sw, w, None, np.arange(2), k)
                       for k, (s, w) in enumerate(zip(socks, each))]
        else:
            readers = [_Reader(socks[0], sw, frames, vmq, np.array(queues), -1)]
        for r in readers:
            r.start()
        t0 = time.perf_counter()
        for r in readers:
            r.start_evt.set()
        for r in readers:
            r.join()
        wall = time.perf_counter() - t0
        drops = sum(_stats(s)[1] for s in socks)
        got = [r.got for r in readers]
        if fanout:
            per_queue = got
        else:
            d = (vmq.q_pkts - q0).tolist()
            per_queue = [int(d[q]) for q in queues]
        return {"mode": mode, "frames": frames, "received": sum(got), "drops": drops,
                "sent_per_mac": each, "per_queue": per_queue,
                "misrouted": sum(r.wrong for r in readers), "drain_s": wall, "send_s": sent_s,
                "cpu_s": sum(r.cpu for r in readers),
                "mfps": sum(got) / wall / 1e6 if wall > 0 else 0.0}
    finally:
        for s in socks:
            s.close()


def run(frames: int = 400_000, repeats: int = 3, progress=lambda s: None,
        prefix: str | None = None) -> dict:
    """A namespace with a veth pair; ``repeats`` rounds of each feed; torn down after."""
    net = Netns(prefix or f"hvf{os.getpid() % 10000}")
    out = {"frames": frames, "repeats": repeats, "rounds": [], "results": {},
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        ns = net.add_namespace("n")
        ifs = (net.name("s"), net.name("r"))
        net.add_veth((ns, ifs[0]), (ns, ifs[1]))
        from pyroute2 import netns as pr_netns
        pr_netns.pushns(ns)
        try:
            for i in ifs:       # no IPv6: its router solicitations would join the count
                with open(f"/proc/sys/net/ipv6/conf/{i}/disable_ipv6", "w") as f:
                    f.write("1")
                net.set_up(ns, i)
            sw = Switch("feed", max_ports=4)
            vmq = Vmq(2, port_id=1, cpus=[0])
            queues = []
            for pid, m in zip((2, 3), MACS):
                q = vmq.allocate(pid, cpu=0)
                vmq.set_filter(q, mac_to_int(m))
                vmq.complete(q)
                queues.append(q)
            pktgen.warm()
            _round(ifs, MODES[0], 1000, sw, vmq, queues, 1)      # compile and fault in
            for i in range(repeats):
                for k, mode in enumerate(MODES):
                    progress(f"round {i + 1}/{repeats}: {mode}")
                    out["rounds"].append(_round(ifs, mode, frames, sw, vmq, queues, 100 + i))
        finally:
            pr_netns.popns()
    finally:
        net.teardown()
    for mode in MODES:
        rs = [r for r in out["rounds"] if r["mode"] == mode]
        if rs:
            out["results"][mode] = {
                "mfps": statistics.median(r["mfps"] for r in rs),
                "min": min(r["mfps"] for r in rs), "max": max(r["mfps"] for r in rs),
                "cpu_ns": statistics.median(r["cpu_s"] / max(r["received"], 1) * 1e9
                                            for r in rs),
                "send_ns": statistics.median(r["send_s"] / r["frames"] * 1e9 for r in rs),
                "lost": sum(r["frames"] - r["received"] for r in rs),
                "drops": sum(r["drops"] for r in rs),
                "misrouted": sum(r["misrouted"] for r in rs),
                "per_queue": rs[-1]["per_queue"]}
    a, b = (out["results"].get(m) for m in MODES)
    if a and b and a["mfps"] > 0:
        out["ratio"] = b["mfps"] / a["mfps"]
    return out


def table(result: dict):
    from rich.table import Table
    t = Table(title=f"hvnet bench feed: {result['frames']} frames of 64 bytes to two MACs, "
              f"drained from the uplink's ring(s), x{result['repeats']}")
    for c in ("feed", "drained, Mframes/s", "readers' CPU, ns/frame", "send + kernel, ns/frame",
              "per queue (last)", "lost / ring drops / wrong queue"):
        t.add_column(c)
    for mode, r in result["results"].items():
        t.add_row(mode, f"{r['mfps']:.2f} ({r['min']:.2f}-{r['max']:.2f})", f"{r['cpu_ns']:.0f}",
                  f"{r['send_ns']:.0f}", " / ".join(str(x) for x in r["per_queue"]),
                  f"{r['lost']} / {r['drops']} / {r['misrouted']}")
    if "ratio" in result:
        t.caption = f"fanout / one ring: x{result['ratio']:.2f}"
    return t
