"""RSS: the Toeplitz hash and the hash types NDIS defines over it.

The hash (vswitch_vmq_sriov.md 3.3; vmbus_netvsp.md g.4): for every input bit
that is 1, XOR in the 32 bits of the 40-byte key starting at that bit. Done a
byte at a time through a table built once per key: ``table[b, v]`` is the XOR of
the key windows for the set bits of value ``v`` at input byte ``b`` (36 bytes
cover the longest input, TCP over IPv6).

Inputs are built from the parsed header fields of a batch (switch/parse.py), in
the order NDIS defines: source address, destination address, source port,
destination port. Hash types (vmbus_netvsp.md g.3): a TCP or UDP type hashes the
4-tuple of an unfragmented packet of that protocol; otherwise the IP type hashes
the 2-tuple (fragments, even the first, always get the 2-tuple, checklist 35);
with neither enabled the packet gets no hash. The *_EX types (home address and
routing header substitution) are not offered: ``check_hash_types`` refuses them.
"""
from __future__ import annotations

import numpy as np

from .batch import (DST_HI, DST_LO, F_FRAG, F_IPV4, F_IPV6, F_TCP, F_UDP, FLAGS, HASH,
                    HASH_TYPE, SPORT, DPORT, SRC_HI, SRC_LO)
from .kernel import helper, kernel

KEY_SIZE = 40
MAX_INPUT = 36

# NDIS_HASH_* (hash function in the low byte, types above it)
HASH_FUNCTION_TOEPLITZ = 0x1
HASH_FUNCTION_MASK = 0xFF
HASH_IPV4 = 0x100
HASH_TCP_IPV4 = 0x200
HASH_IPV6 = 0x400
HASH_IPV6_EX = 0x800
HASH_TCP_IPV6 = 0x1000
HASH_TCP_IPV6_EX = 0x2000
HASH_UDP_IPV4 = 0x4000
HASH_UDP_IPV6 = 0x8000
HASH_UDP_IPV6_EX = 0x10000
HASH_TYPES = (HASH_IPV4 | HASH_TCP_IPV4 | HASH_IPV6 | HASH_TCP_IPV6 | HASH_UDP_IPV4
              | HASH_UDP_IPV6)
HASH_EX = HASH_IPV6_EX | HASH_TCP_IPV6_EX | HASH_UDP_IPV6_EX
# What Linux's netvsc asks for (vmbus_netvsp.md g.3): 0x1701.
LINUX_HASHINFO = HASH_FUNCTION_TOEPLITZ | HASH_IPV4 | HASH_TCP_IPV4 | HASH_IPV6 | HASH_TCP_IPV6

# Microsoft's sample key, also Linux netvsc's default (netvsc_hash_key).
DEFAULT_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")


def key_table(key: bytes) -> np.ndarray:
    """The per-byte lookup table of ``key`` (36 x 256 uint32)."""
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"an RSS key is {KEY_SIZE} bytes, not {len(key)}")
    k = int.from_bytes(key, "big")
    nbits = KEY_SIZE * 8
    # window[i] = the 32 key bits starting at bit i (MSB first)
    window = [(k >> (nbits - 32 - i)) & 0xFFFFFFFF for i in range(MAX_INPUT * 8)]
    t = np.zeros((MAX_INPUT, 256), dtype=np.uint32)
    for b in range(MAX_INPUT):
        for bit in range(8):                    # bit 0 = the byte's MSB
            w = window[b * 8 + bit]
            m = 0x80 >> bit
            for v in range(256):
                if v & m:
                    t[b, v] ^= w
    return t


def check_hash_types(hashinfo: int) -> None:
    """Refuse what this RSS cannot compute: a function other than Toeplitz, the
    *_EX types, unknown bits."""
    fn = hashinfo & HASH_FUNCTION_MASK
    if fn not in (0, HASH_FUNCTION_TOEPLITZ):
        raise ValueError(f"hash function {fn:#x}: only Toeplitz (0x1)")
    rest = hashinfo & ~HASH_FUNCTION_MASK
    if rest & HASH_EX:
        raise ValueError(f"hash types {rest & HASH_EX:#x}: the IPv6 _EX types are not offered")
    if rest & ~HASH_TYPES:
        raise ValueError(f"unknown hash type bits {rest & ~HASH_TYPES:#x}")


@helper
def _mix32(table, h, pos, v):
    """XOR the four bytes of the 32-bit big-endian value ``v`` at input ``pos``."""
    h ^= table[pos, (v >> 24) & 0xFF]
    h ^= table[pos + 1, (v >> 16) & 0xFF]
    h ^= table[pos + 2, (v >> 8) & 0xFF]
    h ^= table[pos + 3, v & 0xFF]
    return h


@helper
def _mix64(table, h, pos, v):
    h = _mix32(table, h, pos, (v >> 32) & 0xFFFFFFFF)
    return _mix32(table, h, pos + 4, v & 0xFFFFFFFF)


@kernel
def toeplitz(table, data, start, length):
    """Hash ``length`` bytes of ``data`` from ``start`` (at most 36)."""
    h = np.uint32(0)
    for j in range(length):
        h ^= table[j, data[start + j]]
    return h


@helper
def packet_hash(meta, i, table, hashinfo):
    """The RSS hash of parsed packet ``i`` and the type that produced it, or
    (0, 0) when none of the enabled types covers the packet."""
    fl = meta[FLAGS, i]
    whole = (fl & F_FRAG) == 0
    tcp = (fl & F_TCP) != 0 and whole
    udp = (fl & F_UDP) != 0 and whole
    h = np.uint32(0)
    if fl & F_IPV4:
        if (tcp and hashinfo & HASH_TCP_IPV4) or (udp and hashinfo & HASH_UDP_IPV4):
            t = HASH_TCP_IPV4 if tcp else HASH_UDP_IPV4
            h = _mix32(table, h, 0, meta[SRC_LO, i] & 0xFFFFFFFF)
            h = _mix32(table, h, 4, meta[DST_LO, i] & 0xFFFFFFFF)
            h = _mix32(table, h, 8, ((meta[SPORT, i] & 0xFFFF) << 16) | (meta[DPORT, i] & 0xFFFF))
            return h, t
        if hashinfo & HASH_IPV4:
            h = _mix32(table, h, 0, meta[SRC_LO, i] & 0xFFFFFFFF)
            h = _mix32(table, h, 4, meta[DST_LO, i] & 0xFFFFFFFF)
            return h, HASH_IPV4
    elif fl & F_IPV6:
        l4 = (tcp and hashinfo & HASH_TCP_IPV6) or (udp and hashinfo & HASH_UDP_IPV6)
        if l4 or hashinfo & HASH_IPV6:
            h = _mix64(table, h, 0, meta[SRC_HI, i])
            h = _mix64(table, h, 8, meta[SRC_LO, i])
            h = _mix64(table, h, 16, meta[DST_HI, i])
            h = _mix64(table, h, 24, meta[DST_LO, i])
            if l4:
                h = _mix32(table, h, 32,
                           ((meta[SPORT, i] & 0xFFFF) << 16) | (meta[DPORT, i] & 0xFFFF))
                return h, (HASH_TCP_IPV6 if tcp else HASH_UDP_IPV6)
            return h, HASH_IPV6
    return h, 0


@kernel
def hash_batch(meta, n, table, hashinfo):
    """Fill HASH and HASH_TYPE of a parsed batch (HASH_TYPE 0: no hash)."""
    for i in range(n):
        h, t = packet_hash(meta, i, table, hashinfo)
        meta[HASH, i] = np.int64(h)
        meta[HASH_TYPE, i] = t
