"""Tests for the header parser kernel (switch/parse.py).

Valid frames are built with scapy from random parameters and the kernel's output
is compared field by field with scapy's own dissection of the same bytes. Hostile
frames (truncations, random bytes, broken length fields, corrupt OFF/LEN) must
never raise, must be flagged, and must never make the parser read outside the
frame: every parse here is repeated with the frame embedded between different
byte patterns (including the bytes the frame was cut from, and the very end of the
arena) and the results must not depend on them.
"""
from __future__ import annotations

import ipaddress
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Dot3, Ether, Raw, raw
from scapy.layers.inet import IPOption
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_RA,
                                ICMPv6ND_Redirect, ICMPv6NDOptPrefixInfo,
                                ICMPv6NDOptSrcLLAddr, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting, PadN, RouterAlert)
from scapy.layers.ipsec import AH

from switch.batch import (ARP_OP, ARP_SHA, ARP_SPA, ARP_TPA, CTAG, DMAC, DPORT,
                          DST_HI, DST_LO, ETYPE, F_ARP, F_BAD_IHL, F_BAD_LEN,
                          F_BCAST, F_CLONE, F_CSUM_PARTIAL, F_CSUM_VALID, F_FRAG,
                          F_FRAG_LATER, F_ICMP, F_ICMP6, F_INJECTED, F_IP6_EXT,
                          F_IP_OPTS, F_IPV4, F_IPV6, F_MALFORMED, F_MCAST, F_QINQ,
                          F_QINQ_C, F_RUNT, F_SAFE, F_TCP, F_TRUNC, F_UDP, F_VLAN,
                          FLAGS, ICMP_CODE, ICMP_TYPE, L3OFF, L4OFF, LEN, NFIELDS, OFF,
                          PAYOFF, PROTO, SAFE_LEN, SMAC, SPORT, SRC_HI, SRC_LO, STAG,
                          TCI, TCPFL, TOS, TTL, VLAN, PacketBatch)
from switch.parse import parse_batch

# --------------------------------------------------------------------------------
# Constants and small helpers

ROW_NAMES = {
    LEN: "LEN", OFF: "OFF", FLAGS: "FLAGS", TCI: "TCI", VLAN: "VLAN", DMAC: "DMAC",
    SMAC: "SMAC", ETYPE: "ETYPE", STAG: "STAG", CTAG: "CTAG", L3OFF: "L3OFF",
    L4OFF: "L4OFF", PAYOFF: "PAYOFF", PROTO: "PROTO", SRC_HI: "SRC_HI",
    SRC_LO: "SRC_LO", DST_HI: "DST_HI", DST_LO: "DST_LO", TOS: "TOS", TTL: "TTL",
    SPORT: "SPORT", DPORT: "DPORT", TCPFL: "TCPFL", ICMP_TYPE: "ICMP_TYPE",
    ICMP_CODE: "ICMP_CODE", ARP_OP: "ARP_OP", ARP_SPA: "ARP_SPA", ARP_TPA: "ARP_TPA",
    ARP_SHA: "ARP_SHA", SAFE_LEN: "SAFE_LEN",
}

# Every field the parser owns, with its value when the header is absent.
CLEARED = {
    VLAN: 0, DMAC: 0, SMAC: 0, ETYPE: 0, STAG: 0, CTAG: 0, L3OFF: -1, L4OFF: -1,
    PAYOFF: -1, PROTO: -1, SRC_HI: 0, SRC_LO: 0, DST_HI: 0, DST_LO: 0, TOS: 0, TTL: 0,
    SPORT: 0, DPORT: 0, TCPFL: 0, ICMP_TYPE: -1, ICMP_CODE: -1, ARP_OP: 0, ARP_SPA: 0,
    ARP_TPA: 0, ARP_SHA: 0,
}

PARSE_FLAGS = (F_QINQ | F_QINQ_C | F_ARP | F_IPV4 | F_IPV6 | F_TCP | F_UDP | F_ICMP
               | F_ICMP6 | F_FRAG | F_FRAG_LATER | F_IP_OPTS | F_IP6_EXT | F_BCAST
               | F_MCAST | F_TRUNC | F_BAD_IHL | F_BAD_LEN | F_RUNT)
PROTO_FLAGS = F_ARP | F_IPV4 | F_IPV6 | F_TCP | F_UDP | F_ICMP | F_ICMP6
# Flags the parser does not own; they must survive a parse untouched.
FOREIGN_FLAGS = F_SAFE | F_CLONE | F_INJECTED | F_CSUM_PARTIAL | F_CSUM_VALID

FLAG_NAMES = {
    F_VLAN: "VLAN", F_QINQ: "QINQ", F_QINQ_C: "QINQ_C", F_ARP: "ARP", F_IPV4: "IPV4",
    F_IPV6: "IPV6", F_TCP: "TCP", F_UDP: "UDP", F_ICMP: "ICMP", F_ICMP6: "ICMP6",
    F_FRAG: "FRAG", F_FRAG_LATER: "FRAG_LATER", F_IP_OPTS: "IP_OPTS",
    F_IP6_EXT: "IP6_EXT", F_BCAST: "BCAST", F_MCAST: "MCAST", F_TRUNC: "TRUNC",
    F_BAD_IHL: "BAD_IHL", F_BAD_LEN: "BAD_LEN", F_RUNT: "RUNT", F_SAFE: "SAFE",
    F_CLONE: "CLONE", F_INJECTED: "INJECTED", F_CSUM_PARTIAL: "CSUM_PARTIAL",
    F_CSUM_VALID: "CSUM_VALID",
}

MASK64 = (1 << 64) - 1
BCAST = "ff:ff:ff:ff:ff:ff"

FAST = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def flag_str(f: int) -> str:
    return "|".join(n for b, n in FLAG_NAMES.items() if f & b) or "0"


def mac_int(s: str) -> int:
    return int(s.replace(":", ""), 16)


def mac_str(v: int) -> str:
    return ":".join(f"{(v >> (8 * (5 - k))) & 0xFF:02x}" for k in range(6))


def ip4(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def ip6_halves(s: str) -> tuple[int, int]:
    v = int(ipaddress.IPv6Address(s))
    return v >> 64, v & MASK64


def u64(v: int) -> int:
    """Bit pattern of a signed int64 meta value."""
    return int(v) & MASK64


def tci_of(tag) -> int:
    return (tag.prio << 13) | (tag.dei << 12) | tag.vlan


def hdrlen(layer) -> int:
    """Length of one dissected scapy layer's own header (raw() includes any padding)."""
    return len(raw(layer)) - len(raw(layer.payload))


# --------------------------------------------------------------------------------
# Running the kernel

@pytest.fixture(scope="module", autouse=True)
def warm_numba():
    """Compile (or load from cache) the kernel once, outside any hypothesis deadline."""
    b = PacketBatch(capacity=4, arena=1024, max_dest=1)
    b.append_frames([raw(Ether(dst=BCAST, src="02:00:00:00:00:01")
                         / Dot1Q(vlan=5) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP()),
                     raw(Ether(dst=BCAST, src="02:00:00:00:00:01") / ARP()),
                     b"\x00" * 3])
    parse_batch(b.meta, b.data, 0, b.n)
    yield


def parse_frames(frames):
    """The API path: append frames to one batch and parse them all."""
    b = PacketBatch(capacity=max(1, len(frames)), arena=max(64, 128 * len(frames) +
                                                            sum(map(len, frames))),
                    max_dest=1)
    assert b.append_frames(list(frames)) == len(frames)
    parse_batch(b.meta, b.data, 0, b.n)
    return b


class Parsed:
    """One parse result: the meta column, the frame after parsing and the bytes around it."""

    def __init__(self, col, frame, lead, tail):
        self.col = col
        self.frame = frame
        self.lead = lead
        self.tail = tail

    def __getitem__(self, row):
        return self.col[row]

    @property
    def flags(self):
        return self.col[FLAGS]


def parse_placed(frame: bytes, lead: bytes, tail: bytes, flags=F_SAFE, tci=0,
                 garbage=0x5A5A5A5A5A5A5A5A) -> Parsed:
    """Parse ``frame`` sitting in an arena of exactly ``lead + frame + tail`` bytes.

    Meta rows the parser owns are pre-filled with ``garbage`` (a reused batch)."""
    buf = lead + frame + tail
    b = PacketBatch(capacity=1, arena=len(buf), max_dest=1)
    if buf:
        b.data[:] = np.frombuffer(buf, dtype=np.uint8)
    m = b.meta
    for row in CLEARED:
        m[row, 0] = garbage
    m[OFF, 0] = len(lead)
    m[LEN, 0] = len(frame)
    m[SAFE_LEN, 0] = len(frame)
    m[FLAGS, 0] = flags
    m[TCI, 0] = tci
    b.n = 1
    parse_batch(m, b.data, 0, 1)
    col = tuple(int(x) for x in m[:NFIELDS, 0])
    end = len(lead) + len(frame)
    return Parsed(col, b.frame(0), bytes(b.data[:len(lead)]), bytes(b.data[end:]))


LEAD = 16


def parse_robust(frame: bytes, flags=F_SAFE, tci=0, cont: bytes = b"",
                 extra_tail: bytes = b"") -> Parsed:
    """Parse ``frame`` with different bytes before and after it; all results must agree.

    The variants put the frame at the very end of the arena, before zeros, 0xff, a
    byte ramp, ``cont`` (typically the rest of the frame it was cut from, the most
    tempting thing to over-read) and ``extra_tail``. The bytes around the frame must
    not be written either."""
    ramp = bytes((0x80 + 7 * k) & 0xFF for k in range(96))
    variants = [
        (b"\x00" * LEAD, b""),
        (b"\xff" * LEAD, b"\x00" * 96),
        (b"\x00" * LEAD, b"\xff" * 96),
        (ramp[:LEAD], ramp),
        (b"\xa5" * LEAD, cont + b"\xff" * 32),
    ]
    if extra_tail:
        variants.append((b"\x00" * LEAD, extra_tail))
    results = []
    for k, (lead, tail) in enumerate(variants):
        r = parse_placed(frame, lead, tail, flags, tci, garbage=0x5A5A + 0x1111 * k)
        assert r.lead == lead, "parser wrote before the frame"
        assert r.tail == tail, "parser wrote after the frame"
        results.append(r)
    first = results[0]
    for (lead, tail), r in zip(variants[1:], results[1:]):
        if r.col != first.col or r.frame != first.frame:
            diff = {ROW_NAMES.get(j, j): (first.col[j], r.col[j])
                    for j in range(NFIELDS) if first.col[j] != r.col[j]}
            pytest.fail(f"parse depends on bytes outside the frame (tail {tail[:8].hex()}"
                        f"...): {diff}; frame {frame.hex()}")
    return first


# --------------------------------------------------------------------------------
# The oracle: what the parser must report, derived from scapy's dissection

class Expect:
    def __init__(self):
        self.rows: dict[int, int] = {}
        self.shift = 0          # 4 when the leading 802.1Q tag is popped
        self.frame = b""        # the frame after parsing
        self.need: list[tuple[int, int]] = []  # (min original length, flag if shorter)


def expect(frame: bytes, in_flags: int = F_SAFE, in_tci: int = 0) -> Expect:
    pkt = Ether(frame)
    assert raw(pkt) == frame, "scapy does not rebuild its dissection faithfully"
    n = len(frame)
    ex = Expect()
    e = dict(CLEARED)
    fl = in_flags & ~PARSE_FLAGS
    e[TCI] = in_tci
    ex.need.append((14, F_RUNT | F_TRUNC))
    e[DMAC] = mac_int(pkt.dst)
    e[SMAC] = mac_int(pkt.src)
    if e[DMAC] >> 40 & 1:
        fl |= F_MCAST
    if pkt.dst == BCAST:
        fl |= F_BCAST
    lay = pkt.payload
    shift = 0
    if isinstance(pkt, Dot3):       # 802.3: the type field is a length
        e[ETYPE] = pkt.len
        tags, tpid = [], None
    else:
        tags = []
        tpid = pkt.type
        while type(lay) in (Dot1Q, Dot1AD):
            tags.append((tpid, tci_of(lay)))
            tpid = lay.type
            lay = lay.payload
        if tags and tags[0][0] == 0x8100 and not in_flags & F_VLAN:
            ex.need.append((18, F_TRUNC))
            e[TCI] = tags.pop(0)[1]
            fl |= F_VLAN
            shift = 4
        p = 14
        if tags and tags[0][0] == 0x88A8:
            ex.need.append((p + 4 + shift, F_TRUNC))
            e[STAG] = tags.pop(0)[1]
            fl |= F_QINQ
            p += 4
        if tags and tags[0][0] == 0x8100:
            ex.need.append((p + 4 + shift, F_TRUNC))
            e[CTAG] = tags.pop(0)[1]
            fl |= F_QINQ_C
            p += 4
        if tags:                    # deeper stacks are not parsed
            e[ETYPE] = tags[0][0]
        else:
            e[ETYPE] = tpid
            assert n - len(raw(lay)) == p + shift
            fl = _expect_l3(ex, e, fl, tpid, lay, p, shift)
    e[FLAGS] = fl
    e[LEN] = n - shift
    e[SAFE_LEN] = n - shift
    ex.rows = e
    ex.shift = shift
    ex.frame = frame[:12] + frame[16:] if shift else frame
    return ex


def _expect_l3(ex, e, fl, etype, lay, p, shift):
    if etype == 0x0806:
        assert isinstance(lay, ARP)
        e[L3OFF] = p
        e[ARP_OP] = lay.op
        ex.need.append((p + 8 + shift, F_TRUNC))
        if lay.hwtype == 1 and lay.ptype == 0x0800 and lay.hwlen == 6 and lay.plen == 4:
            ex.need.append((p + 28 + shift, F_TRUNC))
            e[ARP_SHA] = mac_int(lay.hwsrc)
            e[ARP_SPA] = ip4(lay.psrc)
            e[ARP_TPA] = ip4(lay.pdst)
            fl |= F_ARP
        return fl
    if etype == 0x0800:
        assert type(lay) is IP
        ihl = lay.ihl * 4
        assert hdrlen(lay) == ihl
        ex.need += [(p + 20 + shift, F_TRUNC), (p + ihl + shift, F_TRUNC),
                    (p + lay.len + shift, F_BAD_LEN)]
        e[L3OFF] = p
        fl |= F_IPV4
        if ihl > 20:
            fl |= F_IP_OPTS
        e[TOS] = lay.tos
        e[TTL] = lay.ttl
        e[PROTO] = lay.proto
        e[SRC_LO] = ip4(lay.src)
        e[DST_LO] = ip4(lay.dst)
        if lay.flags.MF or lay.frag:
            fl |= F_FRAG
        if lay.frag:
            return fl | F_FRAG_LATER
        return _expect_l4(e, fl, lay.proto, lay.payload, p + ihl, False)
    if etype == 0x86DD:
        assert type(lay) is IPv6
        ex.need += [(p + 40 + shift, F_TRUNC), (p + 40 + lay.plen + shift, F_BAD_LEN)]
        e[L3OFF] = p
        fl |= F_IPV6
        e[TOS] = lay.tc
        e[TTL] = lay.hlim
        e[SRC_HI], e[SRC_LO] = ip6_halves(lay.src)
        e[DST_HI], e[DST_LO] = ip6_halves(lay.dst)
        end = p + 40 + lay.plen
        nh, q, cur = lay.nh, p + 40, lay.payload
        while nh in (0, 43, 44, 51, 60):
            fl |= F_IP6_EXT
            if nh == 51:            # scapy stops dissecting after AH: re-dissect the rest
                assert isinstance(cur, AH)
                assert hdrlen(cur) == (cur.payloadlen + 2) * 4
                rest = ex_frame_slice(cur, q, end)
                nh, q = cur.nh, q + (cur.payloadlen + 2) * 4
                cur = IPv6(raw(IPv6(nh=nh, plen=len(rest))) + rest).payload
                continue
            assert isinstance(cur, {0: IPv6ExtHdrHopByHop, 43: IPv6ExtHdrRouting,
                                    44: IPv6ExtHdrFragment, 60: IPv6ExtHdrDestOpt}[nh])
            if nh == 44:
                fl |= F_FRAG
                if cur.offset:
                    e[PROTO] = cur.nh
                    return fl | F_FRAG_LATER
            nh, q, cur = cur.nh, q + hdrlen(cur), cur.payload
        assert q <= end
        e[PROTO] = nh
        return _expect_l4(e, fl, nh, cur, q, True)
    return fl


def ex_frame_slice(ah, q, end):
    """Bytes of the IPv6 payload behind an AH header (without Ethernet padding)."""
    behind = raw(ah.payload)
    return behind[:end - q - (ah.payloadlen + 2) * 4]


def _expect_l4(e, fl, proto, lay, l4, v6):
    e[L4OFF] = l4
    if proto == 6:
        assert isinstance(lay, TCP)
        e[SPORT], e[DPORT] = lay.sport, lay.dport
        e[TCPFL] = int(lay.flags)
        e[PAYOFF] = l4 + lay.dataofs * 4
        return fl | F_TCP
    if proto == 17:
        assert isinstance(lay, UDP)
        e[SPORT], e[DPORT] = lay.sport, lay.dport
        e[PAYOFF] = l4 + 8
        return fl | F_UDP
    if proto == 1 and not v6:
        assert isinstance(lay, ICMP)
        e[ICMP_TYPE], e[ICMP_CODE] = lay.type, lay.code
        e[PAYOFF] = l4 + 4
        return fl | F_ICMP
    if proto == 58 and v6:
        if not any(f.name == "type" for f in lay.fields_desc):
            # scapy lost its way in this extension-header chain (it left the ICMPv6
            # header as Raw, at an offset it computed differently): no reference
            reject()
        e[ICMP_TYPE], e[ICMP_CODE] = lay.type, lay.code
        e[PAYOFF] = l4 + 4
        return fl | F_ICMP6
    return fl


def assert_matches(got: Parsed, ex: Expect, base: int, what: bytes):
    bad = {}
    for row, want in ex.rows.items():
        have = got[row]
        if u64(have) != u64(want):
            bad[ROW_NAMES.get(row, row)] = (hex(u64(have)), hex(u64(want)))
    if got[OFF] != base + ex.shift:
        bad["OFF"] = (got[OFF], base + ex.shift)
    if bad:
        pytest.fail(f"parser vs scapy (got, want): {bad}\nflags got "
                    f"{flag_str(got.flags)} want {flag_str(ex.rows[FLAGS])}\n"
                    f"frame {what.hex()}\n{Ether(what).summary()}")
    assert got.frame == ex.frame


# --------------------------------------------------------------------------------
# Strategies: random valid frames built with scapy

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ip4_addr = u32.map(lambda v: str(ipaddress.IPv4Address(v)))
ip6_addr = st.one_of(
    st.integers(0, (1 << 128) - 1),
    st.sampled_from(["ff02::1", "fe80::1", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                     "8000::1", "::8000:0:0:1"]).map(lambda s: int(ipaddress.IPv6Address(s))),
).map(lambda v: str(ipaddress.IPv6Address(v)))
dmac = st.one_of(
    st.just(BCAST),
    st.integers(0, (1 << 48) - 1).map(mac_str),
    st.integers(0, 0x7FFFFF).map(lambda v: mac_str(0x01005E000000 | v)),
    st.integers(0, 0xFFFFFFFF).map(lambda v: mac_str(0x333300000000 | v)),
    st.integers(0, (1 << 40) - 1).map(lambda v: mac_str(0x020000000000 | v)),
)
smac = st.integers(0, (1 << 48) - 1).map(mac_str)
payload = st.binary(max_size=40)
# fragment offsets (8-byte units), with the bit patterns a mask bug would miss
frag_offset = st.sampled_from([1, 0x1000, 0x1FFF]) | st.integers(1, 0x1FFF)
tag = st.builds(lambda prio, dei, vid: (prio, dei, vid),
                st.integers(0, 7), st.integers(0, 1), st.integers(0, 4095))

L2_SHAPES = ["none", "q", "ad", "ad_q", "q_q", "q_ad_q"]
L2_TPIDS = {"none": [], "q": [0x8100], "ad": [0x88A8], "ad_q": [0x88A8, 0x8100],
            "q_q": [0x8100, 0x8100], "q_ad_q": [0x8100, 0x88A8, 0x8100]}


@st.composite
def tcp_layer(draw):
    opt = st.sampled_from([
        ("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""),
        ("Timestamp", (123456, 654321)), ("MSS", 536), ("WScale", 14)])
    return TCP(sport=draw(u16), dport=draw(u16), seq=draw(u32), ack=draw(u32),
               flags=draw(st.integers(0, 0x1FF)), window=draw(u16),
               urgptr=draw(u16), options=draw(st.lists(opt, max_size=4))) / draw(payload)


@st.composite
def udp_layer(draw):
    return UDP(sport=draw(u16), dport=draw(u16)) / draw(payload)


@st.composite
def icmp_layer(draw):
    t = draw(st.one_of(st.sampled_from([0, 8]), u8))
    pl = draw(payload) if t in (0, 8) else b""
    return ICMP(type=t, code=draw(u8), id=draw(u16), seq=draw(u16)) / pl


@st.composite
def icmp6_layer(draw):
    kind = draw(st.sampled_from(["echo", "reply", "ra", "redirect"]))
    if kind == "echo":
        return ICMPv6EchoRequest(id=draw(u16), seq=draw(u16), data=draw(payload))
    if kind == "reply":
        return ICMPv6EchoReply(code=draw(u8), id=draw(u16), seq=draw(u16),
                               data=draw(payload))
    if kind == "ra":
        ra = ICMPv6ND_RA(chlim=draw(u8), M=draw(st.integers(0, 1)),
                         O=draw(st.integers(0, 1)), routerlifetime=draw(u16))
        if draw(st.booleans()):
            ra = ra / ICMPv6NDOptSrcLLAddr(lladdr=draw(smac))
        if draw(st.booleans()):
            ra = ra / ICMPv6NDOptPrefixInfo(prefix="2001:db8::")
        return ra
    rd = ICMPv6ND_Redirect(tgt=draw(ip6_addr), dst=draw(ip6_addr))
    if draw(st.booleans()):
        rd = rd / ICMPv6NDOptSrcLLAddr(lladdr=draw(smac))
    return rd


ip_option = st.one_of(
    st.just(b"\x01"),                                   # NOP
    st.just(b"\x94\x04\x00\x00"),                       # router alert
    st.tuples(st.sampled_from([0x1E, 0x5E, 0x9E, 0xDE]), st.binary(max_size=6))
    .map(lambda t: bytes([t[0], 2 + len(t[1])]) + t[1]),
)


@st.composite
def ipv4_packet(draw, l4=None):
    opts = []
    olen = 0
    for o in draw(st.lists(ip_option, max_size=6)):
        if olen + len(o) <= 40:
            opts.append(IPOption(o))
            olen += len(o)
    frag = draw(st.sampled_from(["none", "df", "first"] + ([] if l4 else ["later", "last"])))
    flags = {"none": 0, "df": 2, "first": 1, "later": draw(st.sampled_from([0, 1])),
             "last": 0}[frag]
    offset = draw(frag_offset) if frag in ("later", "last") else 0
    ip = IP(src=draw(ip4_addr), dst=draw(ip4_addr), tos=draw(u8), ttl=draw(u8),
            id=draw(u16), flags=flags, frag=offset, options=opts)
    if offset:
        ip.proto = draw(st.sampled_from([1, 6, 17, 47]))
        return ip / Raw(draw(st.binary(min_size=1, max_size=40)))
    kind = l4 or draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    if kind == "other":
        ip.proto = draw(st.sampled_from([47, 58, 132, 253, 255]))
        return ip / Raw(draw(payload))
    return ip / draw({"tcp": tcp_layer(), "udp": udp_layer(), "icmp": icmp_layer()}[kind])


@st.composite
def ipv6_packet(draw, l4=None, exts=("hbh", "rt", "dst", "frag0", "ah"), min_ext=0):
    chain = draw(st.lists(st.sampled_from(exts), min_size=min_ext, max_size=4))
    later = not l4 and draw(st.booleans()) and draw(st.booleans())  # 1 in 4: later fragment
    if later:
        chain.append("fragn")
        tail = Raw(draw(st.binary(min_size=1, max_size=40)))
        last_nh = draw(st.sampled_from([6, 17, 58, 59]))
    else:
        kind = l4 or draw(st.sampled_from(["tcp", "udp", "icmp6", "other"]))
        if kind == "other":
            last_nh = draw(st.sampled_from([1, 47, 59, 132, 253]))
            tail = Raw(draw(payload))
        else:
            last_nh = {"tcp": 6, "udp": 17, "icmp6": 58}[kind]
            tail = draw({"tcp": tcp_layer(), "udp": udp_layer(),
                         "icmp6": icmp6_layer()}[kind])
    numbers = {"hbh": 0, "rt": 43, "dst": 60, "frag0": 44, "fragn": 44, "ah": 51}
    nhs = [numbers[c] for c in chain] + [last_nh]
    pkt = IPv6(src=draw(ip6_addr), dst=draw(ip6_addr), tc=draw(u8),
               fl=draw(st.integers(0, 0xFFFFF)), hlim=draw(u8), nh=nhs[0])
    for c, nh in zip(chain, nhs[1:]):
        if c in ("hbh", "dst"):
            cls = IPv6ExtHdrHopByHop if c == "hbh" else IPv6ExtHdrDestOpt
            opts = draw(st.sampled_from([[], "padn", [RouterAlert()]]))
            if opts == "padn":
                opts = [PadN(optdata=b"\x00" * draw(st.integers(0, 20)))]
            h = cls(nh=nh, options=opts)
        elif c == "rt":
            h = IPv6ExtHdrRouting(nh=nh, addresses=draw(st.lists(ip6_addr, max_size=3)),
                                  segleft=draw(st.integers(0, 3)))
        elif c == "frag0":
            h = IPv6ExtHdrFragment(nh=nh, offset=0, m=draw(st.integers(0, 1)),
                                   id=draw(u32))
        elif c == "fragn":
            h = IPv6ExtHdrFragment(nh=nh, offset=draw(frag_offset),
                                   m=draw(st.integers(0, 1)), id=draw(u32))
        else:
            icv = b"\x00" * draw(st.sampled_from([4, 12, 20]))
            h = AH(nh=nh, payloadlen=(12 + len(icv)) // 4 - 2, spi=draw(u32),
                   seq=draw(u32), icv=icv)
        pkt = pkt / h
    return pkt / tail


@st.composite
def arp_packet(draw):
    arp = ARP(op=draw(st.one_of(st.sampled_from([1, 2]), u16)), hwsrc=draw(smac),
               hwdst=draw(smac), psrc=draw(ip4_addr), pdst=draw(ip4_addr))
    if draw(st.integers(0, 4)) == 0:    # not Ethernet: only the op is reported
        b = bytearray(raw(arp))
        b[0:2] = draw(st.sampled_from([0, 6, 0x10, 0xFFFF])).to_bytes(2, "big")
        return Raw(bytes(b))
    return arp


@st.composite
def valid_frames(draw, l3=None, **kw):
    """A random valid frame; ``l3``/``kw`` narrow it (l4="tcp", min_ext=1...)."""
    shape = draw(st.sampled_from(L2_SHAPES))
    tpids = L2_TPIDS[shape]
    kind = l3 or draw(st.sampled_from(["ipv4", "ipv6", "arp", "other", "dot3"]))
    if kind == "dot3":
        tpids = []
    inner = {"ipv4": ipv4_packet, "ipv6": ipv6_packet, "arp": arp_packet}.get(kind)
    if inner is not None:
        l3pkt = draw(inner(**kw))
        etype = {"ipv4": 0x0800, "ipv6": 0x86DD, "arp": 0x0806}[kind]
    elif kind == "other":
        etype = draw(st.sampled_from([0x88CC, 0x8847, 0x22F0, 0x9000, 0x0600, 0xFFFF]))
        l3pkt = Raw(draw(payload))
    else:
        etype = draw(st.integers(0, 1500))
        l3pkt = Raw(draw(st.binary(min_size=etype, max_size=etype)))
    types_ = tpids + [etype]
    pkt = Ether(dst=draw(dmac), src=draw(smac), type=types_[0])
    for k, _ in enumerate(tpids):
        prio, dei, vid = draw(tag)
        cls = Dot1AD if tpids[k] == 0x88A8 else Dot1Q
        pkt = pkt / cls(prio=prio, dei=dei, vlan=vid, type=types_[k + 1])
    frame = raw(pkt / l3pkt)
    return frame + draw(st.binary(max_size=24))    # Ethernet padding / trailer


def in_flags_st():
    """Flags a packet may carry into the parser: foreign bits, stale parse bits and,
    1 time in 5, F_VLAN (a tag already out of band)."""
    return st.tuples(st.integers(0, (1 << 25) - 1), st.integers(0, 4)).map(
        lambda t: F_SAFE | (t[0] & (FOREIGN_FLAGS | PARSE_FLAGS))
        | (F_VLAN if t[1] == 0 else 0))


# --------------------------------------------------------------------------------
# 1. Valid frames: parser vs scapy

@settings(FAST, max_examples=400)
@given(frame=st.sampled_from(["ipv4", "ipv6", "ipv4", "ipv6", "arp", "other", "dot3"])
       .flatmap(lambda l3: valid_frames(l3=l3)), flags=in_flags_st(), tci=u16)
def test_valid_frames_match_scapy(frame, flags, tci):
    """Every field and flag as scapy dissects the frame. Only parse-owned flags change
    (stale ones are cleared, foreign ones kept); with F_VLAN already set the leading
    802.1Q tag is not popped again and is reported inline as CTAG."""
    ex = expect(frame, in_flags=flags, in_tci=tci)
    got = parse_robust(frame, flags=flags, tci=tci)
    assert_matches(got, ex, LEAD, frame)
    assert got.flags & FOREIGN_FLAGS == flags & FOREIGN_FLAGS
    check_offsets_inside(got)


@settings(FAST, max_examples=200)
@given(frames=st.lists(valid_frames(), min_size=1, max_size=4))
def test_batch_api_path(frames):
    """append_frames + parse_batch over a whole batch: each packet as scapy says, a
    leading 802.1Q tag removed from the frame bytes; parsing again changes nothing."""
    b = parse_frames(frames)
    offs = []
    for i, f in enumerate(frames):
        ex = expect(f)
        col = tuple(int(x) for x in b.meta[:NFIELDS, i])
        got = Parsed(col, b.frame(i), b"", b"")
        base = got[OFF] - ex.shift
        offs.append(base)
        assert_matches(got, ex, base, f)
        if ex.shift:
            assert got[TCI] == int.from_bytes(f[14:16], "big")
            assert b.frame(i) == f[:12] + f[16:]
        else:
            assert b.frame(i) == f
    assert offs == sorted(offs) and len(set(offs)) == len(offs)
    # idempotent: the tag is not popped twice, nothing else moves
    meta1, data1 = b.meta.copy(), b.data.copy()
    parse_batch(b.meta, b.data, 0, b.n)
    assert np.array_equal(b.meta, meta1)
    assert np.array_equal(b.data, data1)


def test_start_stop_range_only():
    f = raw(Ether(dst=BCAST, src="02:00:00:00:00:01") / Dot1Q(vlan=9)
            / IP(src="10.0.0.1", dst="10.0.0.2") / UDP())
    b = PacketBatch(capacity=4, arena=4096, max_dest=1)
    b.append_frames([f, f, f, f])
    before = b.meta.copy()
    parse_batch(b.meta, b.data, 1, 3)
    assert np.array_equal(b.meta[:, 0], before[:, 0])
    assert np.array_equal(b.meta[:, 3], before[:, 3])
    assert b.frame(0) == f and b.frame(3) == f
    for i in (1, 2):
        assert b.meta[FLAGS, i] & (F_VLAN | F_IPV4 | F_UDP) == F_VLAN | F_IPV4 | F_UDP
        assert b.meta[TCI, i] == 9
        assert b.frame(i) == f[:12] + f[16:]


def test_known_values():
    """A hand-checked frame, independent of the scapy oracle."""
    f = raw(Ether(dst="01:00:5e:00:00:fb", src="02:11:22:33:44:55")
            / Dot1Q(prio=5, dei=1, vlan=0x123)
            / IPv6(src="2001:db8::1", dst="ff02::fb", tc=0xB8, hlim=255)
            / IPv6ExtHdrHopByHop(options=[RouterAlert()])
            / UDP(sport=5353, dport=5353) / b"q")
    r = parse_robust(f)
    assert r[TCI] == (5 << 13) | (1 << 12) | 0x123
    assert r.frame == f[:12] + f[16:]
    assert r[DMAC] == 0x01005E0000FB and r[SMAC] == 0x021122334455
    assert r[ETYPE] == 0x86DD and r[L3OFF] == 14 and r[L4OFF] == 62 and r[PAYOFF] == 70
    assert r[PROTO] == 17 and r[TOS] == 0xB8 and r[TTL] == 255
    assert u64(r[SRC_HI]) == 0x20010DB800000000 and u64(r[SRC_LO]) == 1
    assert u64(r[DST_HI]) == 0xFF02000000000000 and r[DST_HI] < 0 and u64(r[DST_LO]) == 0xFB
    assert r[SPORT] == 5353 and r[DPORT] == 5353
    assert r.flags == F_SAFE | F_VLAN | F_IPV6 | F_IP6_EXT | F_UDP | F_MCAST
    assert r[LEN] == len(f) - 4 and r[OFF] == LEAD + 4 and r[SAFE_LEN] == len(f) - 4


def test_qinq_known_values():
    f = raw(Ether(dst=BCAST, src="02:00:00:00:00:01") / Dot1AD(prio=1, vlan=100)
            / Dot1Q(prio=2, dei=1, vlan=200) / ARP(op=2, hwsrc="02:aa:bb:cc:dd:ee",
                                                    psrc="192.0.2.1", pdst="192.0.2.2"))
    r = parse_robust(f)
    assert r.frame == f and r[TCI] == 0
    assert r[STAG] == (1 << 13) | 100 and r[CTAG] == (2 << 13) | (1 << 12) | 200
    assert r[ETYPE] == 0x0806 and r[L3OFF] == 22 and r[ARP_OP] == 2
    assert r[ARP_SHA] == 0x02AABBCCDDEE and r[ARP_SPA] == 0xC0000201
    assert r[ARP_TPA] == 0xC0000202
    assert r.flags == F_SAFE | F_QINQ | F_QINQ_C | F_ARP | F_BCAST | F_MCAST


def test_mobility_header_chain():
    """MH (135) is walked as an extension header: (len + 1) * 8 bytes."""
    e = Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
    mh = bytes([6, 1, 0, 0]) + b"\x00" * 12      # nh=TCP, 16 bytes
    f = raw(e / IPv6(src="::1", dst="::2", nh=135) / Raw(mh + raw(TCP(sport=7, dport=9))))
    r = parse_robust(f)
    assert r.flags & (F_IPV6 | F_IP6_EXT | F_TCP) == F_IPV6 | F_IP6_EXT | F_TCP
    assert r[L4OFF] == 14 + 40 + 16 and r[SPORT] == 7 and r[DPORT] == 9


# --------------------------------------------------------------------------------
# 2. Malformed and hostile frames

def check_offsets_inside(got: Parsed):
    ln = got[LEN]
    for row in (L3OFF, L4OFF, PAYOFF):
        assert got[row] == -1 or 0 <= got[row] <= ln, ROW_NAMES[row]
    if got[L4OFF] != -1:
        assert got[L3OFF] != -1 and got[L3OFF] < got[L4OFF]
    if got[PAYOFF] != -1:
        assert got[L4OFF] != -1 and got[L4OFF] < got[PAYOFF]
    assert bool(got.flags & F_RUNT) == (ln < 14)


def check_truncation(full: bytes, n: int):
    """``full[:n]`` followed in the arena by the rest of ``full``."""
    ex = expect(full)
    got = parse_robust(full[:n], cont=full[n:])
    want_bad = next((flag for m, flag in ex.need if n < m), 0)
    assert got.flags & F_MALFORMED == want_bad, (
        f"prefix {n}/{len(full)}: got {flag_str(got.flags)}, want {flag_str(want_bad)}; "
        f"frame {full.hex()}")
    if want_bad:
        assert got.flags & PROTO_FLAGS == 0
        if n < 14:
            assert all(got[r] == v for r, v in CLEARED.items()) and got.frame == full[:n]
        elif n < 18 and ex.shift:
            assert got.frame == full[:n] and got[TCI] == 0 and not got.flags & F_VLAN
            assert got[ETYPE] == 0x8100
    else:
        ex.rows[LEN] = ex.rows[SAFE_LEN] = n - ex.shift
        ex.frame = ex.frame[:n - ex.shift]
        assert_matches(got, ex, LEAD, full[:n])
    check_offsets_inside(got)


def _fixed_frames():
    e = Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
    a4 = dict(src="10.0.0.1", dst="10.0.0.2")
    a6 = dict(src="2001:db8::1", dst="ff02::1")
    return [
        raw(e / Dot1Q(vlan=7) / IP(options=[IPOption(b"\x94\x04\x00\x00"),
                                            IPOption(b"\x01")], **a4)
            / TCP(options=[("MSS", 1460), ("Timestamp", (1, 2))]) / b"data"),
        raw(e / Dot1AD(vlan=100, type=0x8100) / Dot1Q(vlan=200) / IPv6(**a6)
            / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:db8::1"])
            / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrDestOpt() / TCP() / b"xy"),
        raw(Ether(dst=BCAST, src="02:00:00:00:00:01") / ARP(psrc="10.0.0.1",
                                                          pdst="10.0.0.2")) + b"\x00" * 18,
        raw(e / IP(**a4) / UDP() / b"hello") + b"\x00" * 6,
        raw(e / IP(**a4) / ICMP() / b"ping"),
        raw(e / IPv6(**a6) / IPv6ExtHdrFragment(offset=100, nh=6) / Raw(b"abcdefgh")),
        raw(e / IPv6(**a6) / AH(nh=58, payloadlen=4, icv=b"\x00" * 12)
            / ICMPv6EchoRequest(data=b"ping")),
        raw(e / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP(frag=10, proto=6, **a4) / Raw(b"y" * 12)),
    ]


FIXED = _fixed_frames()


FIXED_IDS = ["q-ipv4opts-tcp", "ad-q-ipv6chain-tcp", "arp-padded", "ipv4-udp-padded",
             "ipv4-icmp", "ipv6-frag-later", "ipv6-ah-icmpv6", "q-q-ipv4-frag-later"]


@pytest.mark.parametrize("k", range(len(FIXED)), ids=FIXED_IDS)
def test_every_prefix(k):
    """Every prefix of a few frames, followed in the arena by the bytes it was cut from."""
    full = FIXED[k]
    for n in range(len(full) + 1):
        check_truncation(full, n)


@settings(FAST, max_examples=300)
@given(data=st.data(), full=valid_frames())
def test_random_truncations(data, full):
    n = data.draw(st.integers(0, len(full)))
    check_truncation(full, n)


def test_runts():
    for n in range(14):
        got = parse_robust(b"\x01" * n)
        assert got.flags & F_MALFORMED == F_RUNT | F_TRUNC
        assert got[LEN] == n and got[DMAC] == 0 and got[ETYPE] == 0


interesting = st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00",
                               b"\x88\xa8"])


@st.composite
def hostile_bytes(draw):
    """Random bytes, half of them with an interesting EtherType and IP version."""
    f = bytearray(draw(st.binary(max_size=200)))
    if len(f) >= 15 and draw(st.booleans()):
        f[12:14] = draw(interesting)
        f[14] = draw(st.sampled_from([0x45, 0x4F, 0x60, 0x46, 0x44, 0x08, 0x86]))
    return bytes(f)


@settings(FAST, max_examples=300)
@given(frame=hostile_bytes(), tail=st.binary(min_size=1, max_size=64),
       flags=in_flags_st())
def test_random_bytes(frame, tail, flags):
    got = parse_robust(frame, flags=flags, extra_tail=tail)
    check_offsets_inside(got)
    if len(frame) < 14:
        assert got.flags & F_MALFORMED == F_RUNT | F_TRUNC
        assert all(got[r] == v for r, v in CLEARED.items())
    assert got.flags & FOREIGN_FLAGS == flags & FOREIGN_FLAGS


@st.composite
def mutated_frames(draw):
    """Valid frames with a few header bytes overwritten, then cut somewhere."""
    f = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, min(len(f) - 1, 90)))
        f[pos] = draw(u8)
    cut = draw(st.integers(0, len(f)))
    return bytes(f), cut


@settings(FAST, max_examples=300)
@given(mf=mutated_frames())
def test_mutated_frames(mf):
    f, cut = mf
    got = parse_robust(f[:cut], cont=f[cut:])
    check_offsets_inside(got)


def locate(frame: bytes, cls):
    """Offset of the (first) IP header in the original frame, and scapy's view of it."""
    ex = expect(frame)                  # also checks scapy's dissection is faithful
    lay = Ether(frame).getlayer(cls)
    assert lay is not None and ex.rows[L3OFF] >= 0
    return ex.rows[L3OFF] + ex.shift, lay


def ip_end(frame: bytes, ex: Expect) -> int:
    """End of the IP packet in the original frame (from the IP length field)."""
    pkt = Ether(frame)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    return ex.rows[L3OFF] + ex.shift + (ip.len if isinstance(ip, IP) else 40 + ip.plen)


def put16(f: bytearray, at: int, v: int):
    f[at:at + 2] = v.to_bytes(2, "big")


IPV4_CORRUPTIONS = ["ihl", "version", "tot_small", "tot_big", "tot_cuts_l4"]


@settings(FAST, max_examples=300)
@given(data=st.data(), kind=st.sampled_from(IPV4_CORRUPTIONS))
def test_ipv4_header_corruption(data, kind):
    """IHL < 5 and a wrong version: F_BAD_IHL. Total length below the header or past
    the frame: F_BAD_LEN. Total length too short for the L4 header: F_TRUNC."""
    l4 = data.draw(st.sampled_from(["tcp", "udp", "icmp"])) if kind == "tot_cuts_l4" else None
    frame = data.draw(valid_frames(l3="ipv4", **({"l4": l4} if l4 else {})))
    off, ip = locate(frame, IP)
    shift = expect(frame).shift
    ihl = ip.ihl * 4
    f = bytearray(frame)
    if kind == "ihl":
        f[off] = 0x40 | data.draw(st.integers(0, 4))
    elif kind == "version":
        f[off] = (data.draw(st.integers(0, 15).filter(lambda v: v != 4)) << 4) | f[off] & 15
    elif kind == "tot_small":
        put16(f, off + 2, data.draw(st.integers(0, ihl - 1)))
    elif kind == "tot_big":
        put16(f, off + 2, data.draw(st.integers(len(frame) - off + 1, 0xFFFF)))
    else:
        need = {6: 20, 17: 8, 1: 4}[ip.proto]
        put16(f, off + 2, ihl + data.draw(st.integers(0, need - 1)))
    got = parse_robust(bytes(f))
    assert got[L3OFF] == off - shift
    if kind == "tot_cuts_l4":
        assert got.flags & F_MALFORMED == F_TRUNC
        assert got.flags & PROTO_FLAGS == F_IPV4
        assert got[L4OFF] == off - shift + ihl and got[PAYOFF] == -1 and got[SPORT] == 0
        return
    want = F_BAD_IHL if kind in ("ihl", "version") else F_BAD_LEN
    assert got.flags & F_MALFORMED == want
    assert got.flags & PROTO_FLAGS == 0
    assert got[L4OFF] == -1 and got[PROTO] == -1 and got[SRC_LO] == 0


IPV6_CORRUPTIONS = ["version", "plen_big", "ext_len", "plen_cuts_ext"]


@settings(FAST, max_examples=300)
@given(data=st.data(), kind=st.sampled_from(IPV6_CORRUPTIONS))
def test_ipv6_header_corruption(data, kind):
    """A wrong version: F_BAD_IHL. Payload length past the frame: F_BAD_LEN. An
    extension header length running past the payload: F_BAD_LEN|F_IP6_EXT. Payload
    length too short for the first extension header: F_TRUNC|F_IP6_EXT."""
    if kind == "ext_len":
        frame = data.draw(valid_frames(l3="ipv6", exts=("hbh", "rt", "dst", "frag0"),
                                       min_ext=1))
    elif kind == "plen_cuts_ext":
        frame = data.draw(valid_frames(l3="ipv6", min_ext=1))
    else:
        frame = data.draw(valid_frames(l3="ipv6"))
    off, ip6 = locate(frame, IPv6)
    f = bytearray(frame)
    if kind == "version":
        f[off] = (data.draw(st.integers(0, 15).filter(lambda v: v != 6)) << 4) | f[off] & 15
        want = F_BAD_IHL
    elif kind == "plen_big":
        put16(f, off + 4, data.draw(st.integers(len(frame) - off - 40 + 1, 0xFFFF)))
        want = F_BAD_LEN
    elif kind == "plen_cuts_ext":
        assert ip6.nh in (0, 43, 44, 51, 60)
        put16(f, off + 4, data.draw(st.integers(0, 7)))
        want = F_TRUNC
    else:
        exts = [lay for lay in Ether(frame).iterpayloads()
                if isinstance(lay, (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
                                    IPv6ExtHdrDestOpt))]
        assume(exts)                    # a chain of fragment headers only
        h = data.draw(st.sampled_from(exts))
        at = len(frame) - len(raw(h))
        end = off + 40 + ip6.plen
        # (hl + 1) * 8 > end - at  <=>  hl >= (end - at) // 8
        f[at + 1] = data.draw(st.integers((end - at) // 8, 255))
        want = F_BAD_LEN
    got = parse_robust(bytes(f))
    assert got.flags & F_MALFORMED == want
    if kind in ("version", "plen_big"):
        assert got.flags & PROTO_FLAGS == 0 and not got.flags & F_IP6_EXT
    else:
        assert got.flags & PROTO_FLAGS == F_IPV6 and got.flags & F_IP6_EXT
        assert got[L4OFF] == -1
    if kind == "plen_cuts_ext":
        assert got[PROTO] == ip6.nh


@settings(FAST, max_examples=300)
@given(data=st.data(), l3=st.sampled_from(["ipv4", "ipv6"]),
       kind=st.sampled_from(["doff_small", "doff_big", "udp_len"]))
def test_l4_header_corruption(data, l3, kind):
    """TCP data offset < 5 or past the IP payload: F_BAD_LEN and no F_TCP. UDP length
    < 8 or past the IP payload: F_UDP|F_BAD_LEN; 0 (jumbogram / GSO) is accepted."""
    frame = data.draw(valid_frames(l3=l3, l4="udp" if kind == "udp_len" else "tcp"))
    ex = expect(frame)
    l4 = ex.rows[L4OFF] + ex.shift
    room = ip_end(frame, ex) - l4
    f = bytearray(frame)
    if kind == "udp_len":
        assert ex.rows[FLAGS] & F_UDP
        ulen = data.draw(st.integers(1, 7) | st.integers(room + 1, 0xFFFF) | st.just(0))
        put16(f, l4 + 4, ulen)
        got = parse_robust(bytes(f))
        assert got.flags & F_MALFORMED == (0 if ulen == 0 else F_BAD_LEN)
        assert got.flags & PROTO_FLAGS == F_UDP | (F_IPV4 if l3 == "ipv4" else F_IPV6)
        assert got[SPORT] == ex.rows[SPORT] and got[PAYOFF] == ex.rows[PAYOFF]
        return
    assert ex.rows[FLAGS] & F_TCP
    if kind == "doff_small":
        doff = data.draw(st.integers(0, 4))
    else:
        assume(room < 60)
        doff = data.draw(st.integers(room // 4 + 1, 15))
    f[l4 + 12] = (doff << 4) | (f[l4 + 12] & 0x0F)
    got = parse_robust(bytes(f))
    assert got.flags & F_MALFORMED == F_BAD_LEN
    assert got.flags & PROTO_FLAGS == (F_IPV4 if l3 == "ipv4" else F_IPV6)
    assert got[SPORT] == 0 and got[PAYOFF] == -1 and got[L4OFF] == l4 - ex.shift


# --------------------------------------------------------------------------------
# Corrupt OFF/LEN: the frame lies (partly) outside the arena

ARENA_SZ = 160


@st.composite
def off_len(draw):
    """OFF/LEN pairs: inside the arena, running just past its end, or anywhere."""
    kind = draw(st.sampled_from(["inside", "past_end", "negative", "anywhere",
                                 "wraps"]))
    if kind == "wraps":     # OFF + LEN overflows int64 (OFF small: a regression reads
        off = draw(st.integers(1, ARENA_SZ))    # near the arena, it does not crash)
        return off, draw(st.integers(2**63 - off, 2**63 - 1))
    if kind == "inside":
        off = draw(st.integers(0, ARENA_SZ))
        return off, draw(st.integers(0, ARENA_SZ - off))
    if kind == "past_end":
        off = draw(st.integers(0, ARENA_SZ + 64))
        return off, max(0, ARENA_SZ - off) + draw(st.integers(1, 64))
    if kind == "negative":
        return (draw(st.integers(-2**40, -1)), draw(st.integers(-2**40, 2**40))) \
            if draw(st.booleans()) else \
            (draw(st.integers(0, ARENA_SZ)), draw(st.integers(-2**40, -1)))
    return draw(st.integers(-2**40, 2**40)), draw(st.integers(-2**40, 2**40))


@settings(FAST, max_examples=300)
@given(frame=st.sampled_from(FIXED) | st.binary(max_size=ARENA_SZ),
       at=st.integers(0, ARENA_SZ), filler=u8, ol=off_len())
def test_corrupt_off_len(frame, at, filler, ol):
    """OFF/LEN that put the frame (partly) outside the arena: F_RUNT|F_TRUNC, nothing
    parsed, nothing written. In range: the same result as those bytes anywhere else."""
    off, ln = ol
    b = PacketBatch(capacity=1, arena=ARENA_SZ, max_dest=1)
    body = (bytes([filler]) * at + frame + bytes([filler]) * ARENA_SZ)[:ARENA_SZ]
    b.data[:] = np.frombuffer(body, dtype=np.uint8)
    m = b.meta
    m[OFF, 0], m[LEN, 0], m[FLAGS, 0], m[SAFE_LEN, 0] = off, ln, F_SAFE, max(ln, 0)
    b.n = 1
    parse_batch(m, b.data, 0, 1)
    flags = int(m[FLAGS, 0])
    if off < 0 or ln < 0 or off + ln > ARENA_SZ:
        assert flags & F_MALFORMED == F_RUNT | F_TRUNC
        assert flags & (PROTO_FLAGS | F_VLAN) == 0
        assert m[OFF, 0] == off and m[LEN, 0] == ln
        assert all(m[r, 0] == v for r, v in CLEARED.items())
        assert bytes(b.data) == body
    else:
        # In range: the same as parsing those bytes anywhere else.
        ref = parse_robust(body[off:off + ln])
        col = tuple(int(x) for x in m[:NFIELDS, 0])
        for row in range(NFIELDS):
            if row == OFF:
                assert col[row] - off == ref[row] - LEAD
            else:
                assert col[row] == ref[row], ROW_NAMES.get(row, row)


# Regression: parse_one used to check `base + ln > data.shape[0]`; with a corrupt LEN
# near 2**63 (or OFF) the int64 sum wrapped negative, the frame was not flagged and
# the parser read outside the arena (OFF=LEN=2**62 dereferenced data[2**62]).

def test_off_len_overflow_is_flagged():
    """OFF=1, LEN=2**63-1: the frame claims ~2**63 bytes in a 128-byte arena."""
    f = raw(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
            / IP(src="10.0.0.1", dst="10.0.0.2") / UDP())
    b = PacketBatch(capacity=1, arena=128, max_dest=1)
    b.data[1:1 + len(f)] = np.frombuffer(f, dtype=np.uint8)
    m = b.meta
    m[OFF, 0], m[LEN, 0], m[FLAGS, 0] = 1, 2**63 - 1, F_SAFE
    b.n = 1
    parse_batch(m, b.data, 0, 1)
    assert m[FLAGS, 0] & F_MALFORMED == F_RUNT | F_TRUNC, flag_str(int(m[FLAGS, 0]))
    assert m[ETYPE, 0] == 0 and m[L3OFF, 0] == -1


def _no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_off_len_overflow_does_not_read():
    """OFF=LEN=2**62 (sum wraps to -2**63). Run in a child: a regression dereferences
    data[2**62] and kills the process instead of failing one test."""
    code = textwrap.dedent("""
        from switch.batch import PacketBatch, OFF, LEN, FLAGS, F_RUNT
        from switch.parse import parse_batch
        b = PacketBatch(capacity=1, arena=64, max_dest=1)
        for off, ln in ((2**62, 2**62), (2**63 - 8, 14), (2**63 - 1, 2**63 - 1)):
            b.meta[OFF, 0] = off
            b.meta[LEN, 0] = ln
            b.meta[FLAGS, 0] = 0
            b.n = 1
            parse_batch(b.meta, b.data, 0, 1)
            assert b.meta[FLAGS, 0] & F_RUNT, (off, ln)
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, preexec_fn=_no_core,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert p.returncode == 0 and "ok" in p.stdout, (p.returncode, p.stderr[-500:])
