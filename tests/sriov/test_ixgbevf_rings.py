"""The VF's queue pair on hand-built rings in a guest-memory array (as the IOMMU
mapping shows it): descriptors as ixgbevf writes them become batch frames, DD is
written back on RS, frames land in receive buffers with their write-back, and a
hostile driver's rings, buffers and registers are refused without a stray access."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw

from sriov import ixgbevf_rings as R
from switch.batch import PacketBatch

IOVA = 0x10_0000_0000          # where the driver mapped its RAM
RAM = 1 << 20
TXRING, RXRING, BUFS = 0x1000, 0x2000, 0x10000


def frame(k, size=100):
    f = raw(Ether(src="02:00:00:00:a0:01", dst="02:00:00:00:00:f0") / IP() /
            UDP(sport=k, dport=9))
    return f + bytes(size - len(f))


class Rig:
    def __init__(self, ndesc=32, bsize_kb=2):
        self.mem = np.zeros(RAM, np.uint8)
        self.regs = np.zeros(R.QREGS_SIZE // 4, np.uint32)
        self.icr = np.zeros(1, np.int64)
        self.nd = ndesc
        self.stats = np.zeros(R.NSTATS, np.int64)
        self.txs = np.zeros(R.NTXS, np.int64)
        for base, ring in ((R.TX_BASE, TXRING), (R.RX_BASE, RXRING)):
            self.set(base + R.R_BAL, (IOVA + ring) & 0xFFFFFFFF)
            self.set(base + R.R_BAH, (IOVA + ring) >> 32)
            self.set(base + R.R_LEN, ndesc * 16)
            self.set(base + R.R_DCTL, R.DCTL_ENABLE)
        self.set(R.RX_BASE + R.R_SRRCTL, bsize_kb | R.SRRCTL_DROP_EN)
        self.at = BUFS
        self.tail = 0

    def set(self, off, v):
        self.regs[off // 4] = v

    def get(self, off):
        return int(self.regs[off // 4])

    def tx_desc(self, data, cmd, addr=None):
        if addr is None:
            addr = IOVA + self.at
            self.mem[self.at:self.at + len(data)] = np.frombuffer(data, np.uint8)
            self.at += 2048
        d = TXRING + self.tail * 16
        ctl = len(data) | R.TXD_DTYP_DATA << R.TXD_DTYP_SHIFT | R.TXD_CMD_DEXT | cmd
        self.mem[d:d + 16] = np.frombuffer(struct.pack("<QII", addr, ctl, len(data) << 14),
                                           np.uint8)
        self.tail = (self.tail + 1) % self.nd
        return d

    def transmit(self):
        self.set(R.TX_BASE + R.R_TAIL, self.tail)
        b = PacketBatch(64, 1 << 20)
        n, cur, cause = R.vf_transmit(self.mem, IOVA, RAM, self.regs, self.icr, self.txs, b.meta,
                                      b.data, 0, 0, 7, self.stats)
        b.n, b.cursor = n, cur
        return b, cause

    def give_rx(self, count, addr=None):
        for k in range(count):
            d = RXRING + k * 16
            a = IOVA + BUFS + k * 4096 if addr is None else addr
            self.mem[d:d + 16] = np.frombuffer(struct.pack("<QQ", a, 0), np.uint8)
        self.set(R.RX_BASE + R.R_TAIL, count)

    def receive(self, *frames):
        b = PacketBatch(64, 1 << 20)
        b.append_frames(list(frames), src_port=1)
        plan = np.zeros((2, b.n), np.int64)
        plan[0] = np.arange(b.n)
        return R.vf_receive(self.mem, IOVA, RAM, self.regs, self.icr, b.meta, b.data, plan, 0, b.n,
                            self.stats)

    def rx_desc(self, k):
        d = RXRING + k * 16
        status, length, vlan = struct.unpack_from("<IHH", self.mem, d + 8)
        return status, length


def test_transmit_gathers_buffers_until_eop_and_writes_dd_on_rs():
    r = Rig()
    f1, f2 = frame(1, 60), frame(2, 1514)
    a = r.tx_desc(f1, R.TXD_CMD_EOP | R.TXD_CMD_IFCS | R.TXD_CMD_RS)
    r.tx_desc(f2[:1000], R.TXD_CMD_IFCS)
    c = r.tx_desc(f2[1000:], R.TXD_CMD_EOP | R.TXD_CMD_IFCS | R.TXD_CMD_RS)
    b, cause = r.transmit()
    assert b.frames() == [f1, f2] and int(b.meta[2, 0]) == 7          # SRC_PORT
    assert r.mem[a + 12] & R.TXD_STAT_DD and r.mem[c + 12] & R.TXD_STAT_DD
    assert not r.mem[TXRING + 16 + 12] & R.TXD_STAT_DD                 # no RS, no DD
    assert r.get(R.TX_BASE + R.R_HEAD) == 3 and cause == R.EICR_RTX_Q0
    assert r.icr[0] & R.EICR_RTX_Q0


def test_a_buffer_outside_the_mapping_drops_its_frame_only():
    r = Rig()
    r.tx_desc(frame(1)[:50], 0, addr=IOVA + RAM - 10)          # runs off the mapping
    r.tx_desc(frame(1)[50:], R.TXD_CMD_EOP)
    r.tx_desc(frame(2), R.TXD_CMD_EOP, addr=IOVA - 4096)       # below it
    r.tx_desc(frame(3), R.TXD_CMD_EOP)
    b, _ = r.transmit()
    assert b.frames() == [frame(3)] and r.stats[R.S_TX_BAD_DMA] == 2


@pytest.mark.parametrize("what,value", [("len", 100), ("len", 0), ("bal", 0x40),
                                        ("head", 999), ("tail", 32), ("bah", 0x7FFFFFFF)])
def test_a_ring_that_makes_no_sense_is_not_run(what, value):
    r = Rig()
    r.tx_desc(frame(1), R.TXD_CMD_EOP | R.TXD_CMD_RS)
    r.set(R.TX_BASE + R.R_TAIL, r.tail)
    off = {"len": R.R_LEN, "bal": R.R_BAL, "head": R.R_HEAD, "tail": R.R_TAIL,
           "bah": R.R_BAH}[what]
    r.set(R.TX_BASE + off, value)
    b = PacketBatch(8, 1 << 16)
    n, _, _ = R.vf_transmit(r.mem, IOVA, RAM, r.regs, r.icr, r.txs, b.meta, b.data, 0, 0, 7,
                            r.stats)
    assert n == 0 and r.stats[R.S_RING_ERROR] == 1


def test_receive_fills_buffers_and_writes_back_length_dd_and_eop():
    r = Rig(bsize_kb=1)
    r.give_rx(8)
    small, big = frame(1, 200), frame(2, 1514)
    done, cause = r.receive(small, big)
    assert done == 2 and cause == R.EICR_RTX_Q0
    assert r.rx_desc(0) == (R.RXD_STAT_DD | R.RXD_STAT_EOP, 200)
    assert r.rx_desc(1) == (R.RXD_STAT_DD, 1024)                 # 1 KiB buffers: two
    assert r.rx_desc(2) == (R.RXD_STAT_DD | R.RXD_STAT_EOP, 490)
    assert bytes(r.mem[BUFS:BUFS + 200]) == small
    got = bytes(r.mem[BUFS + 4096:BUFS + 4096 + 1024]) + \
        bytes(r.mem[BUFS + 8192:BUFS + 8192 + 490])
    assert got == big and r.get(R.RX_BASE + R.R_HEAD) == 3


def test_receive_without_descriptors_or_with_bad_buffers_drops_and_counts():
    r = Rig()
    r.give_rx(1)
    assert r.receive(frame(1), frame(2)) == (1, R.EICR_RTX_Q0)
    assert r.stats[R.S_RX_NO_DESC] == 1
    r2 = Rig()
    r2.give_rx(4, addr=IOVA + RAM - 100)                          # buffers off the end
    before = r2.mem.copy()
    assert r2.receive(frame(1, 500))[0] == 0 and r2.stats[R.S_RX_BAD_DMA] == 1
    assert (r2.mem == before).all()                               # nothing written


def test_random_rings_and_registers_never_reach_outside_memory():
    """Fuzz: random descriptor bytes and random registers; the engines must stay in
    bounds (numba does not check) and the guard pages around memory stay intact."""
    rng = np.random.default_rng(1)
    seen = np.zeros(R.NSTATS, np.int64)
    for _ in range(300):
        guard = np.full(RAM + 2 * 4096, 0xA5, np.uint8)
        mem = guard[4096:4096 + RAM]
        mem[:] = rng.integers(0, 256, RAM, dtype=np.uint8)
        regs = np.zeros(R.QREGS_SIZE // 4, np.uint32)
        icr = np.zeros(1, np.int64)
        for base, ring in ((R.TX_BASE, 0x1000), (R.RX_BASE, 0x2000)):
            if rng.random() < 0.6:                      # a sane ring, random positions
                vals = {R.R_BAL: ring, R.R_BAH: IOVA >> 32, R.R_LEN: 512,
                        R.R_HEAD: int(rng.integers(0, 32)), R.R_TAIL: int(rng.integers(0, 32)),
                        R.R_SRRCTL: int(rng.integers(0, 32))}
            else:                                       # anything at all
                vals = {off: int(rng.choice([rng.integers(0, 2**32), rng.integers(0, 64),
                                             0x1000, 0x2000, 512]))
                        for off in (R.R_BAL, R.R_LEN, R.R_HEAD, R.R_TAIL, R.R_SRRCTL)}
                vals[R.R_BAH] = int(rng.choice([0, IOVA >> 32, 0xFFFFFFFF]))
            for off, v in vals.items():
                regs[(base + off) // 4] = v
            regs[(base + R.R_DCTL) // 4] = R.DCTL_ENABLE
        for ring in (0x1000, 0x2000):                 # plausible descriptors where rings lie
            for k in range(32):
                addr = IOVA + int(rng.integers(-8192, RAM + 8192))
                ctl = (int(rng.integers(0, 1 << 16)) if rng.random() < 0.3
                       else int(rng.integers(0, 2048)))
                ctl |= int(rng.choice([2, 3, 3, 3, 7])) << R.TXD_DTYP_SHIFT
                ctl |= int(rng.choice([0, R.TXD_CMD_DEXT, R.TXD_CMD_DEXT]))
                ctl |= int(rng.choice([0, R.TXD_CMD_EOP, R.TXD_CMD_EOP | R.TXD_CMD_RS]))
                mem[ring + 16 * k:ring + 16 * k + 12] = np.frombuffer(
                    struct.pack("<QI", addr & (2**64 - 1), ctl), np.uint8)
        b = PacketBatch(64, 1 << 18)
        stats = np.zeros(R.NSTATS, np.int64)
        n, cur, _ = R.vf_transmit(mem, IOVA, RAM, regs, icr, np.zeros(R.NTXS, np.int64), b.meta,
                                  b.data, 0, 0, 1, stats)
        assert 0 <= n <= 64 and cur <= b.data.shape[0]
        b.n = n
        if n:
            plan = np.zeros((2, n), np.int64)
            plan[0] = np.arange(n)
            R.vf_receive(mem, IOVA, RAM, regs, icr, b.meta, b.data, plan, 0, n, stats)
        assert (guard[:4096] == 0xA5).all() and (guard[4096 + RAM:] == 0xA5).all()
        seen += stats
    # The fuzz reached every outcome, not only the ring checks.
    assert seen[R.S_TX_FRAMES] and seen[R.S_TX_BAD_DMA] and seen[R.S_RX_FRAMES]
    assert seen[R.S_RX_BAD_DMA] + seen[R.S_RX_NO_DESC] and seen[R.S_RING_ERROR]


def test_a_frame_of_more_than_64_descriptors_is_skipped_and_the_ring_goes_on():
    r = Rig(ndesc=128)
    for _ in range(70):                                        # no EOP in 64 of them
        r.tx_desc(b"\x00" * 10, R.TXD_CMD_RS)
    r.tx_desc(frame(1), R.TXD_CMD_EOP | R.TXD_CMD_RS)
    b, _ = r.transmit()
    assert r.stats[R.S_TX_BAD_DMA] == 1 and r.get(R.TX_BASE + R.R_HEAD) != 0
    assert r.mem[TXRING + 12] & R.TXD_STAT_DD                  # skipped, given back


def test_a_ring_longer_than_the_hardware_allows_is_not_run():
    r = Rig()
    r.set(R.TX_BASE + R.R_LEN, (1 << 20) + 128)
    r.tx_desc(frame(1), R.TXD_CMD_EOP)
    b, _ = r.transmit()
    assert b.n == 0 and r.stats[R.S_RING_ERROR] == 1
