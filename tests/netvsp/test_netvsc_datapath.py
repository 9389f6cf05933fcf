"""NetVSC's transmit kernel against NetVSP's ingress kernel: frames and offloads
cross the ring as Linux and the host would carry them."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, IPv6, TCP, UDP, Ether, raw

from netvsp.datapath import ReceiveBuffer, C_ID, DRAINED, NBAD, netvsp_ingress, write_completions
from netvsp.netvsc_datapath import GPA_ID, netvsc_reclaim, netvsc_transmit, rx_scratch
from netvsp.vmbus import ring as RG
from switch.gso import finish_checksum
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_VLAN, FLAGS, GSO_SIZE,
                          GSO_TCPV4, GSO_TYPE, LEN, OFF, TCI, PacketBatch,
                          init_packet)

RAM = 8 << 20
RING, RDS = 0x10000, 256 * 1024
SBUF, SEC, NSEC = 0x100000, 6144, 64
TXA, TXSIZE = 0x400000, 1 << 20


def setup():
    mem = np.zeros(RAM, dtype=np.uint8)
    RG.Ring(mem, RING, RDS).init()
    b = PacketBatch(64, arena=TXSIZE)
    b.data = mem[TXA:TXA + TXSIZE]          # the arena is a window of guest RAM
    return mem, b


def put(b, i, frame, at, **meta):
    b.data[at:at + len(frame)] = np.frombuffer(frame, np.uint8)
    init_packet(b.meta, i, at, len(frame), 1, 0)
    for k, v in meta.items():
        b.meta[globals()[k], i] = v


def test_small_and_large_frames_cross_with_their_offloads():
    mem, b = setup()
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    f_small = raw(eth / IP() / UDP() / bytes(50))
    f_v6 = raw(eth / IPv6() / TCP() / bytes(400))
    f_big = raw(eth / IP() / TCP() / bytes(60000))
    put(b, 0, f_small, 256, FLAGS=F_CSUM_PARTIAL | F_VLAN, CSUM_START=34, CSUM_OFF=6,
        TCI=(3 << 13) | 99)
    put(b, 1, f_v6, 1024, FLAGS=F_CSUM_PARTIAL, CSUM_START=54, CSUM_OFF=16)
    put(b, 2, f_big, 4096, FLAGS=F_CSUM_PARTIAL, CSUM_START=34, CSUM_OFF=16,
        GSO_TYPE=GSO_TCPV4, GSO_SIZE=1448)
    free = np.arange(NSEC, dtype=np.int64)
    nfree = np.array([NSEC], dtype=np.int64)
    bufs = np.zeros((1, 2), dtype=np.int64)
    nvsp = np.zeros(16, dtype=np.uint8)
    stats = np.zeros(4, dtype=np.int64)
    busy = np.zeros(NSEC, dtype=np.uint8)
    nxt, sig = netvsc_transmit(mem, RING, RDS, b.meta, b.data, TXA, 3, 0, SBUF, SEC, free,
                               nfree, busy, bufs, nvsp, stats)
    assert (nxt, sig) == (3, 1) and stats.tolist() == [2, 1, 0, 0] and nfree[0] == NSEC - 2
    # the host side
    h = PacketBatch(64, arena=1 << 20)
    rstate = np.array([RG.ring_read_pos(mem, RING, RDS), 0], dtype=np.int64)
    comp = np.zeros((16, 2), dtype=np.int64)
    bad = np.zeros(NBAD, dtype=np.int64)
    n, cursor, ncomp, why = netvsp_ingress(mem, RING, RDS, rstate, np.zeros(RG.DESC_FIELDS,
                                           np.int64), np.zeros((64, 3), np.int64),
                                           np.zeros(16, np.uint8), SBUF, NSEC * SEC, SEC,
                                           h.meta, h.data, 0, 0, 5, comp, 0, bad,
                                           *ReceiveBuffer(0x300000, 8 * 1806, 1806).arrays())
    assert (n, ncomp, why) == (3, 3, DRAINED) and not bad.any()
    frames = [bytes(h.data[h.meta[OFF, i]:h.meta[OFF, i] + h.meta[LEN, i]]) for i in range(3)]
    assert frames == [f_small, f_v6, f_big]
    assert h.meta[FLAGS, 0] & F_VLAN and h.meta[TCI, 0] == (3 << 13) | 99
    assert h.meta[CSUM_START, 0] == 34 and h.meta[CSUM_OFF, 0] == 6
    assert h.meta[CSUM_START, 1] == 54 and h.meta[CSUM_OFF, 1] == 16
    assert h.meta[GSO_TYPE, 2] == GSO_TCPV4 and h.meta[GSO_SIZE, 2] == 1448
    # completions name what to free: sections (index + 1), the GPA frame's slot
    assert sorted(comp[:3, C_ID].tolist()) == sorted([NSEC, NSEC - 1, GPA_ID + 2])
    out = RING + 4096 + RDS                      # a host-to-guest ring after it
    RG.Ring(mem, out, RDS).init()
    write_completions(mem, out, RDS, comp, 0, ncomp, np.zeros(8, np.uint8))
    write_completions(mem, out, RDS, comp, 0, 1, np.zeros(8, np.uint8))   # one twice
    gpa_done = np.zeros(4, dtype=np.int64)
    rs = np.array([RG.ring_read_pos(mem, out, RDS), 0], dtype=np.int64)
    got = netvsc_reclaim(mem, out, RDS, rs, np.zeros(RG.DESC_FIELDS, np.int64), free, nfree,
                         busy, gpa_done)
    assert got == 4 and nfree[0] == NSEC and gpa_done.tolist() == [0, 0, 1, 0] and not busy.any()


def test_ring_full_stops_and_the_rest_goes_next_time():
    mem = np.zeros(RAM, dtype=np.uint8)
    b = PacketBatch(256, arena=TXSIZE)
    b.data = mem[TXA:TXA + TXSIZE]
    f = raw(Ether() / IP() / UDP() / bytes(200))
    for i in range(256):
        put(b, i, f, 256 + i * 512)
    free = np.arange(256, dtype=np.int64)
    nfree = np.array([256], dtype=np.int64)
    args = (np.zeros((1, 2), np.int64), np.zeros(16, np.uint8), np.zeros(4, np.int64))
    RG.Ring(mem, RING, 4096).init()                # 4 KiB: about a hundred 40-byte packets
    busy = np.zeros(256, dtype=np.uint8)
    nxt, sig = netvsc_transmit(mem, RING, 4096, b.meta, b.data, TXA, 256, 0, SBUF, SEC,
                               free, nfree, busy, *args)
    assert 90 < nxt < 110 and sig == 1 and nfree[0] == 256 - nxt
    # the host reads them all; the rest then fits
    r = RG.Ring(mem, RING, 4096)
    while r.read_packet() is not None:
        pass
    r.commit_read()
    nxt2, _ = netvsc_transmit(mem, RING, 4096, b.meta, b.data, TXA, 256, nxt, SBUF, SEC,
                              free, nfree, busy, *args)
    assert nxt2 > nxt


def test_host_egress_to_guest_receive_round_trip():
    from netvsp.datapath import NSTATS, netvsp_egress
    from netvsp.netvsc_datapath import RX_OK, netvsc_receive
    from switch.batch import D_TAGGED, F_CSUM_VALID
    from switch.parse import parse_batch
    mem = np.zeros(RAM, dtype=np.uint8)
    out = RING + 4096 + RDS
    RG.Ring(mem, out, RDS).init()
    rb = ReceiveBuffer(0x500000, 100 * 1806, 1806)
    h = PacketBatch(16, arena=1 << 18)
    frames = [raw(Ether() / IP() / TCP() / bytes(k * 100)) for k in range(1, 6)]
    at = 0
    for i, f in enumerate(frames):
        put(h, i, f, at)
        at += 2048
    h.meta[FLAGS, 0] |= F_CSUM_VALID           # checked already: said so to the guest
    parse_batch(h.meta, h.data, 0, 5)
    plan = np.zeros((2, 5), dtype=np.int64)
    plan[0] = np.arange(5)
    plan[1] = 2
    plan[1, 3] = 2 | D_TAGGED | ((3 << 13 | 10) << 48)
    stats = np.zeros(NSTATS, dtype=np.int64)
    netvsp_egress(h.meta, h.data, plan, 0, 5, mem, out, RDS, rb.gpa, rb.sub_size, rb.free,
                  rb.nfree, rb.chain, rb.head, np.zeros((375, 2), np.int64),
                  np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8), np.zeros(64, np.int64),
                  stats, False, np.zeros((h.meta.shape[0], 9), np.int64), np.zeros(1, np.int64))
    g = PacketBatch(16, arena=1 << 18)
    rs = np.array([RG.ring_read_pos(mem, out, RDS), 0], dtype=np.int64)
    comp = np.zeros((8, 2), dtype=np.int64)
    gst = np.zeros(8, dtype=np.int64)
    n, cursor, ncomp, why = netvsc_receive(mem, out, RDS, rs, np.zeros(RG.DESC_FIELDS,
                                           np.int64), np.zeros((562, 2), np.int64), rb.gpa,
                                           100 * 1806, g.meta, g.data, 0, 0, comp, 0, gst,
                                           np.zeros(8, np.uint8), -1, *rx_scratch())
    assert (n, ncomp, why) == (5, 1, RX_OK) and not gst.any()
    got = [bytes(g.data[g.meta[OFF, i]:g.meta[OFF, i] + g.meta[LEN, i]]) for i in range(5)]
    assert got[1:] == frames[1:]
    # "checksum succeeded" becomes a partial checksum for the guest's tap: the
    # field holds the pseudo-header sum, and finishing it gives the frame sent
    assert g.meta[FLAGS, 0] & F_CSUM_PARTIAL and not g.meta[FLAGS, 0] & F_CSUM_VALID
    assert (g.meta[CSUM_START, 0], g.meta[CSUM_OFF, 0]) == (34, 16)
    assert got[0] != frames[0] and got[0][:50] == frames[0][:50]
    assert finish_checksum(g.meta, g.data, 0)
    assert bytes(g.data[g.meta[OFF, 0]:g.meta[OFF, 0] + g.meta[LEN, 0]]) == frames[0]
    assert not g.meta[FLAGS, 1] & (F_CSUM_VALID | F_CSUM_PARTIAL)
    assert g.meta[FLAGS, 3] & F_VLAN and g.meta[TCI, 3] == (3 << 13) | 10
    assert comp[0, 1] == 1                      # completed as SUCCESS


@pytest.mark.parametrize("offload", ["partial", "none"])
def test_rsc_super_packet_arrives_whole(offload):
    """NVSP 6.1 receive coalescing: a TCP super-packet crosses as RSC fragments of
    one transfer-page packet and the guest reassembles it into one frame, one big
    segment, whose checksum goes to its tap as partial and finishes right. With
    checksum offload it crosses as it lay in the batch; without, it is made one
    big segment with finished checksums first."""
    from scapy.all import IP as SIP, TCP as STCP, Ether as SEther
    from netvsp.datapath import NSTATS, S_COALESCED, netvsp_egress
    from netvsp.netvsc_datapath import RX_OK, netvsc_receive
    from switch.parse import parse_batch
    mem = np.zeros(RAM, dtype=np.uint8)
    out = RING + 4096 + RDS
    RG.Ring(mem, out, RDS).init()
    rb = ReceiveBuffer(0x500000, 200 * 1806, 1806)
    h = PacketBatch(4, arena=1 << 18)
    payload = bytes((k * 13) & 0xFF for k in range(40000))
    big = raw(SEther(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / SIP(src="10.0.0.1", dst="10.0.0.2") / STCP(sport=7, dport=8) / payload)
    if offload == "partial":
        put(h, 0, big, 0, FLAGS=F_CSUM_PARTIAL, CSUM_START=34, CSUM_OFF=16,
            GSO_TYPE=GSO_TCPV4, GSO_SIZE=1448)
    else:
        put(h, 0, big, 0, GSO_TYPE=GSO_TCPV4, GSO_SIZE=1448)
    parse_batch(h.meta, h.data, 0, 1)
    plan = np.array([[0], [2]], dtype=np.int64)
    stats = np.zeros(NSTATS, dtype=np.int64)
    netvsp_egress(h.meta, h.data, plan, 0, 1, mem, out, RDS, rb.gpa, rb.sub_size, rb.free,
                  rb.nfree, rb.chain, rb.head, np.zeros((375, 2), np.int64),
                  np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8), np.zeros(64, np.int64),
                  stats, True, np.zeros((h.meta.shape[0], 9), np.int64),
                  np.zeros(1, np.int64))
    assert stats[S_COALESCED] == 1 and rb.nfree[0] < 200 - 20       # many fragments
    g = PacketBatch(16, arena=1 << 18)
    rs = np.array([RG.ring_read_pos(mem, out, RDS), 0], dtype=np.int64)
    comp = np.zeros((8, 2), dtype=np.int64)
    gst = np.zeros(8, dtype=np.int64)
    n, _, ncomp, why = netvsc_receive(mem, out, RDS, rs, np.zeros(RG.DESC_FIELDS, np.int64),
                                      np.zeros((562, 2), np.int64), rb.gpa, 200 * 1806,
                                      g.meta, g.data, 0, 0, comp, 0, gst,
                                      np.zeros(8, np.uint8), -1, *rx_scratch())
    assert (n, ncomp, why) == (1, 1, RX_OK) and not gst.any(), (gst.tolist(), comp[0].tolist())
    got = bytes(g.data[g.meta[OFF, 0]:g.meta[OFF, 0] + g.meta[LEN, 0]])
    assert len(got) == len(big) and got[54:] == payload
    assert g.meta[FLAGS, 0] & F_CSUM_PARTIAL and g.meta[CSUM_START, 0] == 34
    assert finish_checksum(g.meta, g.data, 0)
    got = bytes(g.data[g.meta[OFF, 0]:g.meta[OFF, 0] + g.meta[LEN, 0]])
    pkt = SEther(got)
    assert pkt[SIP].len == len(big) - 14
    want = SEther(raw(pkt.__class__(got)))
    del want[SIP].chksum, want[STCP].chksum
    want = SEther(raw(want))
    assert pkt[STCP].chksum == want[STCP].chksum and pkt[SIP].chksum == want[SIP].chksum


@pytest.mark.parametrize("pkt,start,off", [
    (Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / (b"x" * 300), 34, 16),
    (Ether() / IPv6(src="fd00::1", dst="fd00::2") / TCP() / (b"x" * 301), 54, 16),
    (Ether() / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 4) / UDP() / (b"y" * 77),
     38, 6),
    (Ether() / IPv6(src="fd00::1", dst="fd00::2") / UDP() / (b"y" * 64), 54, 6),
])
def test_verified_checksum_goes_to_the_tap_as_partial(pkt, start, off):
    from netvsp.netvsc_datapath import _verified_to_partial
    from switch.batch import F_CSUM_VALID
    f = raw(pkt)
    b = PacketBatch(2, arena=4096)
    put(b, 0, f, 64, FLAGS=F_CSUM_VALID)
    _verified_to_partial(b.meta, b.data, 0)
    assert b.meta[FLAGS, 0] & F_CSUM_PARTIAL and not b.meta[FLAGS, 0] & F_CSUM_VALID
    assert (b.meta[CSUM_START, 0], b.meta[CSUM_OFF, 0]) == (start, off)
    assert finish_checksum(b.meta, b.data, 0)
    assert bytes(b.data[64:64 + len(f)]) == f           # the sum the sender made


@pytest.mark.parametrize("pkt", [
    Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(chksum=0) / (b"y" * 64),   # no checksum
    Ether() / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / TCP() / (b"x" * 64),  # fragment
    Ether() / IP(src="10.0.0.1", dst="10.0.0.2", len=300) / TCP() / (b"x" * 64),  # len > frame
    Ether() / IPv6(src="fd00::1", dst="fd00::2", plen=9000) / TCP() / (b"x" * 64),
    Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / (b"\x00" * 64),              # not TCP/UDP
    Ether(type=0x0806) / (b"\x00" * 46),
])
def test_verified_checksum_left_alone_where_it_cannot_be_placed(pkt):
    from netvsp.netvsc_datapath import _verified_to_partial
    from switch.batch import F_CSUM_VALID
    f = raw(pkt)
    b = PacketBatch(2, arena=4096)
    put(b, 0, f, 64, FLAGS=F_CSUM_VALID)
    _verified_to_partial(b.meta, b.data, 0)
    assert b.meta[FLAGS, 0] & F_CSUM_VALID and not b.meta[FLAGS, 0] & F_CSUM_PARTIAL
    assert bytes(b.data[64:64 + len(f)]) == f


def test_direct_mode_writes_each_frame_to_the_tap_from_the_receive_buffer():
    """The driver's mode: frames go from the receive buffer to the tap descriptor,
    one writev() each (here a datagram socket stands in for the tap, so each
    write reads back whole): virtio header first, a tag back inline with the
    checksum start moved past it, RSC fragments joined, and the packet completed
    after its frames were written."""
    import socket

    from scapy.all import Dot1Q
    from netvsp.datapath import NSTATS, netvsp_egress
    from netvsp.netvsc_datapath import RX_OK, netvsc_receive
    from switch.batch import D_TAGGED, F_CSUM_VALID
    from switch.parse import parse_batch
    mem = np.zeros(RAM, dtype=np.uint8)
    out = RING + 4096 + RDS
    RG.Ring(mem, out, RDS).init()
    rb = ReceiveBuffer(0x500000, 200 * 1806, 1806)
    h = PacketBatch(4, arena=1 << 18)
    small = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / bytes(100))
    big = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=7, dport=8)
              / bytes((k * 13) & 0xFF for k in range(30000)))
    put(h, 0, small, 0, FLAGS=F_CSUM_VALID)
    put(h, 1, big, 4096, FLAGS=F_CSUM_PARTIAL, CSUM_START=34, CSUM_OFF=16, GSO_TYPE=GSO_TCPV4,
        GSO_SIZE=1448)
    parse_batch(h.meta, h.data, 0, 2)
    plan = np.array([[0, 1], [2 | D_TAGGED | ((2 << 13 | 42) << 48), 2]], dtype=np.int64)
    netvsp_egress(h.meta, h.data, plan, 0, 2, mem, out, RDS, rb.gpa, rb.sub_size, rb.free,
                  rb.nfree, rb.chain, rb.head, np.zeros((375, 2), np.int64),
                  np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8), np.zeros(64, np.int64),
                  np.zeros(NSTATS, np.int64), True, np.zeros((h.meta.shape[0], 9), np.int64),
                  np.zeros(1, np.int64))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        g = PacketBatch(1, arena=64)
        rs = np.array([RG.ring_read_pos(mem, out, RDS), 0], dtype=np.int64)
        comp = np.zeros((8, 2), dtype=np.int64)
        gst = np.zeros(8, dtype=np.int64)
        n, _, ncomp, why = netvsc_receive(mem, out, RDS, rs, np.zeros(RG.DESC_FIELDS, np.int64),
                                          np.zeros((562, 2), np.int64), rb.gpa, 200 * 1806,
                                          g.meta, g.data, 0, 0, comp, 0, gst,
                                          np.zeros(8, np.uint8), a.fileno(), *rx_scratch())
        assert (n, why) == (2, RX_OK) and not gst.any() and ncomp >= 1
        assert all(comp[k, 1] == 1 for k in range(ncomp))        # completed as SUCCESS
        got = [b.recv(1 << 17) for _ in range(2)]
    finally:
        a.close()
        b.close()
    # the small UDP frame, tagged: NEEDS_CSUM from just past the tag
    hdr, f = got[0][:10], got[0][10:]
    assert hdr[0] == 1 and int.from_bytes(hdr[6:8], "little") == 38 and hdr[8] == 6
    e = Ether(f)
    assert e[Dot1Q].vlan == 42 and e[Dot1Q].prio == 2
    assert raw(e[IP])[:20] == small[14:34] and bytes(e[UDP].payload) == bytes(100)
    # the super-packet: whole, partial from byte 34; finishing the sum gives scapy's
    hdr, f = got[1][:10], got[1][10:]
    assert hdr[0] == 1 and int.from_bytes(hdr[6:8], "little") == 34 and hdr[8] == 16
    assert len(f) == len(big) and f[54:] == big[54:]
    fb = PacketBatch(1, arena=1 << 16)
    put(fb, 0, f, 0, FLAGS=F_CSUM_PARTIAL, CSUM_START=34, CSUM_OFF=16)
    assert finish_checksum(fb.meta, fb.data, 0)
    assert bytes(fb.data[:len(big)]) == big
