"""The 82540EM receive engine (e1000_vfio.md A.9, A.8, A.3): switch deliveries
through the filters into guest buffers, descriptors written back as Linux's
e1000 reads them, and the hostile cases of issue 5."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, raw

from netvsp.e1000 import descriptors as DS
from netvsp.e1000 import regs as E
from netvsp.e1000.rx import rx_buffer_size
from netvsp.e1000.device import E1000
from netvsp.e1000.rx import (MAX_SEGMENTS, NRXSTATS, RX_BAD_DMA, RX_FILTERED, RX_FRAMES,
                             RX_NO_BUFFER, RX_NOT_READY, RX_OVERSIZE, e1000_receive)
from switch.batch import (CSUM_OFF, CSUM_START, D_TAGGED, F_CSUM_PARTIAL, FLAGS, GSO_SIZE,
                          GSO_TCPV4, GSO_TYPE, PacketBatch, init_packet)
from switch.parse import parse_batch

RAM = 1 << 21
RING = 0x1000
BUFS = 0x20000
MAC = bytes.fromhex("020000e10001")
ME = "02:00:00:e1:00:01"


class Rig:
    def __init__(self, ndesc=32, bsize_bits=0, rctl_extra=0, give=None):
        self.mem = np.zeros(RAM, dtype=np.uint8)
        self.dev = d = E1000(MAC)
        self.ndesc = ndesc
        self.bsize = rx_buffer_size(bsize_bits)
        for k in range(ndesc):
            self.set_addr(k, BUFS + k * 16384)
        d.mmio_write(E.RDBAL, RING)
        d.mmio_write(E.RDLEN, ndesc * 16)
        d.mmio_write(E.RDH, 0)
        d.mmio_write(E.RDT, ndesc - 1 if give is None else give)     # one kept back (A.8)
        d.mmio_write(E.RCTL, E.RCTL_EN | E.RCTL_BAM | bsize_bits | rctl_extra)
        self.stats = np.zeros(NRXSTATS, dtype=np.int64)
        self.scratch = np.zeros(1 << 17, dtype=np.uint8)
        self.seglens = np.zeros(MAX_SEGMENTS, dtype=np.int64)
        self.small = np.zeros(64, dtype=np.uint8)

    def set_addr(self, k, addr):
        self.mem[RING + 16 * k:RING + 16 * k + 8] = np.frombuffer(addr.to_bytes(8, "little"),
                                                                  np.uint8)

    def deliver(self, *frames, d=0, **meta):
        b = PacketBatch(16, arena=1 << 18)
        at = 0
        for i, f in enumerate(frames):
            b.data[at:at + len(f)] = np.frombuffer(f, np.uint8)
            init_packet(b.meta, i, at, len(f), 1, 0)
            at += (len(f) + 63) & ~63
        for k, v in meta.items():
            b.meta[globals()[k], :len(frames)] = v
        parse_batch(b.meta, b.data, 0, len(frames))
        plan = np.zeros((2, len(frames)), dtype=np.int64)
        plan[0] = np.arange(len(frames))
        plan[1] = d
        return e1000_receive(self.mem, self.dev.reg, b.meta, b.data, plan, 0, len(frames),
                             self.scratch, self.seglens, self.small, self.stats)

    def desc(self, k):
        a = RING + 16 * k
        m = self.mem
        return {"len": int(m[a + 8]) | int(m[a + 9]) << 8, "status": int(m[a + 12]),
                "errors": int(m[a + 13]), "special": int(m[a + 14]) | int(m[a + 15]) << 8}

    def buffer(self, k, n):
        a = BUFS + k * 16384
        return bytes(self.mem[a:a + n])


def frame(dst=ME, size=200, **kw):
    f = raw(Ether(src="02:00:00:00:00:09", dst=dst) / IP(src="10.0.0.9", dst="10.0.0.1")
            / UDP(sport=1, dport=2, **kw))
    return f + bytes(max(0, size - len(f)))


def test_a_frame_to_our_mac_lands_in_the_next_buffer_as_linux_expects():
    r = Rig()
    f = frame()
    causes = r.deliver(f)
    d = r.desc(0)
    assert d["status"] == DS.RXD_STAT_DD | DS.RXD_STAT_EOP | DS.RXD_STAT_IXSM
    assert d["len"] == len(f) + 4 and d["errors"] == 0    # Linux subtracts the 4 FCS bytes
    assert r.buffer(0, len(f)) == f and r.dev[E.RDH] == 1
    assert causes == E.ICR_RXT0
    dv = r.dev
    assert dv.mmio_read(E.STATS["GPRC"]) == 1 and dv.mmio_read(E.STATS["TPR"]) == 1
    assert dv.mmio_read(E.STATS["GORCL"]) == len(f) + 4
    assert dv.mmio_read(E.STATS["PRC255"]) == 1


def test_secrc_reports_the_frame_length_only():
    r = Rig(rctl_extra=E.RCTL_SECRC)
    f = frame()
    r.deliver(f)
    assert r.desc(0)["len"] == len(f)


def test_receive_filters():
    r = Rig()
    other = "02:00:00:00:00:77"
    mcast = "01:00:5e:00:00:fb"
    r.deliver(frame(dst=other), frame(dst=mcast), frame(dst="ff:ff:ff:ff:ff:ff"))
    assert r.stats[RX_FILTERED] == 2 and r.stats[RX_FRAMES] == 1       # broadcast (BAM)
    assert r.dev.mmio_read(E.STATS["BPRC"]) == 1
    # the multicast hash (MO = 0: bits 47:36 of the address)
    v = ((0xFB << 8 | 0x00) >> 4) & 0xFFF
    r.dev.mmio_write(E.MTA + 4 * (v >> 5), 1 << (v & 31))
    r.deliver(frame(dst=mcast))
    assert r.stats[RX_FRAMES] == 2 and r.dev.mmio_read(E.STATS["MPRC"]) == 1
    # a second exact address, then promiscuous
    r.dev.mmio_write(E.RAL(3), 0x00000002)
    r.dev.mmio_write(E.RAH(3), 0x7700 | E.RAH_AV)
    r.deliver(frame(dst=other))
    assert r.stats[RX_FRAMES] == 3
    r.dev.mmio_write(E.RCTL, r.dev[E.RCTL] | E.RCTL_UPE)
    r.deliver(frame(dst="02:00:00:00:00:55"))
    assert r.stats[RX_FRAMES] == 4


def test_vlan_strip_and_filter():
    """The switch holds tags out of band and puts one on when the delivery says so
    (D_TAGGED); the device then sees it inline: VFTA filters it, VME strips it."""
    r = Rig()
    f = frame()
    tagged = 2 | D_TAGGED | ((2 << 13 | 42) << 48)
    r.dev.mmio_write(E.RCTL, r.dev[E.RCTL] | E.RCTL_VFE)
    r.deliver(f, d=tagged)
    assert r.stats[RX_FILTERED] == 1                          # VID 42 not in VFTA
    r.dev.mmio_write(E.VFTA + 4 * (42 >> 5), 1 << (42 & 31))
    r.deliver(f, d=tagged)                                    # kept inline without VME
    d = r.desc(0)
    assert not d["status"] & DS.RXD_STAT_VP and d["len"] == len(f) + 8
    assert r.buffer(0, 18)[12:16] == bytes([0x81, 0x00, 0x40, 42])
    r.dev.mmio_write(E.CTRL, r.dev[E.CTRL] | E.CTRL_VME)
    r.deliver(f, d=tagged)
    d = r.desc(1)
    assert d["status"] & DS.RXD_STAT_VP and d["special"] == (2 << 13) | 42
    assert d["len"] == len(f) + 4 and r.buffer(1, len(f)) == f


def test_a_tag_the_switch_delivers_goes_inline_then_meets_the_vlan_logic():
    r = Rig()
    r.dev.mmio_write(E.CTRL, r.dev[E.CTRL] | E.CTRL_VME)
    f = frame()
    r.deliver(f, d=2 | D_TAGGED | ((3 << 13 | 7) << 48))
    d = r.desc(0)
    assert d["status"] & DS.RXD_STAT_VP and d["special"] == (3 << 13) | 7
    assert r.buffer(0, len(f)) == f


def test_runts_are_padded_and_oversize_dropped():
    r = Rig()
    small = frame(size=20)[:42]
    r.deliver(small)
    assert r.desc(0)["len"] == 64 and r.buffer(0, 60) == small + bytes(18)
    r.deliver(frame(size=1600))
    assert r.stats[RX_OVERSIZE] == 1 and r.dev.mmio_read(E.STATS["ROC"]) == 1
    r.dev.mmio_write(E.RCTL, r.dev[E.RCTL] | E.RCTL_LPE | E.RCTL_BSEX | (1 << 16))
    r.deliver(frame(size=1600))
    assert r.stats[RX_FRAMES] == 2


def test_small_buffers_chain_descriptors_and_zero_addresses_are_skipped():
    r = Rig(bsize_bits=3 << 16)                                # 256-byte buffers
    r.set_addr(1, 0)                                           # skipped (A.9)
    f = frame(size=600)
    r.deliver(f)
    total = len(f) + 4
    used = [0, 2, 3]
    lens = [r.desc(k)["len"] for k in used]
    assert lens == [256, 256, total - 512]
    assert [r.desc(k)["status"] & DS.RXD_STAT_EOP for k in used] == [0, 0, DS.RXD_STAT_EOP]
    assert r.desc(1)["status"] == 0 and r.dev[E.RDH] == 4
    got = r.buffer(0, 256) + r.buffer(2, 256) + r.buffer(3, len(f) - 512)
    assert got == f


def test_no_free_descriptor_counts_and_raises_rxo_writing_nothing():
    r = Rig(ndesc=8, give=2)                                   # two buffers given
    causes = [r.deliver(frame()) for _ in range(3)]
    assert causes[0] & E.ICR_RXT0 and causes[2] == E.ICR_RXO
    assert r.stats[RX_NO_BUFFER] == 1 and r.dev.mmio_read(E.STATS["RNBC"]) == 1
    assert r.dev.mmio_read(E.STATS["MPC"]) == 1 and r.desc(2)["status"] == 0
    assert causes[1] & E.ICR_RXDMT0                            # the ring ran low


def test_super_packets_are_segmented_and_partial_checksums_finished():
    r = Rig()
    payload = bytes((k * 3) & 0xFF for k in range(6000))
    big = raw(Ether(src="02:00:00:00:00:09", dst=ME) / IP(src="10.0.0.9", dst="10.0.0.1")
              / TCP(sport=5, dport=6, flags="PA") / payload)
    r.deliver(big, FLAGS=F_CSUM_PARTIAL, CSUM_START=34, CSUM_OFF=16, GSO_TYPE=GSO_TCPV4,
              GSO_SIZE=1448)
    n = -(-6000 // 1448)
    assert r.stats[RX_FRAMES] == n
    got = b""
    for k in range(n):
        ln = r.desc(k)["len"] - 4
        seg = Ether(r.buffer(k, ln))
        chk = seg[TCP].chksum
        del seg[TCP].chksum
        assert Ether(raw(seg))[TCP].chksum == chk
        got += bytes(seg[TCP].payload)
    assert got == payload


def test_nothing_is_received_without_link_or_rctl_en():
    r = Rig()
    r.dev.set_link(False)
    r.deliver(frame())
    r.dev.set_link(True)
    r.dev.mmio_write(E.RCTL, 0)
    r.deliver(frame())
    assert r.stats[RX_NOT_READY] == 2 and r.desc(0)["status"] == 0


# ---------------------------------------------------------------- hostile guest
@pytest.mark.parametrize("reg,value", [(E.RDLEN, 0), (E.RDH, 40), (E.RDT, 33),
                                       (E.RDBAL, RAM - 64), (E.RDBAH, 1)])
def test_bad_ring_registers_write_nothing(reg, value):
    r = Rig()
    r.dev.mmio_write(reg, value)
    before = r.mem.copy()
    assert r.deliver(frame()) == 0
    assert r.stats[RX_BAD_DMA] == 1 and (r.mem == before).all()


@pytest.mark.parametrize("addr", [RAM - 100, RAM, 1 << 40, (1 << 63) + 5])
def test_buffer_outside_guest_ram_writes_nothing(addr):
    r = Rig()
    r.set_addr(0, addr)
    before = r.mem.copy()
    r.deliver(frame())
    assert r.stats[RX_BAD_DMA] == 1 and (r.mem == before).all() and r.dev[E.RDH] == 0
