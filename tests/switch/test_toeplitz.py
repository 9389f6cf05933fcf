"""RSS Toeplitz: the published verification values (vmbus_netvsp.md g.4,
vswitch_vmq_sriov.md 3.3, checklist 35) and the hash-type rules over parsed frames."""
from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, IPv6ExtHdrFragment, Raw, raw

from switch.batch import HASH, HASH_TYPE, PacketBatch
from switch.parse import parse_batch
from switch.toeplitz import (DEFAULT_KEY, HASH_IPV4, HASH_IPV6, HASH_TCP_IPV4, HASH_TCP_IPV6,
                             HASH_UDP_IPV4, HASH_UDP_IPV6, LINUX_HASHINFO, check_hash_types,
                             hash_batch, key_table, toeplitz)

# (destination, dport, source, sport, IP-only hash, with TCP ports)
VECTORS = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323e8fc2, 0x51ccc178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xd718262a, 0xc626b0ea),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xd2d0a5de, 0x5c2b394a),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xafc7327f),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5d1809c5, 0x10e828a2),
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2cc18cd5, 0x40207d3d),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0f0c461c, 0xdde51bbf),
    ("fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251,
     0x4b61e985, 0x02d1feef),
]
TABLE = key_table(DEFAULT_KEY)
ALL = LINUX_HASHINFO | HASH_UDP_IPV4 | HASH_UDP_IPV6


def _ip(a):
    return ipaddress.ip_address(a).packed


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", VECTORS)
def test_published_values_over_bytes(dst, dport, src, sport, h_ip, h_tcp):
    ips = _ip(src) + _ip(dst)
    tup = np.frombuffer(ips + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), np.uint8)
    assert toeplitz(TABLE, tup, 0, len(ips)) == h_ip
    assert toeplitz(TABLE, tup, 0, len(tup)) == h_tcp


def test_row_one_input_bytes_as_the_reference_spells_them():
    tup = bytes.fromhex("420995bba18e64500aea06e6")
    assert toeplitz(TABLE, np.frombuffer(tup, np.uint8), 0, 12) == 0x51ccc178


def _hash_frames(frames, hashinfo):
    b = PacketBatch()
    b.append_frames([raw(f) for f in frames])
    parse_batch(b.meta, b.data, 0, b.n)
    hash_batch(b.meta, b.n, TABLE, hashinfo)
    return [(int(b.meta[HASH, i]) & 0xFFFFFFFF, int(b.meta[HASH_TYPE, i])) for i in range(b.n)]


def _l3(src, dst):
    return IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", VECTORS)
def test_published_values_over_parsed_frames(dst, dport, src, sport, h_ip, h_tcp):
    v6 = ":" in dst
    tcp = Ether() / _l3(src, dst) / TCP(sport=sport, dport=dport) / Raw(b"x" * 20)
    udp = Ether() / _l3(src, dst) / UDP(sport=sport, dport=dport) / Raw(b"y" * 20)
    got = _hash_frames([tcp, udp], ALL)
    assert got[0] == (h_tcp, HASH_TCP_IPV6 if v6 else HASH_TCP_IPV4)
    assert got[1] == (h_tcp, HASH_UDP_IPV6 if v6 else HASH_UDP_IPV4)
    # Linux's hashinfo has no UDP type: UDP falls back to the 2-tuple.
    assert _hash_frames([udp], LINUX_HASHINFO)[0] == (h_ip, HASH_IPV6 if v6 else HASH_IPV4)


def test_fragments_hash_ip_only_even_the_first():
    d, dp, s, sp, h_ip, _ = VECTORS[0]
    first = Ether() / IP(src=s, dst=d, flags="MF") / TCP(sport=sp, dport=dp) / Raw(b"a" * 64)
    later = Ether() / IP(src=s, dst=d, frag=100, proto=6) / Raw(b"b" * 64)
    d6, dp6, s6, sp6, h6, _ = VECTORS[5]
    first6 = (Ether() / IPv6(src=s6, dst=d6) / IPv6ExtHdrFragment(m=1, id=7)
              / TCP(sport=sp6, dport=dp6) / Raw(b"c" * 64))
    assert _hash_frames([first, later, first6], ALL) == [
        (h_ip, HASH_IPV4), (h_ip, HASH_IPV4), (h6, HASH_IPV6)]


def test_ip_options_are_skipped():
    d, dp, s, sp, _, h_tcp = VECTORS[1]
    f = Ether() / IP(src=s, dst=d, options=b"\x01\x01\x01\x00") / TCP(sport=sp, dport=dp)
    assert _hash_frames([f], ALL) == [(h_tcp, HASH_TCP_IPV4)]


def test_no_enabled_type_no_hash():
    d, dp, s, sp, _, _ = VECTORS[0]
    f = Ether() / IP(src=s, dst=d) / TCP(sport=sp, dport=dp)
    assert _hash_frames([f], HASH_IPV6 | HASH_TCP_IPV6) == [(0, 0)]
    assert _hash_frames([Ether(type=0x88B5) / Raw(b"z" * 50)], ALL) == [(0, 0)]


def test_key_and_types_are_checked():
    with pytest.raises(ValueError, match="40 bytes"):
        key_table(b"\x00" * 39)
    with pytest.raises(ValueError, match="Toeplitz"):
        check_hash_types(0x2 | HASH_IPV4)
    with pytest.raises(ValueError, match="_EX"):
        check_hash_types(0x1 | 0x800)
    with pytest.raises(ValueError, match="unknown"):
        check_hash_types(0x1 | 0x100000)
    check_hash_types(LINUX_HASHINFO)
