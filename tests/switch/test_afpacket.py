"""AF_PACKET rings (switch/afpacket.py).

Part 1 needs no privileges: the receive kernels walk ring memory laid out by
hand as the kernel lays it out (linux/if_packet.h, net/packet/af_packet.c), held
inside a larger array whose guard bytes must never change. Good frames, offload
and VLAN decoding, batches that fill up, wrap-around, hostile headers and a
seeded fuzz.

Part 2 (root) opens real rings on a veth pair in a throwaway network namespace:
frames sent by a plain AF_PACKET socket on the peer arrive intact, and frames a
switch forwards out through the transmit ring reach the peer intact.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest

from tests.hvnet.nsutil import in_ns

from switch.afpacket import (MAX_FRAME, S_BLOCK, S_OFF, S_PKT, PacketRingPorts, RingSocket,
                             ring_receive_v2, ring_receive_v3)
from switch.batch import (ALIGN, CSUM_OFF, CSUM_START, DROP, F_CSUM_PARTIAL, F_CSUM_VALID,
                          F_SAFE, F_VLAN, FLAGS, GSO_SIZE, GSO_TYPE, LEN, NDST, OFF, SAFE_LEN,
                          SRC_NIC, SRC_PORT, TCI, PacketBatch)

USER, VLAN_VALID, TPID_VALID = 0x1, 0x10, 0x40
NEEDS_CSUM, DATA_VALID = 1, 2
GUARD, GUARD_LEN = 0xA5, 256
ARENA_FILL, META_FILL = 0xEE, -7
PORT = 5


def align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_off=0) -> bytes:
    """struct virtio_net_hdr (10 bytes, host order)."""
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_off)


def frame(k: int, size: int = 60, tag: bytes = b"") -> bytes:
    """An Ethernet frame from 02:00:00:00:aa:<k> (local experimental EtherType)
    whose payload depends on k, so any two frames differ."""
    hdr = b"\x02\x00\x00\x00\xbb\x01" + bytes([2, 0, 0, 0, 0xAA, k & 0xFF]) + tag + b"\x88\xb5"
    n = size - len(hdr)
    body = struct.pack(">I", k) + ((np.arange(n) * 3 + k * 7) % 251).astype(np.uint8).tobytes()
    return hdr + body[:n]


@dataclass
class Pkt:
    """One received frame as the kernel describes it; None = what the kernel writes."""
    frame: bytes
    status: int = USER
    tci: int = 0
    tpid: int = 0
    vnet: bytes = bytes(10)
    mac: int | None = None
    snap: int | None = None
    length: int | None = None
    nxt: int | None = None            # V3 only


class Ring:
    """Receive ring memory between guard bytes, with the reader's state and counters.
    ``head`` is where the simulated kernel writes next."""
    hdr = 0

    def __init__(self, unit: int, nr: int, vnet: bool):
        self.unit, self.nr, self.vnet = unit, nr, vnet
        self.mem = np.full(unit * nr + 2 * GUARD_LEN, GUARD, dtype=np.uint8)
        self.ring = self.mem[GUARD_LEN:GUARD_LEN + unit * nr]
        self.ring[:] = 0
        self.state = np.zeros(3, dtype=np.int64)
        self.bad = np.zeros(2, dtype=np.int64)
        self.head = 0

    def guards_intact(self) -> bool:
        return bool((self.mem[:GUARD_LEN] == GUARD).all()
                    and (self.mem[-GUARD_LEN:] == GUARD).all())

    def _put_data(self, h: int, p: Pkt, mac: int, room: int, hdr_size: int) -> None:
        """Virtio header and frame bytes where they fit: a hostile header may claim a
        place outside the slot, and the test itself must not write there either."""
        if p.mac is not None and p.mac != self.mac0:
            return                                   # hostile placement: leave zeros
        if self.vnet or p.vnet != bytes(10):
            # Without PACKET_VNET_HDR these bytes are padding; offload-looking garbage
            # there must be ignored.
            if mac - 10 >= hdr_size:
                self.ring[h + mac - 10:h + mac] = np.frombuffer(p.vnet, np.uint8)
        n = min(len(p.frame), room - mac)
        if n > 0:
            self.ring[h + mac:h + mac + n] = np.frombuffer(p.frame[:n], np.uint8)


class V2Ring(Ring):
    hdr = 32

    def __init__(self, frame_size=4096, frame_nr=4, vnet=True):
        super().__init__(frame_size, frame_nr, vnet)
        # tpacket_rcv: TPACKET_ALIGN(TPACKET2_HDRLEN (32 + sockaddr_ll 20) + 16)
        # = 80, + the virtio header, minus the Ethernet header.
        self.mac0 = 76 if vnet else 66

    def write(self, slot: int, p: Pkt) -> None:
        h = slot * self.unit
        mac = self.mac0 if p.mac is None else p.mac
        snap = len(p.frame) if p.snap is None else p.snap
        length = snap if p.length is None else p.length
        self.ring[h:h + self.unit] = 0
        self._put_data(h, p, mac, self.unit, self.hdr)
        struct.pack_into("<IIIHHIIHH", self.ring, h, p.status, length, snap, mac,
                         (mac + 14) & 0xFFFF, 0, 0, p.tci, p.tpid)

    def status(self, slot: int) -> int:
        return struct.unpack_from("<I", self.ring, slot * self.unit)[0]

    def load(self, pkts) -> None:
        for p in pkts:
            assert not self.status(self.head) & USER, "the reader has not given it back"
            self.write(self.head, p)
            self.head = (self.head + 1) % self.nr

    def all_given_back(self) -> bool:
        return all(self.status(s) == 0 for s in range(self.nr))

    def receive(self, b, n=0, cursor=0, port=PORT):
        return ring_receive_v2(self.ring, self.unit, self.nr, self.state, port, self.vnet,
                               b.meta, b.data, n, cursor, self.bad)


class V3Ring(Ring):
    hdr = 48
    FIRST = 48          # BLK_PLUS_PRIV(0): ALIGN_8(sizeof(tpacket_block_desc))

    def __init__(self, block_size=8192, block_nr=2, vnet=True):
        super().__init__(block_size, block_nr, vnet)
        # TPACKET_ALIGN(TPACKET3_HDRLEN (48 + 20) + 16) = 96, + virtio header - 14.
        self.mac0 = 92 if vnet else 82

    def step(self, p: Pkt) -> int:
        # tp_next_offset as prb_fill_curr_block writes it: ALIGN_8(tp_mac + snaplen).
        return align(self.mac0 + len(p.frame), 8)

    def write_block(self, blk: int, pkts, status=USER, num_pkts=None, first=None,
                    at=FIRST) -> list:
        """Lay ``pkts`` out from offset ``at``; ``num_pkts`` and ``first`` override
        what the descriptor says. Returns the packets' offsets."""
        base = blk * self.unit
        self.ring[base:base + self.unit] = 0
        p, offs = at, []
        for j, pk in enumerate(pkts):
            mac = self.mac0 if pk.mac is None else pk.mac
            snap = len(pk.frame) if pk.snap is None else pk.snap
            length = snap if pk.length is None else pk.length
            last = j == len(pkts) - 1
            nxt = pk.nxt if pk.nxt is not None else (0 if last else self.step(pk))
            room = min(self.unit - p, self.step(pk)) if not last else self.unit - p
            self._put_data(base + p, pk, mac, room, self.hdr)
            struct.pack_into("<IIIIIIHHIIH", self.ring, base + p, nxt, 0, 0, snap, length,
                             pk.status, mac, (mac + 14) & 0xFFFF, 0, pk.tci, pk.tpid)
            offs.append(p)
            p += self.step(pk)
        assert p <= self.unit + 8, "test packets overflow the block"
        # version and offset_to_priv are not read; blk_len is the used length.
        struct.pack_into("<IIIIII", self.ring, base, 0, 0, status,
                         len(pkts) if num_pkts is None else num_pkts,
                         at if first is None else first, min(p, self.unit))
        return offs

    def status(self, blk: int) -> int:
        return struct.unpack_from("<I", self.ring, blk * self.unit + 8)[0]

    def load(self, pkts, **kw) -> list:
        assert not self.status(self.head) & USER, "the reader has not given it back"
        offs = self.write_block(self.head, pkts, **kw)
        self.head = (self.head + 1) % self.nr
        return offs

    def all_given_back(self) -> bool:
        return all(self.status(b) == 0 for b in range(self.nr))

    def receive(self, b, n=0, cursor=0, port=PORT):
        return ring_receive_v3(self.ring, self.unit, self.nr, self.state, port, self.vnet,
                               b.meta, b.data, n, cursor, self.bad)


def make_ring(kind: str, vnet=True, unit=None, nr=4):
    if kind == "v2":
        return V2Ring(unit or 4096, nr, vnet)
    return V3Ring(unit or 8192, nr, vnet)


def batch(cap=8, arena=None) -> PacketBatch:
    """A batch whose every byte and field holds a marker, to see what was written;
    its arena lies between guard bytes too."""
    size = arena if arena is not None else cap * 2048
    b = PacketBatch(cap, arena=size)
    b.meta[:] = META_FILL
    guarded = np.full(size + 2 * GUARD_LEN, GUARD, dtype=np.uint8)
    b.data = guarded[GUARD_LEN:GUARD_LEN + size]
    b.data[:] = ARENA_FILL
    return b


def arena_guards_intact(b: PacketBatch) -> bool:
    whole = b.data.base
    return bool((whole[:GUARD_LEN] == GUARD).all() and (whole[-GUARD_LEN:] == GUARD).all())


def check_batch(b: PacketBatch, n: int, start: int = 0, data_start: int = 0) -> None:
    """Slots start..n-1 hold frames inside the arena, aligned and disjoint; nothing
    else in the arena or in the other slots was touched."""
    arena = b.data.shape[0]
    used = np.zeros(arena, dtype=bool)
    for i in range(start, n):
        off, ln = int(b.meta[OFF, i]), int(b.meta[LEN, i])
        assert data_start <= off and 14 <= ln and off + ln <= arena, (i, off, ln, arena)
        assert off % ALIGN == 0
        assert not used[off:off + ln].any(), f"slot {i} overlaps another frame"
        used[off:off + ln] = True
    assert (b.data[~used] == ARENA_FILL).all(), "arena written outside the frames"
    assert arena_guards_intact(b), "written past the arena"
    assert (b.meta[:, n:] == META_FILL).all(), "slots past n written"
    assert (b.meta[:, :start] == META_FILL).all(), "slots before the start written"


def frames_of(b: PacketBatch, n: int, start: int = 0) -> list[bytes]:
    return [bytes(b.data[b.meta[OFF, i]:b.meta[OFF, i] + b.meta[LEN, i]])
            for i in range(start, n)]


def drain(ring, cap=8, arena=None) -> list[bytes]:
    """Receive with fresh batches until nothing comes; every batch checked."""
    out = []
    for _ in range(1000):
        b = batch(cap, arena)
        n, _cursor = ring.receive(b)
        check_batch(b, n)
        assert ring.guards_intact()
        if n == 0:
            return out
        out += frames_of(b, n)
    raise AssertionError("the ring never ran dry")


KINDS = ["v2", "v3"]


# ======================================================================== good frames
@pytest.mark.parametrize("vnet", [True, False], ids=["vnet", "plain"])
@pytest.mark.parametrize("kind", KINDS)
def test_frames_land_with_their_offload_state(kind, vnet):
    r = make_ring(kind, vnet, nr=8)
    pkts = [Pkt(frame(0, 60)),
            Pkt(frame(1, 1514), vnet=vnet_hdr(NEEDS_CSUM, 1, 54, 1448, 34, 16)),
            Pkt(frame(2, 200), vnet=vnet_hdr(DATA_VALID)),
            Pkt(frame(3, 100), vnet=vnet_hdr(0, 0x84, 0, 1220)),   # TCPV6 | ECN, no csum
            # Both: a checksum still to be done is not a verified one.
            Pkt(frame(4, 90), vnet=vnet_hdr(NEEDS_CSUM | DATA_VALID, 0, 0, 0, 14, 10))]
    r.load(pkts)
    b = batch()
    n, cursor = r.receive(b)
    assert n == 5 and r.bad[0] == 0
    check_batch(b, n)
    assert frames_of(b, n) == [p.frame for p in pkts]
    assert cursor == align(int(b.meta[OFF, 4] + b.meta[LEN, 4]), ALIGN)
    for i, p in enumerate(pkts):
        assert b.meta[LEN, i] == b.meta[SAFE_LEN, i] == len(p.frame)
        assert b.meta[SRC_PORT, i] == PORT and b.meta[SRC_NIC, i] == 0
        assert b.meta[DROP, i] == 0 and b.meta[NDST, i] == 0 and b.meta[TCI, i] == 0
    got = [(int(b.meta[FLAGS, i]), int(b.meta[CSUM_START, i]), int(b.meta[CSUM_OFF, i]),
            int(b.meta[GSO_TYPE, i]), int(b.meta[GSO_SIZE, i])) for i in range(n)]
    if vnet:
        assert got == [(F_SAFE, 0, 0, 0, 0),
                       (F_SAFE | F_CSUM_PARTIAL, 34, 16, 1, 1448),
                       (F_SAFE | F_CSUM_VALID, 0, 0, 0, 0),
                       (F_SAFE, 0, 0, 0x84, 1220),
                       (F_SAFE | F_CSUM_PARTIAL, 14, 10, 0, 0)]
    else:                       # the same bytes before tp_mac are padding, not a header
        assert got == [(F_SAFE, 0, 0, 0, 0)] * 5
    assert r.all_given_back() and r.guards_intact()
    assert r.state[S_BLOCK] == r.head
    assert r.receive(batch())[0] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_vlan_tag_out_of_band_or_back_inline(kind):
    r = make_ring(kind, nr=8)
    f = [frame(k, 120) for k in range(5)]
    pkts = [Pkt(f[0], status=USER | VLAN_VALID, tci=0x2007),               # no TPID known
            Pkt(f[1], status=USER | VLAN_VALID | TPID_VALID, tci=0xE00A, tpid=0x8100),
            Pkt(f[2], status=USER | VLAN_VALID | TPID_VALID, tci=0x3064, tpid=0x88A8,
                vnet=vnet_hdr(NEEDS_CSUM, 0, 0, 0, 34, 6)),
            Pkt(f[3], status=USER | TPID_VALID, tci=0x0005, tpid=0x88A8),  # no tag at all
            Pkt(f[4], status=USER | VLAN_VALID | TPID_VALID, tci=0x0FFF, tpid=0x9100)]
    r.load(pkts)
    b = batch()
    n, _ = r.receive(b)
    assert n == 5 and r.bad[0] == 0
    check_batch(b, n)
    got = frames_of(b, n)
    assert got[:2] == f[:2] and got[3] == f[3]
    assert got[2] == f[2][:12] + b"\x88\xa8\x30\x64" + f[2][12:]
    assert got[4] == f[4][:12] + b"\x91\x00\x0f\xff" + f[4][12:]
    flags = [int(b.meta[FLAGS, i]) for i in range(n)]
    assert [bool(x & F_VLAN) for x in flags] == [True, True, False, False, False]
    assert [int(b.meta[TCI, i]) for i in range(n)] == [0x2007, 0xE00A, 0, 0, 0]
    assert b.meta[LEN, 2] == len(f[2]) + 4 == b.meta[SAFE_LEN, 2]
    # The partial checksum's start moves with the bytes the tag pushed along.
    assert flags[2] & F_CSUM_PARTIAL and b.meta[CSUM_START, 2] == 38
    assert b.meta[CSUM_OFF, 2] == 6
    assert r.all_given_back() and r.guards_intact()


# ======================================================================== ring walking
@pytest.mark.parametrize("kind", KINDS)
def test_frames_are_given_back_and_the_ring_wraps(kind):
    r = make_ring(kind, nr=3)
    # The reader waits for the slot the kernel fills next, whatever lies after it.
    if kind == "v2":
        r.write(1, Pkt(frame(99)))
    else:
        r.write_block(1, [Pkt(frame(99))])
    assert r.receive(batch())[0] == 0 and r.state.tolist() == [0, 0, 0]
    r.ring[:] = 0
    k = 0
    for rnd in range(10):
        want = [frame(k + j, 60 + 37 * j) for j in range(rnd % 3 + 1)]
        k += len(want)
        r.load([Pkt(f) for f in want])
        b = batch()
        n, _ = r.receive(b)
        check_batch(b, n)
        assert frames_of(b, n) == want
        assert r.all_given_back() and r.state[S_BLOCK] == r.head
        assert r.state[S_PKT] == 0 and r.state[S_OFF] == 0
    assert r.bad[0] == 0 and r.guards_intact()
    assert k > 3 * r.nr                          # went round more than once


@pytest.mark.parametrize("kind", KINDS)
def test_full_batch_is_resumed_by_the_next_call(kind):
    r = make_ring(kind, nr=16 if kind == "v2" else 3)
    want = [frame(k, 64 + k) for k in range(14)]
    if kind == "v2":
        r.load([Pkt(f) for f in want])
    else:
        r.load([Pkt(f) for f in want[:12]])
        r.load([Pkt(f) for f in want[12:]])
    got, counts = [], []
    for call in range(4):
        b = batch(cap=5)
        n, _ = r.receive(b)
        check_batch(b, n)
        got += frames_of(b, n)
        counts.append(n)
        if kind == "v3" and call == 0:
            # Mid-block: the block stays the reader's and the place is remembered.
            assert r.status(0) & USER and r.state[S_BLOCK] == 0 and r.state[S_PKT] == 5
            assert r.state[S_OFF] == V3Ring.FIRST + sum(r.step(Pkt(f)) for f in want[:5])
    assert counts == [5, 5, 4, 0]
    assert got == want and r.bad[0] == 0
    assert r.all_given_back() and r.guards_intact()


@pytest.mark.parametrize("arena,counts", [(2027, [1, 2, 2]), (2028, [2, 2, 1])])
@pytest.mark.parametrize("kind", KINDS)
def test_full_arena_is_resumed_by_the_next_call(kind, arena, counts):
    """Frames of 1000 bytes; the second gets its 802.1ad tag back inline (1004 bytes).
    2027 bytes hold 1000 + pad + 1000 but not 1000 + pad + 1004; 2028 hold both."""
    r = make_ring(kind, nr=8)
    f = [frame(k, 1000) for k in range(5)]
    pkts = [Pkt(x) for x in f]
    pkts[1] = Pkt(f[1], status=USER | VLAN_VALID | TPID_VALID, tci=9, tpid=0x88A8)
    r.load(pkts)
    got, seen = [], []
    for _ in range(len(counts) + 1):
        b = batch(cap=8, arena=arena)
        n, cursor = r.receive(b)
        check_batch(b, n)
        assert cursor <= align(arena, ALIGN)
        got += frames_of(b, n)
        seen.append(n)
    assert seen == counts + [0]
    assert got == [f[0], f[1][:12] + b"\x88\xa8\x00\x09" + f[1][12:]] + f[2:]
    assert r.bad[0] == 0 and r.all_given_back() and r.guards_intact()


@pytest.mark.parametrize("kind", KINDS)
def test_a_frame_no_empty_arena_can_hold_is_dropped_not_stalled_on(kind):
    """A batch configured smaller than a frame: the frame is counted and given back,
    and the ring goes on (waiting for room that can never come would stall it)."""
    r = make_ring(kind, nr=8)
    f = [frame(0, 900), frame(1, 1500), frame(2, 900)]
    r.load([Pkt(x) for x in f])
    assert drain(r, cap=8, arena=1024) == [f[0], f[2]]
    assert r.bad[0] == 1 and r.all_given_back() and r.guards_intact()


@pytest.mark.parametrize("kind", KINDS)
def test_receive_appends_after_what_the_batch_already_holds(kind):
    r = make_ring(kind)
    want = [frame(k, 100) for k in range(3)]
    r.load([Pkt(x) for x in want])
    b = batch(cap=4)
    n, cursor = r.receive(b, n=2, cursor=192)     # another uplink filled two slots
    assert (n, r.bad[0]) == (4, 0)
    check_batch(b, n, start=2, data_start=192)
    assert frames_of(b, n, start=2) == want[:2]
    assert b.meta[OFF, 2] == 192 and cursor == 192 + 128 + 128
    assert drain(r) == want[2:]


@pytest.mark.parametrize("delta,ok", [(0, True), (1, False)], ids=["fits", "one-past"])
@pytest.mark.parametrize("kind", KINDS)
def test_largest_frame_at_the_very_end_of_the_ring(kind, delta, ok):
    """A MAX_FRAME frame ending on the ring's last byte is taken; one byte further it
    would end in the guard, and is refused."""
    r = make_ring(kind, unit=1 << 17, nr=2)
    big = frame(1, MAX_FRAME)
    small = frame(2)
    if kind == "v2":
        r.load([Pkt(small)])
        mac = r.unit - MAX_FRAME + delta
        r.write(1, Pkt(big, mac=mac))
        r.ring[r.unit + mac - 10:r.unit + mac] = 0            # an all-zero virtio header
        r.ring[r.unit + mac:r.unit + mac + MAX_FRAME - delta] = \
            np.frombuffer(big[:MAX_FRAME - delta], np.uint8)
    else:
        r.load([Pkt(small)])
        mac = r.unit - V3Ring.FIRST - MAX_FRAME + delta
        base = r.unit
        r.write_block(1, [Pkt(big, mac=mac)])
        r.ring[base + V3Ring.FIRST + mac:base + r.unit] = \
            np.frombuffer(big[:MAX_FRAME - delta], np.uint8)
    assert mac <= 0xFFFF
    got = drain(r, cap=4, arena=2 * MAX_FRAME)
    assert got == ([small, big] if ok else [small])
    assert r.bad[0] == (0 if ok else 1)
    assert r.all_given_back() and r.guards_intact()


# ======================================================================== hostile headers
V2_ROOM = 1 << 17
V2_HOSTILE = {
    "snaplen < len": dict(snap=60, length=100),
    "snaplen > len": dict(snap=100, length=60),
    "snaplen > MAX_FRAME": dict(snap=MAX_FRAME + 1, length=MAX_FRAME + 1),
    "frame runs past the slot": dict(mac=0xFFFF, snap=V2_ROOM - 0xFFFF + 1,
                                     length=V2_ROOM - 0xFFFF + 1),
    "tp_mac inside tpacket2_hdr": dict(mac=20),
    "no room for the virtio header": dict(mac=41),
    "tp_mac 0": dict(mac=0),
    "snaplen < 14": dict(snap=13, length=13),
    "snaplen 0": dict(snap=0, length=0),
    "all ones": dict(mac=0xFFFF, snap=0xFFFFFFFF, length=0xFFFFFFFF),
}


@pytest.mark.parametrize("case", list(V2_HOSTILE))
def test_v2_hostile_header_is_counted_and_skipped(case):
    # Slots of 128 KiB so that MAX_FRAME is checked on its own; the hostile frame
    # sits in the last slot, where "past the slot" is past the ring.
    r = V2Ring(V2_ROOM, 4)
    g = [frame(k, 80) for k in range(4)]
    r.load([Pkt(g[0]), Pkt(g[1]), Pkt(g[2]), Pkt(frame(50, 100), **V2_HOSTILE[case])])
    b = batch(cap=8)
    n, _ = r.receive(b)
    check_batch(b, n)
    assert frames_of(b, n) == g[:3] and r.bad[0] == 1
    assert r.all_given_back() and r.state[S_BLOCK] == 0 and r.guards_intact()
    r.load([Pkt(g[3])])                          # later frames still arrive
    assert drain(r) == [g[3]] and r.bad[0] == 1


V3_ROOM = 1 << 14
# Per packet: the middle one of three in the ring's last block.
V3_PKT_HOSTILE = {
    "snaplen < len": dict(snap=60, length=100),
    "snaplen > len": dict(snap=100, length=60),
    "snaplen > MAX_FRAME": dict(snap=MAX_FRAME + 1, length=MAX_FRAME + 1),
    "frame runs past the block": dict(snap="past", length="past"),
    "tp_mac 0": dict(mac=0),
    "no room for the virtio header": dict(mac=41),
    "snaplen < 14": dict(snap=13, length=13),
    "all ones": dict(mac=0xFFFF, snap=0xFFFFFFFF, length=0xFFFFFFFF),
    "tp_next_offset 0 with packets left": dict(nxt=0),
    "tp_next_offset past the block": dict(nxt=V3_ROOM),
    "tp_next_offset 0xFFFFFFFF": dict(nxt=0xFFFFFFFF),
    "next header straddles the block end": dict(nxt="straddle"),
    "tp_mac inside tpacket3_hdr": dict(mac=44),   # V2's minimum, inside V3's header
}


def _v3_hostile_block(r, over):
    """Block 1 (the ring's last): g2, a hostile packet, g3, in a chain. Returns what
    should arrive from it."""
    g2, g3 = frame(2, 80), frame(3, 90)
    mid = Pkt(frame(50, 100))
    p_mid = V3Ring.FIRST + r.step(Pkt(g2))
    kw = dict(over)
    if kw.get("snap") == "past":                     # one byte past the block end
        kw["snap"] = kw["length"] = r.unit - p_mid - r.mac0 + 1
    mid = replace(mid, **{k: v for k, v in kw.items() if k != "nxt"})
    first = Pkt(g2)
    if "nxt" in kw:
        nxt = kw["nxt"]
        if nxt == "straddle":                        # a header 39 bytes from the end
            nxt = r.unit - V3Ring.FIRST - 39
        first = replace(first, nxt=nxt)
    r.write_block(1, [first, mid, Pkt(g3)])
    if "nxt" in kw:
        return [g2]                                  # the chain is broken after g2
    return [g2, g3]


@pytest.mark.parametrize("over", list(V3_PKT_HOSTILE.values()), ids=list(V3_PKT_HOSTILE))
def test_v3_hostile_packet_header_is_counted_and_skipped(over):
    r = V3Ring(V3_ROOM, 2)
    g0, g1, g4 = frame(0), frame(1), frame(4)
    r.load([Pkt(g0), Pkt(g1)])
    want = _v3_hostile_block(r, over)
    r.head = 0                                       # block 1 was the last one written
    nbad = 3 - len(want)
    b = batch(cap=8)
    n, _ = r.receive(b)
    check_batch(b, n)
    assert frames_of(b, n) == [g0, g1] + want and r.bad[0] == nbad
    assert r.all_given_back() and r.state.tolist() == [0, 0, 0] and r.guards_intact()
    r.load([Pkt(g4)])                                # later frames still arrive
    assert drain(r) == [g4] and r.bad[0] == nbad


V3_BLOCK_HOSTILE = {
    "first packet past the block": (dict(first=V3_ROOM), 0, 3),
    "first packet 0xFFFFFFFF": (dict(first=0xFFFFFFFF), 0, 3),
    "first packet inside the descriptor": (dict(first=0), 0, 3),
    "first packet at 47": (dict(first=47), 0, 3),
    # A whole chain laid out over the descriptor's timestamps: well formed, yet
    # not where a packet can be.
    "chain starting inside the descriptor": (dict(first=40, at=40), 0, 3),
    "first header straddles the block end": (dict(first=V3_ROOM - 39), 0, 3),
    "first header in the last 40 bytes": (dict(first=V3_ROOM - 40), 0, 3),
    "num_pkts one more than written": (dict(num_pkts=4), 3, 1),
    "num_pkts huge": (dict(num_pkts=0xFFFFFFFF), 3, 0xFFFFFFFF - 3),
    "num_pkts 0": (dict(num_pkts=0), 0, 0),
}


@pytest.mark.parametrize("over,ngood,nbad", list(V3_BLOCK_HOSTILE.values()),
                         ids=list(V3_BLOCK_HOSTILE))
def test_v3_hostile_block_descriptor_is_counted_and_skipped(over, ngood, nbad):
    r = V3Ring(V3_ROOM, 2)
    g = [frame(k, 70 + k) for k in range(6)]
    r.load([Pkt(g[0])])
    r.load([Pkt(g[1]), Pkt(g[2]), Pkt(g[3])], **over)
    b = batch(cap=8)
    n, _ = r.receive(b)
    check_batch(b, n)
    # A claimed packet that cannot be found is counted, as the kernel claimed it.
    assert frames_of(b, n) == [g[0]] + g[1:1 + ngood] and r.bad[0] == nbad
    assert r.all_given_back() and r.state.tolist() == [0, 0, 0] and r.guards_intact()
    r.load([Pkt(g[4]), Pkt(g[5])])
    assert drain(r) == g[4:] and r.bad[0] == nbad


# ======================================================================== fuzz
def _fuzz_ring(rng: random.Random, kind: str):
    vnet = rng.random() < 0.5
    if kind == "v2":
        r = V2Ring(rng.choice([256, 1024, 4096]), rng.randint(1, 6), vnet)
        hdrs = []
        for s in range(r.nr):
            f = frame(s, rng.randint(14, r.unit - r.mac0))
            r.write(s, _fuzz_pkt(rng, f))
            hdrs.append((s * r.unit, 32))
    else:
        r = V3Ring(rng.choice([512, 2048, 8192]), rng.randint(1, 4), vnet)
        hdrs = []
        for blk in range(r.nr):
            pkts, used = [], V3Ring.FIRST
            while rng.random() < 0.85:
                ln = rng.randint(14, 600)
                if used + align(r.mac0 + ln, 8) > r.unit:
                    break
                pkts.append(_fuzz_pkt(rng, frame(len(pkts), ln)))
                used += align(r.mac0 + ln, 8)
            offs = r.write_block(blk, pkts, status=USER if rng.random() < 0.9 else 0)
            base = blk * r.unit
            hdrs.append((base, 24))
            hdrs += [(base + o, 48) for o in offs]
    # Corrupt header words: fields, widths and values chosen to hit the limits.
    specials = [0, 1, 13, 14, 31, 32, 41, 42, 47, 48, 0x7FFF, 0xFFFF, r.unit - 1, r.unit,
                r.unit + 1, MAX_FRAME, MAX_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF]
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.1:                       # anywhere at all
            at = rng.randrange(len(r.ring) - 4)
        else:
            h, size = rng.choice(hdrs)
            at = h + rng.randrange(0, size - 3)
            at = min(at, len(r.ring) - 4)
        width = rng.choice([1, 2, 4])
        v = rng.choice(specials) if rng.random() < 0.7 else rng.getrandbits(32)
        r.ring[at:at + width] = np.frombuffer(
            (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little"), np.uint8)
    return r


def _fuzz_pkt(rng, f):
    st = USER if rng.random() < 0.9 else 0
    if rng.random() < 0.3:
        st |= VLAN_VALID | (TPID_VALID if rng.random() < 0.5 else 0)
    return Pkt(f, status=st, tci=rng.getrandbits(16), tpid=rng.choice([0x8100, 0x88A8, 0]),
               vnet=vnet_hdr(rng.getrandbits(2), rng.choice([0, 1, 3, 4]), 0,
                             rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(16)))


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_headers_never_escape_the_ring(kind):
    rng = random.Random(0xAF00 + (kind == "v3"))
    for case in range(150):
        r = _fuzz_ring(rng, kind)
        before = r.ring.copy()
        ring_bytes = before.tobytes()
        received = 0
        for _ in range(10_000):
            cap = rng.randint(1, 8)
            # Room for any frame the ring can hold: a batch that cannot take even one
            # frame stops the reader by design (try again with the next batch).
            arena = rng.randint(r.unit + 4, 3 * r.unit)
            b = batch(cap, arena)
            n0 = rng.randint(0, cap - 1) if rng.random() < 0.3 else 0
            c0 = align(rng.randint(0, arena - r.unit - 4), ALIGN) if n0 else 0
            if c0 + r.unit + 4 > arena:
                c0 = 0
            state = r.state.copy()
            n, cursor = r.receive(b, n0, c0)
            assert r.guards_intact(), case
            check_batch(b, n, start=n0, data_start=c0)
            for fr in frames_of(b, n, n0):
                # Every byte came from the ring (a re-inserted tag aside).
                assert ring_bytes.find(fr) >= 0 or ring_bytes.find(fr[:12] + fr[16:]) >= 0
            received += n - n0
            if n == n0 and (r.state == state).all():
                break
        else:
            raise AssertionError(f"case {case}: the reader never stopped")
        # The only writes to the ring: status words given back (set to 0).
        changed = np.flatnonzero(r.ring != before)
        lo = 0 if kind == "v2" else 8
        assert ((changed % r.unit >= lo) & (changed % r.unit < lo + 4)).all(), case
        assert (r.ring[changed] == 0).all()
        # It stopped at something the kernel owns.
        assert not r.status(int(r.state[S_BLOCK])) & USER, case
        if kind == "v2":
            # Each slot handed back was either received or counted bad.
            given = {int(i) // r.unit for i in changed}
            assert received + r.bad[0] == len(given), case


# ======================================================================== Part 2: real rings
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SOL_PACKET, PACKET_AUXDATA, PACKET_OUTGOING, ETH_P_ALL = 263, 8, 4, 0x0003
BCAST = b"\xff" * 6


@pytest.fixture
def veth(tmp_path):
    """A veth pair ra <-> rb alone in a fresh namespace, removed whatever happens."""
    from hvnet.netns import Netns
    nn = Netns(f"a{os.getpid() % 10000}", tmp_path / "netns.json")
    try:
        ns = nn.add_namespace("t")
        nn.add_veth((ns, "ra"), (ns, "rb"))
        for i in ("ra", "rb"):
            nn.set_up(ns, i)
        yield ns
    finally:
        nn.teardown()


def open_ring(ns, version, offloads=True) -> RingSocket:
    # Small rings: a few frames of the minimum size for MAX_FRAME, to wrap often.
    return in_ns(ns, lambda: RingSocket("ra", offloads=offloads, version=version,
                                        frame_size=1 << 17, rx_nr=8, tx_nr=8,
                                        block_size=1 << 18, block_nr=4, retire_ms=1))


def open_peer(ns) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.bind(("rb", ETH_P_ALL))
        s.settimeout(0.05)
        return s
    return in_ns(ns, make)


def ours(f: bytes) -> bool:
    return f[6:11] == b"\x02\x00\x00\x00\xaa"       # not the stacks' IPv6 chatter


def peer_receive(s, want: int, timeout=5.0, keep=ours) -> list[bytes]:
    """Frames arriving on the peer, on the wire form: a tag the kernel took out of
    the frame (PACKET_AUXDATA) is put back. Only those ``keep`` takes count."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        try:
            data, anc, _flags, addr = s.recvmsg(1 << 17, socket.CMSG_SPACE(32))
        except socket.timeout:
            continue
        if addr[2] == PACKET_OUTGOING:
            continue
        for lvl, typ, val in anc:
            if lvl == SOL_PACKET and typ == PACKET_AUXDATA:
                st, _ln, _snap, _mac, _net, tci, tpid = struct.unpack_from("IIIHHHH", val)
                if st & VLAN_VALID:
                    tp = tpid if st & TPID_VALID else 0x8100
                    data = data[:12] + struct.pack("!HH", tp, tci) + data[12:]
        if keep(data):
            out.append(data)
    return out


@needs_root
@pytest.mark.parametrize("offloads", [True, False], ids=["vnet", "plain"])
@pytest.mark.parametrize("version", [2, 3])
def test_real_ring_receives_what_the_peer_sends(veth, version, offloads):
    sock = open_ring(veth, version, offloads)
    peer = open_peer(veth)
    kind = PacketRingPorts()
    try:
        kind.attach(SimpleNamespace(port_id=PORT), sock)
        b = PacketBatch(16)
        k = 0
        for rnd in range(12):                        # 72 frames through 8 slots / 4 blocks
            sent = [frame(k, 60), frame(k + 1, 1514),
                    frame(k + 2, 100, tag=b"\x81\x00\xa0\x0b"),        # 802.1Q prio 5 vid 11
                    frame(k + 3, 1518, tag=b"\x81\x00\x00\x07"),
                    frame(k + 4, 100, tag=b"\x88\xa8\x00\x64"),        # 802.1ad
                    frame(k + 5, 120, tag=b"\x88\xa8\x00\x64\x81\x00\x00\x0c")]  # QinQ
            k += len(sent)
            for f in sent:
                peer.send(f)
            got, oob, deadline = [], 0, time.monotonic() + 5
            while len(got) < len(sent) and time.monotonic() < deadline:
                b.reset()
                n = kind.receive(b)
                b.n = n
                for i in range(n):
                    f = b.frame(i)
                    if not ours(f):
                        continue
                    fl = int(b.meta[FLAGS, i])
                    assert b.meta[SRC_PORT, i] == PORT
                    assert not fl & F_CSUM_PARTIAL and b.meta[GSO_TYPE, i] == 0
                    if fl & F_VLAN:                  # 802.1Q handed over out of band
                        oob += 1
                        f = f[:12] + struct.pack("!HH", 0x8100, int(b.meta[TCI, i])) + f[12:]
                    got.append(f)
                if not n:
                    time.sleep(0.001)
            assert sorted(got) == sorted(sent), rnd
            # veth's receive path takes outer tags out of the frame: the two 802.1Q
            # ones come out of band, the 802.1ad ones were put back inline.
            assert oob == 2, rnd
        assert kind.bad.tolist() == [0, 0]
    finally:
        kind.close()
        peer.close()


@needs_root
@pytest.mark.parametrize("version", [2, 3])
def test_switch_transmits_through_the_ring(veth, version):
    from switch.memport import MemoryPorts
    from switch.properties import VlanProperty
    from switch.switch import Switch
    sock = open_ring(veth, version)
    peer = open_peer(veth)
    sw = Switch("afp", max_ports=8)
    rings = PacketRingPorts()
    mem = MemoryPorts(in_frames=256, in_bytes=1 << 20, out_frames=256, out_bytes=1 << 20)
    try:
        up = sw.add_port("uplink", "external", kind=rings)
        rings.attach(up, sock)
        m1, m2 = (b"\x02\x00\x00\x00\xaa" + bytes([x]) for x in (1, 2))
        p1 = sw.add_port("vm1", "synthetic", mac=m1.hex(":"), kind=mem)
        p2 = sw.add_port("vm2", "synthetic", mac=m2.hex(":"), kind=mem,
                         properties=[VlanProperty("access", access_vlan=7)])

        def bcast(src, k, size):
            f = frame(k, size)
            return BCAST + src + f[12:]

        # More frames than the transmit ring has slots: it is kicked and reused
        # within the batch.
        plain = [bcast(m1, k, 60 + 50 * k) for k in range(20)] + [bcast(m1, 20, 1514)]
        tagged = [bcast(m2, 30, 100), bcast(m2, 31, 1514)]
        assert mem.inject(p1, plain) == len(plain) and mem.inject(p2, tagged) == 2
        while mem.pending():
            sw.poll(mem)
        got = peer_receive(peer, len(plain) + len(tagged))
        # An access port's frame leaves the uplink (a trunk) with its VLAN tag.
        want = plain + [f[:12] + b"\x81\x00\x00\x07" + f[12:] for f in tagged]
        assert sorted(got) == sorted(want)
        assert rings.bad.tolist() == [0, 0]
        assert sw.counters.port_dict(up.port_id)["tx_packets"] == len(want)
    finally:
        rings.close()
        peer.close()
