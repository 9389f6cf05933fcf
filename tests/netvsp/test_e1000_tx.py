"""The 82540EM transmit engine (e1000_vfio.md A.7, A.8, A.10): descriptors as Linux's
e1000 fills them become switch batch frames with their offloads; the hostile
cases of issue 5 stop the ring or drop the frame, never reach outside guest RAM."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, raw

from netvsp.e1000 import descriptors as DS
from netvsp.e1000 import regs as E
from netvsp.e1000.device import E1000
from netvsp.e1000.tx import (NTXS, NXSTATS, TX_BATCH_FULL, TX_DONE, TX_MAX, TX_STOPPED,
                             X_BAD_DMA, X_FRAMES, X_RING_ERROR, X_TOO_BIG, e1000_transmit)
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_VLAN, FLAGS, GSO_SIZE,
                          GSO_TCPV4, GSO_TCPV6, GSO_TYPE, LEN, OFF, SRC_PORT, TCI, PacketBatch)
from switch.gso import finish_checksum, segment
from switch.parse import parse_batch

RAM = 1 << 20
RING = 0x1000            # 64 descriptors
BUFS = 0x10000
MAC = bytes.fromhex("020000e10001")


class Rig:
    def __init__(self, ndesc=64):
        self.mem = np.zeros(RAM, dtype=np.uint8)
        self.dev = E1000(MAC)
        d = self.dev
        d.mmio_write(E.TDBAL, RING)
        d.mmio_write(E.TDBAH, 0)
        d.mmio_write(E.TDLEN, ndesc * 16)
        d.mmio_write(E.TDH, 0)
        d.mmio_write(E.TDT, 0)
        self.ndesc = ndesc
        self.tail = 0
        self.at = BUFS
        self.txs = np.zeros(NTXS, dtype=np.int64)
        self.buf = np.zeros(TX_MAX, dtype=np.uint8)
        self.stats = np.zeros(NXSTATS, dtype=np.int64)

    def put(self, raw16: bytes):
        a = RING + self.tail * 16
        self.mem[a:a + 16] = np.frombuffer(raw16, np.uint8)
        self.tail = (self.tail + 1) % self.ndesc
        return a

    def data(self, payload: bytes, lower_cmd: int, popts=0, special=0, addr=None):
        if addr is None:
            addr = self.at
            self.mem[addr:addr + len(payload)] = np.frombuffer(payload, np.uint8)
            self.at += (len(payload) + 63) & ~63
        return self.put(addr.to_bytes(8, "little")
                        + (len(payload) | DS.TXD_DTYP_D | DS.TXD_CMD_DEXT | lower_cmd
                           ).to_bytes(4, "little") + bytes([0, popts])
                        + special.to_bytes(2, "little"))

    def legacy(self, payload: bytes, cmd: int, cso=0, css=0, special=0, addr=None):
        if addr is None:
            addr = self.at
            self.mem[addr:addr + len(payload)] = np.frombuffer(payload, np.uint8)
            self.at += (len(payload) + 63) & ~63
        return self.put(addr.to_bytes(8, "little") + len(payload).to_bytes(2, "little")
                        + bytes([cso, cmd >> 24, 0, css]) + special.to_bytes(2, "little"))

    def context(self, ipcss, ipcso, ipcse, tucss, tucso, tucse, tucmd, paylen=0,
                hdr_len=0, mss=0):
        return self.put(bytes([ipcss, ipcso]) + ipcse.to_bytes(2, "little")
                        + bytes([tucss, tucso]) + tucse.to_bytes(2, "little")
                        + (paylen | DS.TXD_CMD_DEXT | tucmd).to_bytes(4, "little")
                        + bytes([0, hdr_len]) + mss.to_bytes(2, "little"))

    def run(self, batch=None, cap=16):
        self.dev.mmio_write(E.TDT, self.tail)
        b = batch or PacketBatch(cap, arena=max(1 << 20, 2 * TX_MAX))
        n, cursor, causes, why = e1000_transmit(self.mem, self.dev.reg, self.txs, self.buf,
                                                b.meta, b.data, 0, 0, 5, self.stats)
        return b, n, causes, why

    def frame(self, b, i):
        return bytes(b.data[b.meta[OFF, i]:b.meta[OFF, i] + b.meta[LEN, i]])


def tcp_frame(payload=b"x" * 100, v6=False):
    l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    return raw(Ether(src="02:00:00:e1:00:01", dst="02:00:00:e1:00:02") / l3
               / TCP(sport=1000, dport=2000, flags="PA", seq=7) / payload)


def test_legacy_descriptor_frame_write_back_and_statistics():
    r = Rig()
    f = tcp_frame()
    a = r.legacy(f, DS.TXD_CMD_EOP | DS.TXD_CMD_IFCS | DS.TXD_CMD_RS)
    b, n, causes, why = r.run()
    assert (n, why) == (1, TX_DONE) and r.frame(b, 0) == f and b.meta[SRC_PORT, 0] == 5
    assert r.mem[a + 12] & DS.TXD_STAT_DD
    assert causes == E.ICR_TXDW | E.ICR_TXQE and r.dev[E.TDH] == 1
    assert r.dev.mmio_read(E.STATS["GPTC"]) == 1 and r.dev.mmio_read(E.STATS["TPT"]) == 1
    assert r.dev.mmio_read(E.STATS["GOTCL"]) == len(f) + 4
    assert not b.meta[FLAGS, 0] & F_CSUM_PARTIAL


def test_linux_checksum_offload_context_then_data_descriptors():
    """e1000_tx_csum: a context descriptor (TUCSS 34, TUCSO 50), then data
    descriptors with POPTS.TXSM; the frame split over two buffers."""
    r = Rig()
    f = bytearray(tcp_frame(b"y" * 500))
    want = bytes(f)
    f[50:52] = b"\x12\x34"                         # whatever the stack left there
    r.context(14, 24, 33, 34, 50, 0, DS.TXD_CMD_TCP | DS.TXD_CMD_IP)
    r.data(bytes(f[:100]), DS.TXD_CMD_IFCS, popts=DS.TXD_POPTS_TXSM)
    r.data(bytes(f[100:]), DS.TXD_CMD_EOP | DS.TXD_CMD_IFCS | DS.TXD_CMD_RS,
           popts=DS.TXD_POPTS_TXSM)
    b, n, causes, _ = r.run()
    assert n == 1 and b.meta[FLAGS, 0] & F_CSUM_PARTIAL
    assert (b.meta[CSUM_START, 0], b.meta[CSUM_OFF, 0]) == (34, 16)
    # the partial convention: the field holds the pseudo-header sum; finishing it
    # over the frame gives the checksum scapy computes
    g = bytearray(r.frame(b, 0))
    ph = sum(int.from_bytes(g[k:k + 2], "big") for k in range(26, 34, 2)) + 6 + len(g) - 34
    while ph > 0xFFFF:
        ph = (ph & 0xFFFF) + (ph >> 16)
    b.data[b.meta[OFF, 0] + 50:b.meta[OFF, 0] + 52] = np.frombuffer(ph.to_bytes(2, "big"),
                                                                    np.uint8)
    assert finish_checksum(b.meta, b.data, 0)
    assert r.frame(b, 0) == want


@pytest.mark.parametrize("v6", [False, True])
def test_tso_frame_stays_one_super_packet_and_segments_right(v6):
    """e1000_tso: IP total length and header checksum zeroed, TCP checksum the
    pseudo-header sum without length, a context descriptor with TSE, MSS and the
    header length; the engine hands the switch a GSO super-packet in Linux's
    convention, which segment() cuts into valid frames."""
    r = Rig()
    payload = bytes((k * 7) & 0xFF for k in range(20000))
    f = bytearray(tcp_frame(payload, v6=v6))
    l3 = 14
    l4 = 54 if v6 else 34
    if v6:
        f[l3 + 4:l3 + 6] = b"\x00\x00"
        ph = sum(int.from_bytes(f[k:k + 2], "big") for k in range(22, 54, 2)) + 6
    else:
        f[l3 + 2:l3 + 4] = b"\x00\x00"
        f[l3 + 10:l3 + 12] = b"\x00\x00"
        ph = sum(int.from_bytes(f[k:k + 2], "big") for k in range(26, 34, 2)) + 6
    while ph > 0xFFFF:
        ph = (ph & 0xFFFF) + (ph >> 16)
    f[l4 + 16:l4 + 18] = ph.to_bytes(2, "big")
    tucmd = DS.TXD_CMD_TCP | (0 if v6 else DS.TXD_CMD_IP) | DS.TXD_CMD_TSE
    r.context(l3, 0 if v6 else l3 + 10, 0 if v6 else l4 - 1, l4, l4 + 16, 0, tucmd,
              paylen=len(payload), hdr_len=l4 + 20, mss=1448)
    cmd = DS.TXD_CMD_IFCS | DS.TXD_CMD_TSE
    popts = DS.TXD_POPTS_TXSM | (0 if v6 else DS.TXD_POPTS_IXSM)
    r.data(bytes(f[:l4 + 20]), cmd, popts=popts)
    r.data(bytes(f[l4 + 20:l4 + 10020]), cmd, popts=popts)
    r.data(bytes(f[l4 + 10020:]), cmd | DS.TXD_CMD_EOP | DS.TXD_CMD_RS, popts=popts)
    b, n, _, _ = r.run()
    assert n == 1 and b.meta[LEN, 0] == len(f)
    assert b.meta[GSO_TYPE, 0] == (GSO_TCPV6 if v6 else GSO_TCPV4)
    assert b.meta[GSO_SIZE, 0] == 1448 and b.meta[FLAGS, 0] & F_CSUM_PARTIAL
    parse_batch(b.meta, b.data, 0, 1)
    out = np.zeros(1 << 17, dtype=np.uint8)
    lens = np.zeros(64, dtype=np.int64)
    k = segment(b.meta, b.data, 0, 0, out, lens, 64)
    assert k == -(-len(payload) // 1448)
    got, at = b"", 0
    for j in range(k):
        seg = Ether(bytes(out[at:at + lens[j]]))
        at += lens[j]
        chk = seg[TCP].chksum
        del seg[TCP].chksum
        if not v6:
            ipc = seg[IP].chksum
            del seg[IP].chksum
            assert Ether(raw(seg))[IP].chksum == ipc
        assert Ether(raw(seg))[TCP].chksum == chk
        got += bytes(seg[TCP].payload)
    assert got == payload


def test_vlan_insertion_goes_out_of_band_when_ctrl_vme():
    r = Rig()
    r.dev.mmio_write(E.CTRL, r.dev.mmio_read(E.CTRL) | E.CTRL_VME)
    r.legacy(tcp_frame(), DS.TXD_CMD_EOP | DS.TXD_CMD_VLE, special=(3 << 13) | 42)
    b, n, _, _ = r.run()
    assert n == 1 and b.meta[FLAGS, 0] & F_VLAN and b.meta[TCI, 0] == (3 << 13) | 42
    r2 = Rig()                                   # without VME the tag is not inserted
    r2.legacy(tcp_frame(), DS.TXD_CMD_EOP | DS.TXD_CMD_VLE, special=42)
    b, n, _, _ = r2.run()
    assert n == 1 and not b.meta[FLAGS, 0] & F_VLAN


def test_ixsm_without_tso_computes_the_ip_header_checksum():
    r = Rig()
    f = bytearray(raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"z" * 40)))
    want = bytes(f)
    f[24:26] = b"\x00\x00"
    r.context(14, 24, 33, 34, 40, 0, DS.TXD_CMD_IP)
    r.data(bytes(f), DS.TXD_CMD_EOP, popts=DS.TXD_POPTS_IXSM)
    b, n, _, _ = r.run()
    assert n == 1 and r.frame(b, 0) == want and not b.meta[FLAGS, 0] & F_CSUM_PARTIAL


def test_a_packet_split_across_doorbells_is_kept_until_its_eop():
    r = Rig()
    f = tcp_frame(b"q" * 900)
    r.legacy(f[:300], 0)
    b, n, causes, _ = r.run()
    assert n == 0 and r.dev[E.TDH] == 1 and causes == E.ICR_TXQE
    r.legacy(f[300:], DS.TXD_CMD_EOP | DS.TXD_CMD_RS)
    b, n, _, _ = r.run()
    assert n == 1 and r.frame(b, 0) == f


def test_a_full_batch_stops_and_the_rest_goes_next_time():
    r = Rig()
    frames = [tcp_frame(bytes([k]) * 60) for k in range(5)]
    for f in frames:
        r.legacy(f, DS.TXD_CMD_EOP)
    b, n, _, why = r.run(cap=3)
    assert (n, why) == (3, TX_BATCH_FULL) and r.dev[E.TDH] == 3
    b2, n2, _, why2 = r.run(cap=3)
    assert (n2, why2) == (2, TX_DONE)
    assert [r.frame(b, i) for i in range(3)] + [r.frame(b2, i) for i in range(2)] == frames


# ---------------------------------------------------------------- hostile guest
@pytest.mark.parametrize("reg,value", [(E.TDLEN, 0), (E.TDH, 200), (E.TDT, 64 + 5),
                                       (E.TDBAL, RAM - 512), (E.TDBAH, 0xFFFFFFFF)])
def test_bad_ring_registers_stop_the_ring(reg, value):
    r = Rig()
    r.legacy(tcp_frame(), DS.TXD_CMD_EOP | DS.TXD_CMD_RS)
    r.dev.mmio_write(E.TDT, r.tail)
    r.dev.mmio_write(reg, value)
    before = r.mem.copy()
    b = PacketBatch(4)
    n, _, causes, why = e1000_transmit(r.mem, r.dev.reg, r.txs, r.buf, b.meta, b.data, 0, 0,
                                       5, r.stats)
    assert (n, why) == (0, TX_STOPPED) and r.stats[X_RING_ERROR] == 1
    assert (r.mem == before).all()                     # nothing written back


@pytest.mark.parametrize("addr", [RAM - 10, 1 << 40, (1 << 64) - 16, RAM])
def test_buffer_outside_guest_ram_drops_that_frame_only(addr):
    r = Rig()
    good = tcp_frame(b"g" * 50)
    a = r.legacy(b"x" * 60, DS.TXD_CMD_EOP | DS.TXD_CMD_RS, addr=addr)
    r.legacy(good, DS.TXD_CMD_EOP | DS.TXD_CMD_RS)
    b, n, _, why = r.run()
    assert (n, why) == (1, TX_DONE) and r.frame(b, 0) == good
    assert r.stats[X_BAD_DMA] == 1 and r.mem[a + 12] & DS.TXD_STAT_DD
    assert r.dev[E.TDH] == 2


def test_oversized_frame_and_runt_are_dropped():
    r = Rig(ndesc=128)
    chunk = b"\x00" * 16384
    for _ in range(5):                       # 80 KiB without EOP, then EOP
        r.legacy(chunk, 0)
    r.legacy(b"\x00" * 100, DS.TXD_CMD_EOP)
    r.legacy(b"\x01" * 10, DS.TXD_CMD_EOP)   # a runt
    ok = tcp_frame()
    r.legacy(ok, DS.TXD_CMD_EOP)
    b, n, _, _ = r.run()
    assert n == 1 and r.frame(b, 0) == ok and r.stats[X_TOO_BIG] == 1
    assert r.stats[X_FRAMES] == 1


def test_garbage_context_descriptors_never_reach_outside_the_frame():
    rng = np.random.default_rng(5)
    for _ in range(200):
        r = Rig()
        g = rng.integers(0, 256, 16, dtype=np.uint8)
        g[8:12] = np.frombuffer((int(rng.integers(0, 1 << 20)) | DS.TXD_CMD_DEXT
                                 | (int(rng.integers(0, 256)) << 24 & 0xDF000000)
                                 ).to_bytes(4, "little"), np.uint8)
        r.put(bytes(g))
        f = tcp_frame(b"w" * int(rng.integers(0, 2000)))
        r.data(f, DS.TXD_CMD_EOP | int(rng.integers(0, 2)) * DS.TXD_CMD_TSE,
               popts=int(rng.integers(0, 4)))
        b, n, _, _ = r.run()
        if n:
            assert b.meta[LEN, 0] == len(f)
            if b.meta[FLAGS, 0] & F_CSUM_PARTIAL:
                assert b.meta[CSUM_START, 0] + b.meta[CSUM_OFF, 0] + 2 <= len(f)


def test_descriptors_asking_for_an_interrupt_delay_are_counted():
    from netvsp.e1000.tx import X_IDE
    r = Rig()
    r.legacy(tcp_frame(), DS.TXD_CMD_EOP | DS.TXD_CMD_RS | DS.TXD_CMD_IDE)
    r.run()
    assert r.stats[X_IDE] == 1
