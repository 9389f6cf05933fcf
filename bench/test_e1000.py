"""Micro benchmarks of the e1000 device model's descriptor engines (pytest-benchmark,
``make bench``): the transmit engine reading 64 guest descriptors into a switch
batch, and the receive engine writing 64 delivered frames into guest buffers and
their descriptors (e1000_vfio.md A.7-A.9). Each round includes one register write
(TDT or RDT) made from Python, as the guest's doorbell is; divide by 64 for a frame.
"""
from __future__ import annotations

import numpy as np
from scapy.all import IP, UDP, Ether, raw

from netvsp.e1000 import descriptors as DS
from netvsp.e1000 import regs as E
from netvsp.e1000.device import E1000
from netvsp.e1000.rx import (MAX_SEGMENTS, NRXSTATS, RX_BAD_DMA, RX_FILTERED, RX_FRAMES,
                             RX_NO_BUFFER, e1000_receive)
from netvsp.e1000.tx import NTXS, NXSTATS, TX_MAX, X_BAD_DMA, X_FRAMES, e1000_transmit
from switch.batch import PacketBatch, init_packet
from switch.parse import parse_batch

MAC = bytes.fromhex("020000e10001")
NDESC, BURST = 256, 64
RING, BUFS = 0x1000, 0x10000


def _frame(size=60):
    f = raw(Ether(src="02:00:00:00:00:09", dst="02:00:00:e1:00:01")
            / IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=1, dport=2))
    return f + bytes(size - len(f))


def test_e1000_transmit_64_descriptors(benchmark):
    """64 legacy descriptors of 60-byte frames (EOP, IFCS, RS) into a switch batch."""
    mem = np.zeros(1 << 21, np.uint8)
    dev = E1000(MAC)
    f = np.frombuffer(_frame(), np.uint8)
    for k in range(NDESC):
        addr = BUFS + k * 2048
        mem[addr:addr + len(f)] = f
        d = (addr.to_bytes(8, "little") + len(f).to_bytes(2, "little")
             + bytes([0, (DS.TXD_CMD_EOP | DS.TXD_CMD_IFCS | DS.TXD_CMD_RS) >> 24, 0, 0])
             + bytes(2))
        mem[RING + 16 * k:RING + 16 * k + 16] = np.frombuffer(d, np.uint8)
    for reg, v in ((E.TDBAL, RING), (E.TDBAH, 0), (E.TDLEN, NDESC * 16), (E.TDH, 0),
                   (E.TDT, 0)):
        dev.mmio_write(reg, v)
    txs, buf = np.zeros(NTXS, np.int64), np.zeros(TX_MAX, np.uint8)
    stats = np.zeros(NXSTATS, np.int64)
    b = PacketBatch(256, arena=1 << 20)

    def burst():
        dev.mmio_write(E.TDT, (dev[E.TDH] + BURST) % NDESC)
        return e1000_transmit(mem, dev.reg, txs, buf, b.meta, b.data, 0, 0, 5, stats)
    burst()                                   # compiled before the clock starts
    n, _, _, _ = benchmark(burst)
    assert n == BURST and stats[X_FRAMES] > BURST and stats[X_BAD_DMA] == 0


def test_e1000_receive_64_frames(benchmark):
    """64 delivered 60-byte frames through the filters into guest buffers and their
    descriptors."""
    mem = np.zeros(1 << 21, np.uint8)
    dev = E1000(MAC)
    for k in range(NDESC):
        mem[RING + 16 * k:RING + 16 * k + 8] = np.frombuffer(
            (BUFS + k * 2048).to_bytes(8, "little"), np.uint8)
    for reg, v in ((E.RDBAL, RING), (E.RDLEN, NDESC * 16), (E.RDH, 0), (E.RDT, 0),
                   (E.RCTL, E.RCTL_EN | E.RCTL_BAM)):
        dev.mmio_write(reg, v)
    b = PacketBatch(256, arena=1 << 18)
    f = _frame()
    for i in range(BURST):
        b.data[i * 64:i * 64 + len(f)] = np.frombuffer(f, np.uint8)
        init_packet(b.meta, i, i * 64, len(f), 1, 0)
    parse_batch(b.meta, b.data, 0, BURST)
    plan = np.zeros((2, BURST), np.int64)
    plan[0] = np.arange(BURST)
    scratch, seglens = np.zeros(1 << 17, np.uint8), np.zeros(MAX_SEGMENTS, np.int64)
    small, stats = np.zeros(64, np.uint8), np.zeros(NRXSTATS, np.int64)

    def burst():
        # The guest gives back the buffers just filled (RDT one behind RDH, A.8).
        dev.mmio_write(E.RDT, (dev[E.RDH] - 1) % NDESC)
        return e1000_receive(mem, dev.reg, b.meta, b.data, plan, 0, BURST, scratch,
                             seglens, small, stats)
    burst()                                   # compiled before the clock starts
    benchmark(burst)
    assert stats[RX_FRAMES] > BURST and stats[RX_FRAMES] % BURST == 0
    assert stats[RX_NO_BUFFER] == stats[RX_FILTERED] == stats[RX_BAD_DMA] == 0
