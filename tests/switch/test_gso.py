"""Tests for software segmentation and checksum completion (switch/gso.py).

Super-packets are built with scapy and loaded into a batch the way tap receive
does it: ``init_packet`` (append_frames), the offload state a virtio_net_hdr
carries (GSO type and size, F_CSUM_PARTIAL with CSUM_START/CSUM_OFF, the
pseudo-header sum left in the L4 checksum field as Linux's CHECKSUM_PARTIAL
does), then the edge parser. What ``segment`` writes is checked two ways: byte
for byte against the frames scapy builds for each segment under Linux's software
GSO rules, and by dissecting every frame with scapy (checksums recomputed,
lengths, sequence numbers, flags, IPv4 ids, tags, reassembled payload).

Hostile packets and undersized buffers must give 0, never write past ``out`` or
``lens`` (canaries behind both), and never depend on arena bytes outside the
frame.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, Raw, raw
from scapy.layers.inet import IPOption_EOL, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting, in6_pseudoheader)

from switch.batch import (CSUM_OFF, CSUM_START, D_TAG_SHIFT, D_TAGGED, F_CSUM_PARTIAL,
                          F_CSUM_VALID, F_IPV4, F_IPV6, F_TCP, F_UDP, F_VLAN, FLAGS, GSO_SIZE,
                          GSO_TYPE, L3OFF, L4OFF, LEN, OFF, PAYOFF, TCI, PacketBatch)
from switch.gso import finish_checksum, segment
from switch.parse import parse_batch

MAC_D = "02:00:00:00:00:02"
MAC_S = "02:00:00:00:00:01"
SPORT, DPORT = 40000, 12345          # ports scapy has no dissector for
SEQ0 = 0xFFFFF000                    # wraps within a 64 KiB super-packet
IPID0 = 0xFFF0                       # wraps too
OUT_TCI = (5 << 13) | 100            # priority 5, VLAN 100
CANARY = 0xA5
FIN, PSH, CWR = 0x01, 0x08, 0x80
ECN = 0x80                           # virtio gso_type bit

OPTS = [("MSS", 1460), ("NOP", None), ("WScale", 7), ("NOP", None), ("NOP", None),
        ("Timestamp", (123456, 654321))]


def dest(tci=None, port=3):
    """A destination word: untagged, or with ``tci`` inserted on the wire. Words are
    int64 meta values, so a priority >= 4 makes them negative."""
    if tci is None:
        return port
    w = port | D_TAGGED | (tci << D_TAG_SHIFT)
    return w - (1 << 64) if w >= 1 << 63 else w


def payload_bytes(n: int) -> bytes:
    # Not periodic in 2 or 4 so misplaced pieces or swapped bytes show.
    return bytes((k * 7 + (k >> 8) * 13 + 1) & 0xFF for k in range(n))


def add_tag(frame: bytes, tci: int) -> bytes:
    return frame[:12] + b"\x81\x00" + tci.to_bytes(2, "big") + frame[12:]


def ones_sum(b: bytes) -> int:
    if len(b) & 1:
        b += b"\0"
    s = sum(int.from_bytes(b[k:k + 2], "big") for k in range(0, len(b), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_layer(pkt):
    return pkt[TCP] if TCP in pkt else pkt[UDP]


def l4_start(pkt) -> int:
    return len(raw(pkt)) - len(raw(l4_layer(pkt)))


def pseudo_sum(pkt) -> int:
    """Folded pseudo-header sum of ``pkt``'s TCP/UDP segment (what Linux leaves in
    the checksum field for CHECKSUM_PARTIAL)."""
    l4 = l4_layer(pkt)
    proto = 6 if isinstance(l4, TCP) else 17
    ln = len(raw(l4))
    if IP in pkt:
        ph = (socket.inet_aton(pkt[IP].src) + socket.inet_aton(pkt[IP].dst)
              + bytes([0, proto]) + ln.to_bytes(2, "big"))
    else:
        ph = raw(in6_pseudoheader(proto, l4, ln))
    return ones_sum(ph)


def partial_frame(pkt) -> tuple[bytes, int, int]:
    """``pkt`` as a guest stack hands it over with NEEDS_CSUM: the pseudo-header sum
    in the checksum field. Returns (frame, csum_start, csum_offset)."""
    f = bytearray(raw(pkt))
    cs = l4_start(pkt)
    co = 16 if TCP in pkt else 6
    f[cs + co:cs + co + 2] = pseudo_sum(pkt).to_bytes(2, "big")
    return bytes(f), cs, co


def load(frame: bytes, gso_type=0, gso_size=0, csum=None, arena=1 << 18) -> PacketBatch:
    """One frame into a batch the way tap_receive + edge_ingress leave it."""
    b = PacketBatch(capacity=2, arena=arena, max_dest=1)
    assert b.append_frames([frame]) == 1
    m = b.meta
    if csum is not None:
        m[FLAGS, 0] |= F_CSUM_PARTIAL
        m[CSUM_START, 0], m[CSUM_OFF, 0] = csum
    m[GSO_TYPE, 0] = gso_type
    m[GSO_SIZE, 0] = gso_size
    parse_batch(m, b.data, 0, 1)
    return b


def run(b, d, out_size=1 << 18, nlens=256, max_frames=256):
    """Call segment with canaries behind ``out`` and ``lens``; the arena must not
    change. Returns (count, frames)."""
    obuf = np.full(out_size + 4096, CANARY, dtype=np.uint8)
    lbuf = np.full(nlens + 8, -7, dtype=np.int64)
    arena = b.data.copy()
    meta = b.meta.copy()
    n = segment(b.meta, b.data, 0, d, obuf[:out_size], lbuf[:nlens], max_frames)
    assert (obuf[out_size:] == CANARY).all(), "wrote past out"
    assert (lbuf[nlens:] == -7).all(), "wrote past lens"
    assert np.array_equal(arena, b.data), "segment modified the arena"
    assert np.array_equal(meta, b.meta), "segment modified meta"
    assert 0 <= n <= min(nlens, max_frames)
    frames, pos = [], 0
    for k in range(n):
        ln = int(lbuf[k])
        assert 0 < ln and pos + ln <= out_size
        frames.append(bytes(obuf[pos:pos + ln]))
        pos += ln
    return n, frames


def recomputed(frame: bytes):
    """Every checksum scapy recomputes for ``frame`` next to the one it carries."""
    p = Ether(frame)
    got, layers = [], []
    for cls in (IP, TCP, UDP):
        if cls in p:
            got.append(p[cls].chksum)
            layers.append(cls)
            del p[cls].chksum
    q = Ether(raw(p))
    return got, [q[cls].chksum for cls in layers]


def assert_checksums(frame: bytes, udp_zero_ok=False):
    got, want = recomputed(frame)
    p = Ether(frame)
    if udp_zero_ok and UDP in p and p[UDP].chksum == 0:
        got, want = got[:-1], want[:-1]
    assert got == want


# --------------------------------------------------------------------------------
# Packets

def ip_layer(kind: str):
    """The L3 part of a test packet; kinds cover options and extension headers."""
    if kind == "v4":
        return IP(src="10.1.2.3", dst="10.9.8.7", id=IPID0, flags="DF", ttl=61)
    if kind == "v4opts":
        return IP(src="10.1.2.3", dst="10.9.8.7", id=IPID0, ttl=61,
                  options=[IPOption_Router_Alert(), IPOption_NOP(), IPOption_NOP(),
                           IPOption_NOP(), IPOption_EOL()])
    if kind == "v6":
        return IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x20, fl=0x12345, hlim=60)
    if kind == "v6ext":
        return (IPv6(src="2001:db8::1", dst="2001:db8::2")
                / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt())
    if kind == "v6rt":
        # Segments left: the pseudo-header must use the final destination.
        return (IPv6(src="2001:db8::1", dst="2001:db8::a")
                / IPv6ExtHdrRouting(addresses=["2001:db8::b", "2001:db8::c"], segleft=2))
    if kind == "v6srh":
        return (IPv6(src="2001:db8::1", dst="2001:db8::a")
                / IPv6ExtHdrSegmentRouting(addresses=["2001:db8::f", "2001:db8::a"],
                                           segleft=1, lastentry=1))
    raise ValueError(kind)


def tcp_pkt(kind, payload, flags="PA", options=OPTS):
    return (Ether(dst=MAC_D, src=MAC_S) / ip_layer(kind)
            / TCP(sport=SPORT, dport=DPORT, seq=SEQ0, ack=77, flags=flags, window=500,
                  options=options) / Raw(payload))


def udp_pkt(kind, payload, chksum=None):
    u = UDP(sport=SPORT, dport=DPORT) if chksum is None else \
        UDP(sport=SPORT, dport=DPORT, chksum=chksum)
    return Ether(dst=MAC_D, src=MAC_S) / ip_layer(kind) / u / Raw(payload)


def max_payload(empty) -> int:
    """The largest payload ``empty`` (a packet without one) can carry: IPv4 total
    length or IPv6 payload length 65535."""
    return 65535 - (len(raw(empty)) - 14 - (40 if IPv6 in empty else 0))


def gso_type_of(kind, tcp=True):
    if not tcp:
        return 3
    return 1 if kind.startswith("v4") else 4


def expected_segments(pkt, mss, tci=None, udp_nocsum=False):
    """The frames Linux's software GSO makes of ``pkt``, rebuilt by scapy."""
    payload = raw(l4_layer(pkt).payload)
    nseg = max(1, -(-len(payload) // mss))
    frames = []
    for k in range(nseg):
        piece = payload[k * mss:(k + 1) * mss]
        q = pkt.copy()
        l4 = l4_layer(q)
        l4.remove_payload()
        if piece:
            l4.add_payload(Raw(piece))
        if isinstance(l4, TCP):
            l4.seq = (SEQ0 + k * mss) & 0xFFFFFFFF
            fl = int(l4.flags)
            if k != nseg - 1:
                fl &= ~(FIN | PSH)
            if k != 0:
                fl &= ~CWR
            l4.flags = fl
        else:
            del l4.len
        if udp_nocsum:
            l4.chksum = 0
        else:
            del l4.chksum
        if IP in q:
            q[IP].id = (IPID0 + k) & 0xFFFF
            del q[IP].len
            del q[IP].chksum
        else:
            del q[IPv6].plen
        f = raw(q)
        frames.append(f if tci is None else add_tag(f, tci))
    return frames


def check_dissected(frames, pkt, mss, tci, v4, tcp, udp_nocsum=False):
    """What a receiver sees: every frame valid on its own, the stream intact."""
    payload = raw(l4_layer(pkt).payload)
    hdr = len(raw(pkt)) - len(payload)
    got = b""
    for k, f in enumerate(frames):
        p = Ether(f)
        if tci is None:
            assert Dot1Q not in p
            l3 = 14
        else:
            assert p.type == 0x8100 and p[Dot1Q].vlan == tci & 0xFFF
            assert p[Dot1Q].prio == tci >> 13
            l3 = 18
        seg = min(mss, len(payload) - k * mss)
        assert len(f) == hdr + (4 if tci is not None else 0) + seg
        assert_checksums(f, udp_zero_ok=udp_nocsum)
        if v4:
            assert p[IP].len == len(f) - l3
            assert p[IP].id == (IPID0 + k) & 0xFFFF
        else:
            assert p[IPv6].plen == len(f) - l3 - 40
        if tcp:
            t = p[TCP]
            assert t.seq == (SEQ0 + k * mss) & 0xFFFFFFFF
            fl = int(t.flags)
            orig = int(pkt[TCP].flags)
            last, first = k == len(frames) - 1, k == 0
            assert bool(fl & FIN) == (last and bool(orig & FIN))
            assert bool(fl & PSH) == (last and bool(orig & PSH))
            assert bool(fl & CWR) == (first and bool(orig & CWR))
            assert fl & ~(FIN | PSH | CWR) == orig & ~(FIN | PSH | CWR)
            start = len(f) - len(raw(t)) + t.dataofs * 4
        else:
            u = p[UDP]
            assert u.len == len(raw(u))
            if udp_nocsum:
                assert u.chksum == 0
            start = len(f) - len(raw(u)) + 8
        got += f[start:]
    assert got == payload


@pytest.fixture(scope="module", autouse=True)
def warm_numba():
    """Compile (or load from cache) both kernels once, outside hypothesis deadlines."""
    f, cs, co = partial_frame(tcp_pkt("v4", b"x" * 100))
    b = load(f, 1, 40, (cs, co))
    run(b, dest())
    finish_checksum(b.meta, b.data, 0)
    yield


# --------------------------------------------------------------------------------
# TCP segmentation

SIZES = [  # (payload, mss, TCP flags, virtio gso_type bits)
    (None, 1448, "PA", 0),         # 64 KiB: the most the IP length allows; short last
    (1448 * 3, 1448, "FPA", 0),    # exact multiple: FIN/PSH on the third only
    (1000, 1448, "FPA", 0),        # one short segment
    (1448, 1448, "CEA", ECN),      # exactly one segment, CWR kept
    (4001, 1000, "CEPA", ECN),     # CWR only on the first, PSH only on the last
    (7, 3, "A", 0),                # odd MSS: odd-length pieces at odd offsets
    (0, 1448, "FA", 0),            # headers only: sent as one frame
]


@pytest.mark.parametrize("size,mss,flags,ecn", SIZES,
                         ids=[f"{s or 'max'}-{m}-{f}" for s, m, f, _ in SIZES])
@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
@pytest.mark.parametrize("kind", ["v4", "v4opts", "v6", "v6ext", "v6rt", "v6srh"])
def test_tcp_segments(kind, tci, size, mss, flags, ecn):
    if size is None:
        size = max_payload(tcp_pkt(kind, b""))
    pkt = tcp_pkt(kind, payload_bytes(size), flags=flags)
    f, cs, co = partial_frame(pkt)
    b = load(f, gso_type_of(kind) | ecn, mss, (cs, co))
    fl = b.meta[FLAGS, 0]
    assert fl & F_TCP and fl & (F_IPV4 | F_IPV6)
    n, frames = run(b, dest(tci))
    want = expected_segments(pkt, mss, tci)
    assert n == len(want)
    assert frames == want
    check_dissected(frames, pkt, mss, tci, kind.startswith("v4"), True)


def test_tcp_without_options_or_partial_checksum():
    # GSO state without NEEDS_CSUM and a garbage checksum field: segments are still right.
    pkt = tcp_pkt("v4", payload_bytes(3000), options=[])
    f = bytearray(raw(pkt))
    f[l4_start(pkt) + 16:l4_start(pkt) + 18] = b"\xde\xad"
    b = load(bytes(f), 1, 1400)
    n, frames = run(b, dest())
    assert n == 3 and frames == expected_segments(pkt, 1400)


def test_inline_tag_on_input():
    """A tap frame with its own 802.1Q tag: the parser takes the tag out of band
    and moves CSUM_START; the segments go out as the destination word says."""
    pkt = tcp_pkt("v4", payload_bytes(5000), flags="FPA")
    f, cs, co = partial_frame(pkt)
    b = load(add_tag(f, 0x0123), 1, 1448, (cs + 4, co))
    assert b.meta[FLAGS, 0] & F_VLAN and b.meta[TCI, 0] == 0x0123
    assert b.meta[CSUM_START, 0] == cs
    for tci in (None, OUT_TCI):
        n, frames = run(b, dest(tci))
        assert frames == expected_segments(pkt, 1448, tci)
        check_dissected(frames, pkt, 1448, tci, True, True)


def test_64k_sequence_and_id_wrap():
    pkt = tcp_pkt("v4", payload_bytes(65475))
    f, cs, co = partial_frame(pkt)
    n, frames = run(load(f, 1, 1448, (cs, co)), dest())
    ps = [Ether(x) for x in frames]
    assert n == 46
    assert [p[IP].id for p in ps[:17]] == [(IPID0 + k) & 0xFFFF for k in range(17)]
    assert ps[2][TCP].seq == SEQ0 + 2 * 1448
    assert ps[3][TCP].seq == SEQ0 + 3 * 1448 - (1 << 32)       # wrapped
    assert len(frames[-1]) == 14 + 20 + 40 + 65475 - 45 * 1448


# --------------------------------------------------------------------------------
# UDP segmentation (USO)

USIZES = [(4000, 1200), (1200, 1200), (100, 1200), (9, 2)]


@pytest.mark.parametrize("size,mss", USIZES, ids=[f"{s}-{m}" for s, m in USIZES])
@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
@pytest.mark.parametrize("kind", ["v4", "v4opts", "v6", "v6ext", "v6rt"])
def test_udp_segments(kind, tci, size, mss):
    pkt = udp_pkt(kind, payload_bytes(size))
    f, cs, co = partial_frame(pkt)
    b = load(f, 3, mss, (cs, co))
    assert b.meta[FLAGS, 0] & F_UDP
    n, frames = run(b, dest(tci))
    assert frames == expected_segments(pkt, mss, tci)
    check_dissected(frames, pkt, mss, tci, kind.startswith("v4"), False)


def test_udp_l4_type_and_ecn_bit_ignored():
    pkt = udp_pkt("v6", payload_bytes(2500))
    f, cs, co = partial_frame(pkt)
    for t in (5, 3 | ECN):
        n, frames = run(load(f, t, 1000, (cs, co)), dest())
        assert frames == expected_segments(pkt, 1000)


@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
def test_udp_v4_zero_checksum_stays_zero(tci):
    pkt = udp_pkt("v4", payload_bytes(3001), chksum=0)
    n, frames = run(load(raw(pkt), 3, 1000), dest(tci))
    assert n == 4
    assert frames == expected_segments(pkt, 1000, tci, udp_nocsum=True)
    check_dissected(frames, pkt, 1000, tci, True, False, udp_nocsum=True)


# --------------------------------------------------------------------------------
# No GSO: finish the checksum, or copy

@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
@pytest.mark.parametrize("pkt", [
    tcp_pkt("v4", payload_bytes(999)), tcp_pkt("v6ext", payload_bytes(1)),
    udp_pkt("v4opts", payload_bytes(333)), udp_pkt("v6rt", payload_bytes(0))],
    ids=["tcp4", "tcp6ext", "udp4opts", "udp6rt"])
def test_partial_checksum_finished(pkt, tci):
    f, cs, co = partial_frame(pkt)
    assert f != raw(pkt)
    b = load(f, 0, 1448, (cs, co))              # GSO_SIZE without a type: ignored
    n, frames = run(b, dest(tci))
    full = raw(pkt)
    assert n == 1 and frames == [full if tci is None else add_tag(full, tci)]
    assert_checksums(frames[0])


@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
def test_plain_copy(tci):
    f = raw(tcp_pkt("v4", payload_bytes(50)))
    f = f[:50] + b"\xee\xee" + f[52:]           # a wrong checksum is not ours to fix
    n, frames = run(load(f), dest(tci))
    assert frames == [f if tci is None else add_tag(f, tci)]


def mangled_zero_udp():
    """A UDP/IPv4 packet whose checksum computes to 0 (sent as 0xffff)."""
    pkt = udp_pkt("v4", payload_bytes(20) + b"\0\0", chksum=0)
    rest = ones_sum(raw(pkt[UDP])) + pseudo_sum(pkt)
    while rest >> 16:
        rest = (rest & 0xFFFF) + (rest >> 16)
    pkt[Raw].load = payload_bytes(20) + (0xFFFF - rest).to_bytes(2, "big")
    del pkt[UDP].chksum
    assert Ether(raw(pkt))[UDP].chksum == 0xFFFF
    return pkt


def test_partial_checksum_zero_is_mangled():
    pkt = mangled_zero_udp()
    f, cs, co = partial_frame(pkt)
    n, frames = run(load(f, 0, 0, (cs, co)), dest())
    assert frames == [raw(pkt)]
    assert Ether(frames[0])[UDP].chksum == 0xFFFF


# --------------------------------------------------------------------------------
# finish_checksum

@pytest.mark.parametrize("pkt", [
    tcp_pkt("v4", payload_bytes(1001)), tcp_pkt("v6srh", payload_bytes(64)),
    udp_pkt("v6", payload_bytes(7)), mangled_zero_udp()],
    ids=["tcp4", "tcp6srh", "udp6", "udp4-zero"])
def test_finish_checksum_in_place(pkt):
    f, cs, co = partial_frame(pkt)
    b = load(add_tag(f, 7), 0, 0, (cs + 4, co))   # tag popped: CSUM_START moves
    assert finish_checksum(b.meta, b.data, 0)
    assert b.frame(0) == raw(pkt)
    fl = b.meta[FLAGS, 0]
    assert not fl & F_CSUM_PARTIAL and fl & F_CSUM_VALID
    # Done: a second call has nothing to do.
    assert finish_checksum(b.meta, b.data, 0) and b.frame(0) == raw(pkt)


@pytest.mark.parametrize("cs,co", [(-1, 16), (10_000, 0), (None, 0), (None, -1),
                                   (0, None), (0, 1 << 62), (1 << 62, 0), (-(1 << 62), 16)])
def test_finish_checksum_out_of_frame(cs, co):
    pkt = tcp_pkt("v4", payload_bytes(100))
    f, cs0, co0 = partial_frame(pkt)
    ln = len(f)
    cs = ln if cs is None else cs                 # None: just past the end
    co = ln - 1 if co is None else co             # field straddles the end
    b = load(f, 0, 0, (cs0, co0))
    b.meta[CSUM_START, 0], b.meta[CSUM_OFF, 0] = cs, co
    before = b.data.copy()
    assert not finish_checksum(b.meta, b.data, 0)
    assert np.array_equal(before, b.data)
    assert b.meta[FLAGS, 0] & F_CSUM_PARTIAL


def test_finish_checksum_last_bytes():
    # The field may be the very last two bytes of the frame; one further is out.
    pkt = udp_pkt("v4", b"")
    f, cs, co = partial_frame(pkt)
    b = load(f, 0, 0, (cs, co))
    assert b.meta[LEN, 0] == cs + co + 2
    assert finish_checksum(b.meta, b.data, 0) and b.frame(0) == raw(pkt)
    b = load(f, 0, 0, (cs, co + 1))
    assert not finish_checksum(b.meta, b.data, 0)


# --------------------------------------------------------------------------------
# Hostile packets and short buffers

def super4(size=5000, mss=1000):
    pkt = tcp_pkt("v4", payload_bytes(size))
    f, cs, co = partial_frame(pkt)
    return load(f, 1, mss, (cs, co)), pkt


def test_gso_size_invalid():
    for mss in (0, -1, -(1 << 62), 1 << 16, 1 << 62):
        b, _ = super4()
        b.meta[GSO_SIZE, 0] = mss
        assert run(b, dest())[0] == 0


@pytest.mark.parametrize("pkt,gso", [
    (udp_pkt("v4", payload_bytes(3000)), 1),       # TCP GSO on UDP
    (udp_pkt("v6", payload_bytes(3000)), 4),
    (tcp_pkt("v4", payload_bytes(3000)), 3),       # UDP GSO on TCP
    (tcp_pkt("v6", payload_bytes(3000)), 1),       # TCPv4 GSO on IPv6
    (tcp_pkt("v4", payload_bytes(3000)), 4),       # TCPv6 GSO on IPv4
    (tcp_pkt("v4", payload_bytes(3000)), 2),       # no such type
    (tcp_pkt("v4", payload_bytes(3000)), 0x7F),
    (Ether(dst=MAC_D, src=MAC_S) / IP(src="10.0.0.1", dst="10.0.0.2", proto=47)
     / Raw(payload_bytes(3000)), 1),               # GRE: not TCP at all
    (Ether(dst=MAC_D, src=MAC_S) / Raw(payload_bytes(3000)), 1),   # not IP
    (Ether(dst=MAC_D, src=MAC_S) / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF")
     / TCP() / Raw(payload_bytes(3000)), 1),        # a fragment
    (Ether(dst=MAC_D, src=MAC_S)
     / IPv6(src="2001:db8::1", dst="2001:db8::2")
     / IPv6ExtHdrRouting(type=3, addresses=["2001:db8::3"], segleft=1)
     / TCP(sport=1, dport=2) / Raw(payload_bytes(3000)), 4),   # routing type we cannot read
], ids=["tcp-on-udp4", "tcp-on-udp6", "udp-on-tcp", "tcp4-on-v6", "tcp6-on-v4", "type2",
        "type7f", "gre", "not-ip", "fragment", "rt3"])
def test_gso_on_wrong_packet(pkt, gso):
    b = load(raw(pkt), gso, 1000)
    assert run(b, dest())[0] == 0
    assert run(b, dest(OUT_TCI))[0] == 0


@pytest.mark.parametrize("row,delta", [
    (PAYOFF, "len+1"), (PAYOFF, "len+1000"), (PAYOFF, -4), (PAYOFF, 4), (PAYOFF, "-1"),
    (L4OFF, 4), (L4OFF, -4), (L4OFF, "-1"), (L4OFF, "len"),
    (L3OFF, 4), (L3OFF, -4), (L3OFF, "-1"), (L3OFF, "big"),
    (LEN, "arena"), (LEN, "-1"), (LEN, "13"), (LEN, "big"), (OFF, "-1"), (OFF, "arena"),
    (OFF, "big"), (FLAGS, "noip"), (FLAGS, "v4v6"), (FLAGS, "notcp"),
])
def test_inconsistent_meta(row, delta):
    b, _ = super4()
    m = b.meta
    ln = int(m[LEN, 0])
    fixed = {"len+1": ln + 1, "len+1000": ln + 1000, "-1": -1, "len": ln, "13": 13,
             "big": 1 << 62, "arena": b.data.shape[0]}
    if row == FLAGS:
        m[FLAGS, 0] = {"noip": m[FLAGS, 0] & ~F_IPV4,
                       "v4v6": m[FLAGS, 0] | F_IPV6,
                       "notcp": m[FLAGS, 0] & ~F_TCP}[delta]
    elif isinstance(delta, str):
        m[row, 0] = fixed[delta]
    else:
        m[row, 0] += delta
    assert run(b, dest())[0] == 0
    assert run(b, dest(OUT_TCI))[0] == 0


def test_csum_start_beyond_frame():
    pkt = tcp_pkt("v4", payload_bytes(100))
    f, cs, co = partial_frame(pkt)
    ln = len(f)
    for bad_cs, bad_co in [(ln, 0), (ln + 100, 16), (-1, 16), (cs, ln), (cs, -2),
                           (ln - 1, 0), (1 << 62, 1 << 62), (cs, ln - cs - 1)]:
        assert run(load(f, 0, 0, (bad_cs, bad_co)), dest())[0] == 0
    # A tag goes in at byte 12: a summed area starting before it cannot be shifted.
    assert run(load(f, 0, 0, (4, 16)), dest(OUT_TCI))[0] == 0
    assert run(load(f, 0, 0, (4, 16)), dest())[0] == 1


@pytest.mark.parametrize("tci", [None, OUT_TCI], ids=["untagged", "tagged"])
def test_buffers_exactly_big_enough(tci):
    b, pkt = super4(5001, 1000)                  # 6 segments
    hdr = len(raw(pkt)) - 5001 + (4 if tci else 0)
    total = 6 * hdr + 5001
    want = expected_segments(pkt, 1000, tci)
    assert run(b, dest(tci), out_size=total, nlens=6, max_frames=6) == (6, want)
    assert run(b, dest(tci), out_size=total - 1)[0] == 0
    assert run(b, dest(tci), nlens=5)[0] == 0
    assert run(b, dest(tci), max_frames=5)[0] == 0
    assert run(b, dest(tci), max_frames=0)[0] == 0
    assert run(b, dest(tci), nlens=0)[0] == 0
    assert run(b, dest(tci), out_size=0)[0] == 0


@pytest.mark.parametrize("partial", [False, True])
def test_single_frame_buffers(partial):
    pkt = tcp_pkt("v4", payload_bytes(100))
    f, cs, co = partial_frame(pkt)
    b = load(f, 0, 0, (cs, co) if partial else None)
    ln = len(f)
    assert run(b, dest(), out_size=ln)[0] == 1
    assert run(b, dest(), out_size=ln - 1)[0] == 0
    assert run(b, dest(OUT_TCI), out_size=ln + 4)[0] == 1
    assert run(b, dest(OUT_TCI), out_size=ln + 3)[0] == 0
    assert run(b, dest(), nlens=0)[0] == 0
    assert run(b, dest(), max_frames=0)[0] == 0


def test_segment_length_fields_must_hold():
    # An IPv6 super-packet with bytes behind its payload length: the payload runs to
    # the end of the frame (skb->len), and a 65535-byte segment plus the TCP header
    # does not fit the IPv6 payload length.
    pkt = tcp_pkt("v6", payload_bytes(65000), options=[])
    f = raw(pkt) + payload_bytes(1000)
    b = load(f, 4, 65535)
    assert b.meta[FLAGS, 0] & F_TCP
    assert run(b, dest())[0] == 0
    b.meta[GSO_SIZE, 0] = 65515                 # 20 + 65515 = 65535: fits
    n, frames = run(b, dest())
    assert n == 2 and Ether(frames[0])[IPv6].plen == 65535
    assert_checksums(frames[0])
    assert_checksums(frames[1])


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ROWS = [LEN, OFF, FLAGS, L3OFF, L4OFF, PAYOFF, CSUM_START, CSUM_OFF, GSO_TYPE, GSO_SIZE]
SMALL_PKTS = {
    "tcp4": tcp_pkt("v4", payload_bytes(3000)),
    "tcp6": tcp_pkt("v6rt", payload_bytes(3000)),
    "udp4": udp_pkt("v4", payload_bytes(3000)),
    "udp6": udp_pkt("v6ext", payload_bytes(3000)),
}
ARENA = 8192


@FUZZ
@given(which=st.sampled_from(sorted(SMALL_PKTS)),
       tweaks=st.dictionaries(st.sampled_from(ROWS),
                              st.one_of(st.integers(-64, 64),
                                        st.integers(-(1 << 63), (1 << 63) - 1)),
                              max_size=4),
       relative=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=6),
       tagged=st.booleans(), gso=st.sampled_from([0, 1, 3, 4, 5, 0x81]),
       out_size=st.sampled_from([0, 100, 3200, 8000]))
def test_fuzz_never_escapes(which, tweaks, relative, flips, tagged, gso, out_size):
    """Random meta and header corruption: segment returns a count that fits the
    buffers, never writes past them and never reads outside the frame."""
    pkt = SMALL_PKTS[which]
    f, cs, co = partial_frame(pkt)
    b = load(f, gso, 1000, (cs, co), arena=ARENA)
    m = b.meta
    off0 = int(m[OFF, 0])
    for p, v in flips:
        b.data[off0 + p] = v
    for row, v in tweaks.items():
        m[row, 0] = (int(m[row, 0]) + v if relative and abs(v) <= 64 else v)
    d = dest(OUT_TCI if tagged else None)
    off, ln = int(m[OFF, 0]), int(m[LEN, 0])
    inside = 0 <= off <= ARENA and 0 <= ln <= ARENA - off
    results = []
    for fill in (0x00, 0xFF, 0x5C):
        # Same frame bytes, different everything else in the arena.
        if inside:
            frame = b.data[off:off + ln].copy()
            b.data[:] = fill
            b.data[off:off + ln] = frame
        else:
            b.data[:] = fill
        results.append(run(b, d, out_size=out_size, nlens=8, max_frames=8))
    assert results[0] == results[1] == results[2]
    n, frames = results[0]
    if not inside:
        assert n == 0
    assert sum(map(len, frames)) <= out_size
