"""``hvnet bench ring``: NetVSC -> NetVSP through the shared-memory VMBus ring.

Two processes, as in a VM: this one is the host (NetVSP's ingress kernel drains
the guest-to-host ring into a switch batch and writes the completions back), a
child is the guest (NetVSC's transmit kernel puts frames on the ring and its
reclaim kernel takes the completions). Guest RAM is a memfd both map; the rings,
the send buffer and the guest's transmit arena live in it. Both sides poll (no
interrupts: the figure is what the ring and the kernels can move).

Two runs: 64-byte frames (through send-buffer sections, Mpps) and LSO
super-packets of the largest size NetVSP advertises (rndis.LSO_MAX_SIZE, 61.3
KiB: Linux's netvsc caps its TSO there; RNDIS header in headroom, one
GPA-direct range; Gbit/s counted on the frame bytes the host received).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from hypervisor.partition import GuestMemory
from netvsp.datapath import NBAD, ReceiveBuffer, netvsp_ingress, write_completions
from netvsp import rndis as R
from netvsp.netvsc_datapath import HEADROOM, netvsc_reclaim, netvsc_transmit
from netvsp.vmbus import ring as RG
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, FLAGS, GSO_SIZE, GSO_TCPV4,
                          GSO_TYPE, LEN, PacketBatch, init_packet)

RAM = 64 << 20
RDS = 512 * 1024                   # Linux netvsc's default ring: 128 pages a way (a.1)
G2H = 0x10000
H2G = G2H + 4096 + RDS
SBUF = 0x200000
SEC = 6144
NSEC = 170                         # NETVSC_DEFAULT_TX (f.2)
TXA = 0x400000
TXSIZE = 32 << 20


def _frames(size: int) -> bytes:
    eth = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    ip = bytes.fromhex("45000000000040004006") + bytes(2) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    tcp = bytes(20)
    body = bytes((k * 31) & 0xFF for k in range(max(0, size - 54)))
    return (eth + ip + tcp + body)[:size]


def guest_main(fd: int, size: int, seconds: float) -> None:
    ram = GuestMemory(RAM, fd=fd)
    mem = ram.mem
    batch = 256 if size <= 2048 else 64
    slot = ((size + HEADROOM + 63) // 64) * 64
    b = PacketBatch(batch, arena=batch * slot)
    b.data = mem[TXA:TXA + batch * slot]
    f = np.frombuffer(_frames(size), np.uint8)
    for i in range(batch):
        at = i * slot + HEADROOM
        b.data[at:at + size] = f
        init_packet(b.meta, i, at, size, 1, 0)
        if size > 2048:
            b.meta[FLAGS, i] |= F_CSUM_PARTIAL
            b.meta[CSUM_START, i] = 34
            b.meta[CSUM_OFF, i] = 16
            b.meta[GSO_TYPE, i] = GSO_TCPV4
            b.meta[GSO_SIZE, i] = 1448
    free = np.arange(NSEC, dtype=np.int64)
    nfree = np.array([NSEC], dtype=np.int64)
    busy = np.zeros(NSEC, dtype=np.uint8)
    bufs = np.zeros((1, 2), dtype=np.int64)
    nvsp = np.zeros(16, dtype=np.uint8)
    stats = np.zeros(4, dtype=np.int64)
    desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
    gpa_done = np.zeros(batch, dtype=np.int64)      # completions per arena row
    rs = np.array([0, 0], dtype=np.int64)
    rs[0] = RG.ring_read_pos(mem, H2G, RDS)
    sent = 0
    start = 0
    inflight_gpa = 0
    # compile (or load) both kernels before the clock starts: on a cold numba
    # cache that takes seconds, and the host measures from the first packet on
    netvsc_reclaim(mem, H2G, RDS, rs.copy(), desc, free, nfree, busy, gpa_done)
    netvsc_transmit(mem, G2H, RDS, b.meta, b.data, TXA, 0, 0, SBUF, SEC, free, nfree, busy,
                    bufs, nvsp, stats)
    end = time.monotonic() + seconds + 2
    while time.monotonic() < end:
        got = netvsc_reclaim(mem, H2G, RDS, rs, desc, free, nfree, busy, gpa_done)
        if got > 0:
            RG.ring_read_commit(mem, H2G, RDS, rs[0], RG.ring_read_pos(mem, H2G, RDS))
        if size > 2048 and start == 0 and inflight_gpa > gpa_done.sum():
            continue               # the arena is reused only once the host has it all
        nxt, _ = netvsc_transmit(mem, G2H, RDS, b.meta, b.data, TXA, batch, start, SBUF, SEC,
                                 free, nfree, busy, bufs, nvsp, stats)
        if size > 2048:
            inflight_gpa += nxt - start
        sent += nxt - start
        start = 0 if nxt >= batch else nxt
    ram.close()


def host_run(size: int, seconds: float) -> dict:
    ram = GuestMemory(RAM)
    mem = ram.mem
    for base in (G2H, H2G):
        RG.Ring(mem, base, RDS).init()
    child = subprocess.Popen([sys.executable, "-m", "hvnet.ring_bench", "--guest",
                              str(ram.fd), str(size), str(seconds)], pass_fds=[ram.fd])
    b = PacketBatch(256, arena=8 << 20)
    rstate = np.array([RG.ring_read_pos(mem, G2H, RDS), 0], dtype=np.int64)
    desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
    pieces = np.zeros((64, 3), dtype=np.int64)
    nvsp = np.zeros(16, dtype=np.uint8)
    comp = np.zeros((512, 2), dtype=np.int64)
    bad = np.zeros(NBAD, dtype=np.int64)
    msg = np.zeros(8, dtype=np.uint8)
    rxbuf = ReceiveBuffer(0x3000000, 1 << 20, 1806)   # no receives in this run
    frames = nbytes = 0
    pend = 0
    t0 = None
    try:
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            old = rstate[0]
            n, cursor, ncomp, why = netvsp_ingress(mem, G2H, RDS, rstate, desc, pieces, nvsp,
                                                   SBUF, NSEC * SEC, SEC, b.meta, b.data, 0, 0,
                                                   1, comp, pend, bad, *rxbuf.arrays())
            if why < 0:
                raise RuntimeError(f"ring error {why}")
            if rstate[0] != old:
                RG.ring_read_commit(mem, G2H, RDS, rstate[0], old)
            if ncomp:
                w, _ = write_completions(mem, H2G, RDS, comp, 0, ncomp, msg)
                comp[:ncomp - w] = comp[w:ncomp]
                pend = ncomp - w
            if n:
                if t0 is None:
                    t0 = time.perf_counter()          # from the first packet on
                frames += n
                nbytes += int(b.meta[LEN, :n].sum())
                if time.perf_counter() - t0 >= seconds:
                    break
        dt = time.perf_counter() - t0 if t0 else 0.0
    finally:
        child.wait(60)
        ram.close()
    if bad.any() or not dt:
        raise RuntimeError(f"ring bench: bad packets {bad.tolist()}, seconds {dt}")
    return {"frames": frames, "seconds": dt, "mpps": frames / dt / 1e6,
            "gbps": nbytes * 8 / dt / 1e9}


def run(seconds: float = 3.0) -> dict:
    small = host_run(64, seconds)
    lso = host_run(R.LSO_MAX_SIZE, seconds)
    return {"mpps_64": small["mpps"], "gbps_lso": lso["gbps"], "frames_64": small["frames"],
            "frames_lso": lso["frames"], "lso_bytes": R.LSO_MAX_SIZE, "seconds": seconds,
            "ring_bytes": RDS, "send_sections": NSEC, "polling": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guest", nargs=3)
    a = ap.parse_args(argv)
    if a.guest:
        guest_main(int(a.guest[0]), int(a.guest[1]), float(a.guest[2]))
        return 0
    print(json.dumps(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
