"""The VF's transmit offloads (context descriptors, TXSM/IXSM, TSE) and super-packets on
receive: a frame as Linux hands it to a tap, posted by the guest driver's ``_post`` as
ixgbe does, must leave ``vf_transmit`` whole in Linux's GSO convention; checksums are
judged by scapy after finishing/segmenting. Hostile descriptors: dropped, counted, no
stray write."""
from __future__ import annotations

import os
import random
import socket
import struct

import numpy as np
import pytest
from numba import njit
from pyroute2 import NetNS, netns
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, raw

from sriov import ixgbevf_rings as R
from sriov import vf_driver as V
from switch.batch import (CSUM_OFF, CSUM_START, D_TAG_SHIFT, D_TAGGED, F_CSUM_PARTIAL,
                          F_CSUM_VALID, F_VLAN, FLAGS, GSO_SIZE, GSO_TCPV4, GSO_TCPV6, GSO_TYPE,
                          TCI, PacketBatch)
from switch.gso import segment
from switch.parse import parse_batch
from switch.tap import open_tap

G = 4096                     # guard bytes on each side of guest memory and batch arenas
IOVA = 0                     # vf_driver posts guest-physical addresses: RAM mapped at 0
RAM = 1 << 20
TXRING, RXRING, BUFS, ARENA, RXBUFS = 0x1000, 0x2000, 0x4000, 0x20000, 0x80000
MAC = dict(src="02:00:00:00:a0:01", dst="02:00:00:00:00:f0")
V4 = dict(src="10.0.0.1", dst="10.0.0.2")
V6 = dict(src="fd00::1", dst="fd00::2")


@njit
def post(mem, ring, nd, use, at, ln, stats):
    return V._post(mem, ring, nd, use, at, ln, stats)


def osum(b, s=0):
    """Ones'-complement sum of ``b`` (zero-padded) and ``s``, folded to 16 bits."""
    b = bytes(b) + b"\0" * (len(b) & 1)
    s += sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(f, cs):
    """Linux's CHECKSUM_PARTIAL field: pseudo-header sum with the L4 length, uncomplemented."""
    n, l3 = len(f) - cs, 18 if f[12:14] == b"\x81\x00" else 14
    if f[l3 - 2:l3] == b"\x08\x00":
        return osum(f[l3 + 12:l3 + 20], f[l3 + 9] + n)
    return osum(f[l3 + 8:l3 + 40], f[l3 + 6] + n)            # n folds as its two halves


def partial(p, co):
    """``p`` as the stack hands it to a tap with NEEDS_CSUM: (bytes, csum_start)."""
    f = bytearray(raw(p))
    cs = len(f) - len(p[TCP] if TCP in p else p[UDP])
    f[cs + co:cs + co + 2] = pseudo(f, cs).to_bytes(2, "big")
    return bytes(f), cs


def finish(f, cs, co):
    """skb_checksum_help: the sum from csum_start complemented into the field."""
    f = bytearray(f)
    c = ~osum(f[cs:]) & 0xFFFF
    f[cs + co:cs + co + 2] = (c or 0xFFFF).to_bytes(2, "big")
    return bytes(f)


def scapy_ok(frame):
    """The IP and L4 checksums in the bytes are those scapy computes."""
    p, q = Ether(frame), Ether(frame)
    layers = [x for x in (IP, TCP, UDP) if x in p]
    for x in layers:
        del q[x].chksum
    return bool(layers) and [p[x].chksum for x in layers] == [Ether(raw(q))[x].chksum
                                                              for x in layers]


def vnet(flags=0, gso=0, hdr_len=0, gso_size=0, cs=0, co=0):
    return struct.pack("<BBHHHH", flags, gso, hdr_len, gso_size, cs, co)


def tcp_super(v6, payload):
    ip = IPv6(**V6) if v6 else IP(id=0x1234, **V4)
    return Ether(**MAC) / ip / TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=1, flags="PA",
                                   options=[("NOP", None), ("NOP", None),
                                            ("Timestamp", (7, 9))]) / payload


def guarded(n, fill):
    g = np.full(n + 2 * G, fill, np.uint8)
    g[G:G + n] = 0
    return g, g[G:G + n]


class Vf:
    """Queue pair 0 on rings in a guarded guest memory."""

    def __init__(self, nd=32, bsize_kb=16):
        self.guard, self.mem = guarded(RAM, 0xA5)
        self.regs = np.zeros(R.QREGS_SIZE // 4, np.uint32)
        self.icr, self.txs = np.zeros(1, np.int64), np.zeros(R.NTXS, np.int64)
        self.stats, self.vstats = np.zeros(R.NSTATS, np.int64), np.zeros(V.NV, np.int64)
        self.nd, self.tail, self.arenas, self.bsize = nd, 0, [], bsize_kb * 1024
        for base, ring in ((R.TX_BASE, TXRING), (R.RX_BASE, RXRING)):
            self.reg(base + R.R_BAL, IOVA + ring)
            self.reg(base + R.R_LEN, nd * 16)
            self.reg(base + R.R_DCTL, R.DCTL_ENABLE)
        self.reg(R.RX_BASE + R.R_SRRCTL, bsize_kb | R.SRRCTL_DROP_EN)

    def reg(self, off, v=None):
        if v is not None:
            self.regs[off // 4] = v
        return int(self.regs[off // 4])

    def put(self, at, b):
        self.mem[at:at + len(b)] = np.frombuffer(bytes(b), np.uint8)

    def post(self, frame, hdr):
        """As tap_tx does: virtio header right before the frame, then _post."""
        at = ARENA + V.HEADROOM
        self.put(at - V.VNET, hdr + frame)
        self.tail, eop = post(self.mem, TXRING, self.nd, self.tail, at, len(frame), self.vstats)
        return eop

    def _desc(self, q0, q1):
        self.put(TXRING + 16 * self.tail, struct.pack("<QQ", q0, q1))
        self.tail = (self.tail + 1) % self.nd

    def ctx(self, maclen, iplen, tucmd, l4len=0, mss=0):
        self._desc(iplen | maclen << R.TXD_MACLEN_SHIFT,      # then type_tucmd, mss_l4len
                   tucmd | R.TXD_DTYP_CTXT << R.TXD_DTYP_SHIFT | R.TXD_CMD_DEXT
                   | (l4len << R.TXD_L4LEN_SHIFT | mss << R.TXD_MSS_SHIFT) << 32)

    def data(self, frame, olinfo, tse=False, at=BUFS, per=16384):
        self.put(at, frame)
        for k in range(0, len(frame), per):
            ln = min(per, len(frame) - k)
            last = R.TXD_CMD_EOP | R.TXD_CMD_RS if k + ln >= len(frame) else 0
            ctl = ln | R.TXD_DTYP_DATA << R.TXD_DTYP_SHIFT | R.TXD_CMD_DEXT | last | \
                (R.TXD_CMD_TSE if tse else 0)
            self._desc(IOVA + at + k, ctl | (len(frame) << R.TXD_PAYLEN_SHIFT | olinfo) << 32)

    def transmit(self, arena=1 << 18):
        self.reg(R.TX_BASE + R.R_TAIL, self.tail)
        b = PacketBatch(8, 64)
        g, b.data = guarded(arena, 0x5A)
        self.arenas.append(g)
        b.n, b.cursor, _ = R.vf_transmit(self.mem, IOVA, RAM, self.regs, self.icr, self.txs,
                                         b.meta, b.data, 0, 0, 3, self.stats)
        return b

    def give_rx(self, count):
        for k in range(self.nd):
            self.put(RXRING + 16 * k, struct.pack("<QQ", IOVA + RXBUFS + k * self.bsize, 0))
        self.reg(R.RX_BASE + R.R_TAIL, count)

    def receive(self, frames, flags):
        b = PacketBatch(8, 1 << 18)
        b.append_frames(frames, src_port=1)
        b.meta[FLAGS, :b.n] |= flags
        plan = np.vstack([np.arange(b.n)] * 2)
        return R.vf_receive(self.mem, IOVA, RAM, self.regs, self.icr, b.meta, b.data, plan, 0,
                            b.n, self.stats)

    def rx_desc(self, k):
        return struct.unpack_from("<IH", self.mem, RXRING + 16 * k + 8)

    def intact(self):
        return all((g[:G] == g[0]).all() and (g[-G:] == g[0]).all()
                   for g in [self.guard, *self.arenas])


def meta(b, i=0):
    return {k: int(b.meta[r, i]) for k, r in (("gso", GSO_TYPE), ("mss", GSO_SIZE),
                                              ("cs", CSUM_START), ("co", CSUM_OFF))}


def segments(b, i=0):
    """switch.gso.segment's frames for packet ``i`` (as a port without offloads sends)."""
    parse_batch(b.meta, b.data, 0, b.n)                     # an 802.1Q tag goes out of band ...
    d = D_TAGGED | int(b.meta[TCI, i]) << D_TAG_SHIFT if b.meta[FLAGS, i] & F_VLAN else 0
    out, lens = np.zeros(1 << 18, np.uint8), np.zeros(128, np.int64)
    n = segment(b.meta, b.data, i, d, out, lens, 128)       # ... and back in on delivery
    pos = np.concatenate([[0], np.cumsum(lens[:n])])
    return [bytes(out[pos[k]:pos[k + 1]]) for k in range(n)]


def check_super(b, p, payload, v6, mss=1448, i=0):
    """Packet ``i`` of ``b`` is ``p`` as a GSO super-packet in Linux's convention, and
    segments into frames scapy finds correct that carry ``payload`` in order."""
    f, cs = partial(p, 16)
    assert meta(b, i) == dict(gso=GSO_TCPV6 if v6 else GSO_TCPV4, mss=mss, cs=cs, co=16)
    assert b.meta[FLAGS, i] & F_CSUM_PARTIAL
    out = b.frame(i)
    # IP lengths and checksum as the stack wrote them, the TCP field in GSO convention
    assert out[:cs + 16] == f[:cs + 16] and out[cs + 18:] == f[cs + 18:]
    assert finish(out, cs, 16) == raw(p), "the TCP field is not the pseudo-header sum"
    segs = segments(b, i)
    assert len(segs) == -(-len(payload) // mss)
    got, seq = b"", 0xFFFFF000
    for s in segs:
        assert scapy_ok(s), Ether(s).summary()
        t = Ether(s)[TCP]
        assert t.seq == seq and len(t.payload) <= mss
        got += bytes(t.payload)
        seq = (seq + len(t.payload)) & 0xFFFFFFFF
    assert got == payload


@pytest.mark.parametrize("v6", [False, True], ids=["tcp4", "tcp6"])
@pytest.mark.parametrize("zeroed", [False, True], ids=["as-linux", "ip-lengths-zeroed"])
def test_a_tso_super_packet_leaves_whole_in_linux_gso_convention(v6, zeroed):
    payload = random.Random(1).randbytes(20000)
    p = tcp_super(v6, payload)
    f, cs = partial(p, 16)
    if zeroed:      # ixgbe_tso clears length (and checksum): the device writes them
        f = bytearray(f)
        for a in ((18,) if v6 else (16, 24)):
            f[a:a + 2] = b"\0\0"
    vf = Vf()
    eop = vf.post(bytes(f), vnet(1, GSO_TCPV6 if v6 else GSO_TCPV4, cs + 32, 1448, cs, 16))
    assert eop == 2 and vf.vstats[V.V_TX_TSO] == 1      # a context and two data descriptors
    b = vf.transmit()
    assert b.n == 1 and vf.stats[R.S_TX_TSO] == 1 and vf.stats[R.S_TX_BAD_OFFLOAD] == 0
    check_super(b, p, payload, v6)
    assert vf.mem[TXRING + 16 * eop + 12] & R.TXD_STAT_DD and vf.intact()


@pytest.mark.parametrize("kind", ["udp4", "tcp4", "udp6", "tcp6", "tcp4-vlan", "udp6-vlan"])
def test_txsm_alone_leaves_a_partial_checksum_that_finishes_right(kind):
    l2 = Ether(**MAC) / Dot1Q(vlan=5) if "vlan" in kind else Ether(**MAC)   # MACLEN 18
    l4 = UDP(sport=5000, dport=9) if "udp" in kind else TCP(sport=5000, dport=9, flags="A")
    p = l2 / (IP(**V4) if "4" in kind else IPv6(**V6)) / l4 / (bytes(range(250)) * 4)
    co = 6 if UDP in p else 16
    f, cs = partial(p, co)
    vf = Vf()
    vf.post(f, vnet(1, 0, 0, 0, cs, co))
    b = vf.transmit()
    assert b.n == 1 and b.frames() == [f]                   # nothing else touched
    assert meta(b) == dict(gso=0, mss=0, cs=cs, co=co) and b.meta[FLAGS, 0] & F_CSUM_PARTIAL
    assert finish(f, cs, co) == raw(p) and scapy_ok(finish(f, cs, co))
    assert segments(b) == [raw(p)]                         # as a port without offloads sends


def tcp(n, v6=False):
    return raw(Ether(**MAC) / (IPv6(**V6) if v6 else IP(**V4)) / TCP() / bytes(n))


CC_CS = R.TXD_CC | R.TXD_POPTS_TXSM | R.TXD_POPTS_IXSM
TCP4 = R.TXD_TUCMD_IPV4 | R.TXD_TUCMD_L4T_TCP
BAD_OFF, BAD_DMA = R.S_TX_BAD_OFFLOAD, R.S_TX_BAD_DMA
HOSTILE = {   # name: (context or None, frame, TSE, the counter it must land in, arena)
    "offloads-without-context": (None, tcp(3000), True, BAD_OFF, 0),
    "maclen-past-frame": ((127, 20, TCP4), tcp(60), False, BAD_OFF, 0),
    "iplen-past-frame": ((14, 511, TCP4), tcp(60), False, BAD_OFF, 0),
    "tse-udp": ((14, 20, R.TXD_TUCMD_IPV4, 8, 1448), raw(Ether() / IP() / UDP() / bytes(3000)),
                True, BAD_OFF, 0),
    "tse-mss-0": ((14, 20, TCP4, 20, 0), tcp(3000), True, BAD_OFF, 0),
    "tse-l4len-past-frame": ((14, 20, TCP4, 255, 1448), tcp(100), True, BAD_OFF, 0),
    "txsm-sctp": ((14, 20, R.TXD_TUCMD_IPV4 | 0x1000), tcp(100), False, BAD_OFF, 0),
    "ipv4-context-on-ipv6": ((14, 40, TCP4), tcp(100, True), False, BAD_OFF, 0),
    "tse-over-64k+64": ((14, 20, TCP4, 20, 1448), tcp(100).ljust(R.MAX_TSO_FRAME + 1, b"x"),
                        True, BAD_DMA, 0),
    "arena-too-small": ((14, 20, TCP4, 20, 1448), tcp(40000), True, BAD_DMA, 32768),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_offload_descriptors_drop_their_frame_and_the_ring_goes_on(name):
    ctx, frame, tse, counter, arena = HOSTILE[name]
    vf = Vf(nd=64)
    if ctx:
        vf.ctx(*ctx)
    vf.data(frame, CC_CS, tse)
    bad_eop = (vf.tail - 1) % vf.nd
    good = Ether(**MAC) / IP(**V4) / UDP(sport=7, dport=9) / b"after"
    f, cs = partial(good, 6)
    vf.post(f, vnet(1, 0, 0, 0, cs, 6))
    b = vf.transmit(arena or 1 << 18)
    assert vf.stats[counter] == 1 and vf.stats[BAD_OFF + BAD_DMA - counter] == 0
    assert vf.stats[R.S_TX_FRAMES] == 1 and b.frames() == [f]
    assert meta(b) == dict(gso=0, mss=0, cs=34, co=6) and b.meta[FLAGS, 0] & F_CSUM_PARTIAL
    assert vf.mem[TXRING + 16 * bad_eop + 12] & R.TXD_STAT_DD           # given back
    assert vf.reg(R.TX_BASE + R.R_HEAD) == vf.tail and vf.intact()


@pytest.mark.parametrize("v6", [False, True], ids=["tcp4", "tcp6"])
def test_a_tse_frame_whose_ip_length_does_not_fit_16_bits_is_dropped(v6):
    """MAX_TSO_FRAME lets a TSE frame reach 65600 bytes; the hardware gives each segment
    its own length, but the super-packet's IPv4 total / IPv6 payload length cannot say
    65586: it must not leave with a wrapped one (50: a Linux receiver cuts the packet to it)."""
    vf = Vf(nd=64)
    vf.ctx(14, 40 if v6 else 20, R.TXD_TUCMD_L4T_TCP | (0 if v6 else R.TXD_TUCMD_IPV4), 20, 1448)
    vf.data(tcp(100, v6).ljust(R.MAX_TSO_FRAME, b"x"), CC_CS, True)
    b = vf.transmit()
    assert b.n == 0 and vf.stats[BAD_OFF] + vf.stats[BAD_DMA] == 1, \
        f"sent with IP length {int.from_bytes(b.frame(0)[18 if v6 else 16:][:2], 'big')}"


@pytest.mark.parametrize("flags,good", [(F_CSUM_PARTIAL, True), (F_CSUM_VALID, True),
                                        (0, False)], ids=["partial", "valid", "unknown"])
def test_a_super_packet_is_received_whole_over_16k_buffers(flags, good):
    vf = Vf(nd=8, bsize_kb=16)
    vf.give_rx(7)
    big = tcp(60000 - 54)
    assert vf.receive([big], flags) == (1, R.EICR_RTX_Q0)
    cs = R.RXD_STAT_L4CS | R.RXD_STAT_IPCS if good else 0
    assert [vf.rx_desc(k) for k in range(5)] == [
        (R.RXD_STAT_DD, 16384)] * 3 + [(R.RXD_STAT_DD | R.RXD_STAT_EOP | cs, 60000 - 49152),
                                       (0, 0)]
    assert bytes(vf.mem[RXBUFS:RXBUFS + 60000]) == big       # buffers are contiguous here
    assert vf.reg(R.RX_BASE + R.R_HEAD) == 4 and vf.intact()
    # three descriptors left: the next one does not fit and is dropped, counted
    assert vf.receive([big], flags) == (0, 0) and vf.stats[R.S_RX_NO_DESC] == 1
    assert vf.rx_desc(4) == (0, 0)
    vf.receive([bytes(R.MAX_RX_FRAME + 1)], flags)          # beyond the largest: not taken
    assert vf.stats[R.S_RX_TOO_BIG] == 1 and vf.rx_desc(4) == (0, 0) and vf.intact()


# ---- over a real tap: the guest's netdev as the kernel drives it -----------------------

@pytest.fixture
def tap():
    """A tap ``vf0`` (virtio headers, offloads on) up in a fresh namespace: its fd, a
    sniffer (PACKET_AUXDATA) and an injector (PACKET_VNET_HDR) bound to it."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns, held = f"vfoff-{os.getpid()}", []
    netns.create(ns)
    try:
        netns.pushns(ns)
        try:
            held.append(open_tap("vf0"))
            with open("/proc/sys/net/ipv6/conf/vf0/disable_ipv6", "w") as c:
                c.write("1")                               # no chatter of the kernel's own
            with NetNS(ns) as nl:                          # up before binding (ENETDOWN)
                nl.link("set", index=nl.link_lookup(ifname="vf0")[0], state="up")
            for opt in (8, 15):                            # PACKET_AUXDATA, PACKET_VNET_HDR
                held.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
                held[-1].bind(("vf0", 0))
                held[-1].setsockopt(263, opt, 1)           # SOL_PACKET
        finally:
            netns.popns()
        held[1].settimeout(2)
        yield held
    finally:
        for h in held:
            h.close() if isinstance(h, socket.socket) else os.close(h)
        netns.remove(ns)


def test_tap_tx_takes_the_kernels_super_packet_and_rx_tap_gives_frames_back(tap):
    fd, sniff, inject = tap
    vf = Vf(nd=32)
    payload = random.Random(2).randbytes(30000)
    p = tcp_super(False, payload)
    f, cs = partial(p, 16)
    # The kernel queues it to the tap whole (TSO on): tap_tx reads what Linux gives.
    inject.send(vnet(1, GSO_TCPV4, cs + 32, 1448, cs, 16) + f)
    st, one = np.zeros(V.NST, np.int64), np.array([1], np.uint64).view(np.uint8)
    sent, _ = V.tap_tx(vf.mem, vf.regs, TXRING, vf.nd, st, np.zeros(4, np.int64), ARENA,
                       np.array([fd], np.int64), -1, one, vf.vstats)
    vf.tail = int(st[V.S_TX_USE])
    b = vf.transmit()
    mine = [i for i in range(b.n) if b.meta[GSO_TYPE, i]]  # should the kernel send others
    assert sent == b.n and len(mine) == 1 and vf.stats[R.S_TX_BAD_OFFLOAD] == 0
    check_super(b, p, payload, False, i=mine[0])
    # Receive: a super-packet with its checksum partial and a plain frame, to the tap.
    vf.give_rx(vf.nd - 1)
    small = tcp(200)
    assert vf.receive([f], F_CSUM_PARTIAL)[0] == 1 and vf.receive([small], 0)[0] == 1
    got = V.rx_tap(vf.mem, vf.regs, RXRING, vf.nd, np.zeros(V.NST, np.int64), RXBUFS,
                   vf.bsize, fd, *V.rx_scratch(), vf.vstats)
    used = -(-len(f) // vf.bsize) + 1                       # all given back, RDT one behind
    assert got == 2 and vf.reg(R.RX_BASE + R.R_TAIL) == used - 1
    seen = []
    while len(seen) < 2:
        data, anc, _, addr = sniff.recvmsg(1 << 17, 64)
        if addr[2] != socket.PACKET_OUTGOING:
            status = struct.unpack_from("<I", anc[0][2])[0] if anc else 0
            seen.append((data, bool(status & 8)))          # TP_STATUS_CSUMNOTREADY
    (d0, partial0), (d1, partial1) = seen
    assert partial0 and finish(d0, cs, 16) == raw(p)       # NEEDS_CSUM: the stack finishes it
    assert d1 == small and not partial1
