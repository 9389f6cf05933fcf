"""VMBus packet formats (netvsp/vmbus/packet.py) against vmbus_netvsp.md (b).

Packets are checked byte by byte with struct formats written from the
reference tables, and hostile ones are hand-made the same way. Guest RAM is a
64-page ``mem``; the ring lives in pages 2..4 and everything else is guard.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from netvsp.vmbus import packet as P
from netvsp.vmbus import ring as R
from netvsp.vmbus.packet import (E_BUFFER, E_GPA, E_HEADER, E_KIND, E_PAGESET, E_PIECES,
                                 E_RANGE_BOUNDS, E_RANGE_COUNT, E_RANGE_OFFSET)
from netvsp.vmbus.ring import E_ARG, E_GEOMETRY, E_TOO_BIG, Ring

PAGES = 64
BASE = 2 * 4096
DS = 8192
FILL = 0xA5
NO_RESPONSE = 0xFFFFFFFFFFFFFFFD


def make(datasize=DS, pages=PAGES):
    mem = np.full(pages * 4096, FILL, dtype=np.uint8)
    r = Ring(mem, BASE, datasize)
    r.init()
    return mem, r


def guards_ok(mem, r):
    return bool((mem[:r.base] == FILL).all()
                and (mem[r.base + 4096 + r.datasize:] == FILL).all())


def ring_bytes(mem, r, pos, n):
    data = mem[r.base + 4096:r.base + 4096 + r.datasize]
    return np.roll(data, -pos)[:n].tobytes()


def desc(ptype, offset8, len8, flags=0, trans_id=0):
    # b.1: type u16 @0, offset8 u16 @2, len8 u16 @4, flags u16 @6, trans_id u64 @8
    return struct.pack("<HHHHQ", ptype, offset8, len8, flags, trans_id)


def gpa_body(ranges, payload=b"", range_cnt=None, offset8=None, ptype=9, reserved=0xDEADBEEF):
    """b.6 by hand: ranges = [(byte_count, byte_offset, [pfn, ...]), ...]."""
    rb = b"".join(struct.pack("<II", c, o) + struct.pack(f"<{len(p)}Q", *p) for c, o, p in ranges)
    hdr = struct.pack("<II", reserved, len(ranges) if range_cnt is None else range_cnt) + rb
    pl = payload + bytes(-len(payload) % 8)
    o8 = (16 + len(hdr)) // 8 if offset8 is None else offset8
    l8 = (16 + len(hdr) + len(pl)) // 8
    return desc(ptype, o8, l8, 1, 5) + hdr + pl


def xfer_body(ranges, payload=b"", pageset=0xCAFE, range_cnt=None, offset8=None):
    """b.5 by hand: ranges = [(byte_count, byte_offset), ...]."""
    hdr = struct.pack("<HBBI", pageset, 0, 0, len(ranges) if range_cnt is None else range_cnt)
    hdr += b"".join(struct.pack("<II", c, o) for c, o in ranges)
    pl = payload + bytes(-len(payload) % 8)
    o8 = (16 + len(hdr)) // 8 if offset8 is None else offset8
    return desc(7, o8, (16 + len(hdr) + len(pl)) // 8, 1, 9) + hdr + pl


def read_one(mem, r):
    p = Ring(mem, r.base, r.datasize).read_packet()
    assert p is not None
    return p


def parse_gpa(mem, r, d, max_ranges=64, cap=64):
    pieces = np.full((cap, 3), -7, dtype=np.int64)
    n = P.parse_gpa_direct(mem, r.base, r.datasize, d, max_ranges, pieces)
    return n, [tuple(int(x) for x in row) for row in pieces[:max(n, 0)]]


# ---- b.1, b.5, b.6 layouts and b.2 constants ---------------------------------------------

def fields(dt):
    return {n: (dt.fields[n][1], dt.fields[n][0].itemsize) for n in dt.names}


def test_descriptor_layout():
    dt = P.vmpacket_descriptor
    assert dt.itemsize == 16                                       # b.1
    assert fields(dt) == {"type": (0, 2), "offset8": (2, 2), "len8": (4, 2),
                          "flags": (6, 2), "trans_id": (8, 8)}


def test_transfer_page_layout():
    dt = P.vmtransfer_page_packet_header                           # b.5
    assert dt.itemsize == 24
    assert fields(dt) == {"d": (0, 16), "xfer_pageset_id": (16, 2),
                          "sender_owns_set": (18, 1), "reserved": (19, 1), "range_cnt": (20, 4)}
    assert P.vmtransfer_page_range.itemsize == 8
    assert fields(P.vmtransfer_page_range) == {"byte_count": (0, 4), "byte_offset": (4, 4)}


def test_gpa_direct_layout():
    dt = P.vmdata_gpa_direct                                       # b.6
    assert dt.itemsize == 24
    assert fields(dt) == {"d": (0, 16), "reserved": (16, 4), "range_cnt": (20, 4)}
    assert fields(P.gpa_range) == {"byte_count": (0, 4), "byte_offset": (4, 4)}
    assert P.GPA_RANGE_PFN == 8                                    # pfn_array u64[] follows


def test_constants():
    # b.2 table
    assert [P.VM_PKT_INVALID, P.VM_PKT_SYNCH, P.VM_PKT_ADD_XFER_PAGESET,
            P.VM_PKT_RM_XFER_PAGESET, P.VM_PKT_ESTABLISH_GPADL, P.VM_PKT_TEARDOWN_GPADL,
            P.VM_PKT_DATA_INBAND, P.VM_PKT_DATA_USING_XFER_PAGES, P.VM_PKT_DATA_USING_GPADL,
            P.VM_PKT_DATA_USING_GPA_DIRECT, P.VM_PKT_CANCEL_REQUEST, P.VM_PKT_COMP,
            P.VM_PKT_DATA_USING_ADDITIONAL_PKT, P.VM_PKT_ADDITIONAL_DATA] == list(range(14))
    assert P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED == 1     # b.1
    assert P.VMBUS_RQST_ID_NO_RESPONSE == 0xFFFFFFFFFFFFFFFD      # b.3
    assert P.RQST_ID_NO_RESPONSE_I64 == -3
    assert P.NETVSC_MAX_PKT_SIZE == 24 + 562 * 8 + 40 + 64         # a.5.2
    # every error code distinct
    assert len(set(P.ERRORS)) == len(P.ERRORS)


# ---- in-band and completion (b.3, b.4) ------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 100])
@pytest.mark.parametrize("pos", [0, 64, DS - 8, DS - 16, DS - 24])
def test_inband_wire_format(n, pos):
    mem, r = make()
    mem[r.base + 4096:r.base + 4096 + DS] = 0xEE          # padding must be written as zero
    src = np.arange(1, n + 1, dtype=np.uint8)
    end = P.build_inband(mem, r.base, DS, pos, 6, 1, 1234, src, 0, n)
    pad = -n % 8
    fp = 16 + n + pad + 8
    assert end == (pos + fp) % DS and fp == P.inband_footprint(n)
    b = ring_bytes(mem, r, pos, fp)
    assert struct.unpack("<HHHHQ", b[:16]) == (6, 2, 2 + (n + pad) // 8, 1, 1234)
    assert b[16:16 + n] == src.tobytes() and b[16 + n:16 + n + pad] == bytes(pad)
    assert struct.unpack("<Q", b[-8:])[0] == pos << 32                      # a.4.4
    assert guards_ok(mem, r)


def test_completion_empty_and_no_response_id():
    mem, r = make()
    empty = np.zeros(0, dtype=np.uint8)
    end = P.build_inband(mem, r.base, DS, 0, P.VM_PKT_COMP, 0, 42, empty, 0, 0)
    assert end == 24
    assert struct.unpack("<HHHHQ", ring_bytes(mem, r, 0, 16)) == (0xB, 2, 2, 0, 42)   # b.4
    end = P.build_inband(mem, r.base, DS, end, 6, 0, P.RQST_ID_NO_RESPONSE_I64, empty, 0, 0)
    assert struct.unpack("<Q", ring_bytes(mem, r, 32, 8))[0] == NO_RESPONSE          # b.3


def test_inband_refusals():
    mem, r = make()
    snap = mem.copy()
    src = np.zeros(16, dtype=np.uint8)
    assert P.build_inband(mem, r.base, DS, 0, 7, 0, 0, src, 0, 8) == E_ARG     # not in-band
    assert P.build_inband(mem, r.base, DS, 0, 6, 2, 0, src, 0, 8) == E_ARG     # flag bit 1
    assert P.build_inband(mem, r.base, DS, 4, 6, 0, 0, src, 0, 8) == E_ARG     # pos unaligned
    assert P.build_inband(mem, r.base, DS, 0, 6, 0, 0, src, 10, 8) == E_ARG    # src too short
    assert P.build_inband(mem, r.base, DS + 8, 0, 6, 0, 0, src, 0, 8) == E_GEOMETRY
    big = np.zeros(DS, dtype=np.uint8)
    assert P.build_inband(mem, r.base, DS, 0, 6, 0, 0, big, 0, DS - 24) == E_TOO_BIG
    assert P.build_inband(mem, r.base, DS, 0, 6, 0, 0, big, 0, DS - 32) == DS - 8
    mem[:] = snap
    huge_mem = np.zeros(4096 + (1 << 20), dtype=np.uint8)
    huge = np.zeros(0x10000 * 8, dtype=np.uint8)
    assert P.build_inband(huge_mem, 0, 1 << 20, 0, 6, 0, 0, huge, 0, (0xFFFF - 1) * 8) == E_TOO_BIG
    assert P.build_inband(huge_mem, 0, 1 << 20, 0, 6, 0, 0, huge, 0, (0xFFFF - 2) * 8) > 0


# ---- transfer page (b.5) ----------------------------------------------------------------------

@pytest.mark.parametrize("pos", [0, 4000, DS - 8, DS - 24, DS - 40])
@pytest.mark.parametrize("nr", [0, 1, 3, 17])
def test_xfer_page_wire_format_and_round_trip(pos, nr):
    mem, r = make()
    r.write_index = r.read_index = pos
    ranges = np.array([[100 + i, 4096 * i + 8 * i] for i in range(max(nr, 1))], dtype=np.int64)
    payload = np.arange(40, dtype=np.uint8)               # an NVSP message, say
    start = R.ring_write_begin(mem, r.base, DS, P.xfer_footprint(nr, 40))
    assert start == pos
    end = P.build_xfer_page(mem, r.base, DS, start, 0xCAFE, 1, 77, ranges, nr, payload, 0, 40)
    fp = 24 + 8 * nr + 40 + 8
    assert end == (pos + fp) % DS
    b = ring_bytes(mem, r, pos, fp)
    assert struct.unpack("<HHHHQ", b[:16]) == (7, 3 + nr, 3 + nr + 5, 1, 77)
    assert struct.unpack("<HBBI", b[16:24]) == (0xCAFE, 0, 0, nr)
    for i in range(nr):
        assert struct.unpack("<II", b[24 + 8 * i:32 + 8 * i]) == tuple(ranges[i])
    assert b[24 + 8 * nr:24 + 8 * nr + 40] == payload.tobytes()
    assert R.ring_write_commit(mem, r.base, DS, start, end) == 1
    p = read_one(mem, r)
    assert (p.type, p.trans_id, p.payload) == (7, 77, payload.tobytes())
    out = np.zeros((32, 2), dtype=np.int64)
    assert P.parse_xfer_page(mem, r.base, DS, p.desc, 0xCAFE, 1 << 20, 32, out) == nr
    assert (out[:nr] == ranges[:nr]).all()
    assert guards_ok(mem, r)


def test_xfer_page_refusals():
    mem, r = make()
    snap = mem.copy()
    pl = np.zeros(8, dtype=np.uint8)
    good = np.array([[10, 0]], dtype=np.int64)
    b = (mem, r.base, DS, 0)
    assert P.build_xfer_page(*b, 0x10000, 1, 0, good, 1, pl, 0, 8) == E_ARG     # id > u16
    assert P.build_xfer_page(*b, 1, 3, 0, good, 1, pl, 0, 8) == E_ARG           # flags
    assert P.build_xfer_page(*b, 1, 1, 0, good, 2, pl, 0, 8) == E_ARG           # nranges > rows
    assert P.build_xfer_page(*b, 1, 1, 0, np.array([[1 << 32, 0]]), 1, pl, 0, 8) == E_ARG
    assert P.build_xfer_page(*b, 1, 1, 0, np.array([[0, -1]]), 1, pl, 0, 8) == E_ARG
    many = np.zeros((DS // 8, 2), dtype=np.int64)
    assert P.build_xfer_page(*b, 1, 1, 0, many, DS // 8, pl, 0, 8) == E_TOO_BIG
    assert (mem == snap).all()                             # refused before writing


def test_xfer_batch_one_signal():
    mem, r = make()
    ranges = np.array([[60, 0]], dtype=np.int64)
    pl = np.zeros(32, dtype=np.uint8)
    room = R.ring_bytes_to_write(mem, r.base, DS)
    start = R.ring_write_begin(mem, r.base, DS, P.xfer_footprint(1, 32))
    pos, k = start, 0
    while room > P.xfer_footprint(1, 32):          # a.3: never completely full
        ranges[0, 1] = 64 * k
        pos = P.build_xfer_page(mem, r.base, DS, pos, 0xCAFE, 1, k, ranges, 1, pl, 0, 32)
        room -= P.xfer_footprint(1, 32)
        k += 1
    assert R.ring_write_commit(mem, r.base, DS, start, pos) == 1
    assert R.ring_bytes_to_write(mem, r.base, DS) == room > 0
    reader = Ring(mem, r.base, DS)
    out = np.zeros((4, 2), dtype=np.int64)
    for i in range(k):
        p = reader.read_packet()
        assert p.trans_id == i
        assert P.parse_xfer_page(mem, r.base, DS, p.desc, 0xCAFE, 1 << 20, 4, out) == 1
        assert tuple(out[0]) == (60, 64 * i)
    assert reader.read_packet() is None


@pytest.mark.parametrize("body,code", [
    (xfer_body([(10, 0)], pageset=0xBEEF), E_PAGESET),
    (xfer_body([(10, 0)] * 5), E_RANGE_COUNT),                    # > max_ranges 4
    (xfer_body([(10, 0)], range_cnt=0xFFFFFFFF), E_RANGE_COUNT),
    (xfer_body([(10, 0)], range_cnt=3, offset8=4), E_RANGE_BOUNDS),   # 24 + 24 > 32
    (xfer_body([(10, 0), (10, 0)], b"x" * 16, offset8=4), E_RANGE_BOUNDS),
    (xfer_body([(10, 4096 * 16 - 9)]), E_BUFFER),                 # ends past the buffer
    (xfer_body([(0xFFFFFFFF, 0xFFFFFFFF)]), E_BUFFER),
    (xfer_body([(1, 4096 * 16)]), E_BUFFER),
    (desc(7, 2, 4, 1, 1) + bytes(16), E_HEADER),                  # offset8*8 < 24
    (desc(6, 2, 2), E_KIND),
])
def test_parse_xfer_page_hostile(body, code):
    mem, r = make()
    assert r.write_raw(body)[0]
    p = read_one(mem, r)
    out = np.zeros((4, 2), dtype=np.int64)
    assert P.parse_xfer_page(mem, r.base, DS, p.desc, 0xCAFE, 4096 * 16, 4, out) == code


def test_parse_xfer_page_edges_accepted():
    mem, r = make()
    r.write_raw(xfer_body([(10, 4096 * 16 - 10), (0, 4096 * 16)]))
    out = np.zeros((4, 2), dtype=np.int64)
    assert P.parse_xfer_page(mem, r.base, DS, read_one(mem, r).desc, 0xCAFE, 4096 * 16, 4,
                             out) == 2


# ---- GPA direct (b.6) -----------------------------------------------------------------------

@pytest.mark.parametrize("pos", [0, DS - 8, DS - 32, DS - 48])
def test_gpa_direct_build_and_parse(pos):
    mem, r = make()
    r.write_index = r.read_index = pos
    bufs = np.array([[5 * 4096 + 100, 200],           # inside one page
                     [7 * 4096 + 4000, 5000],         # three pages
                     [20 * 4096, 4096],               # exactly one page
                     [30 * 4096 + 8, 0]], dtype=np.int64)   # empty
    payload = np.arange(40, dtype=np.uint8)
    fp = P.gpa_direct_footprint(bufs, 4, 40)
    hdr = 24 + (8 + 8) + (8 + 24) + (8 + 8) + (8 + 8)
    assert fp == hdr + 40 + 8
    start = R.ring_write_begin(mem, r.base, DS, fp)
    end = P.build_gpa_direct(mem, r.base, DS, start, 1, 99, bufs, 4, payload, 0, 40)
    assert end == (pos + fp) % DS
    b = ring_bytes(mem, r, pos, fp)
    assert struct.unpack("<HHHHQ", b[:16]) == (9, hdr // 8, hdr // 8 + 5, 1, 99)
    assert struct.unpack("<II", b[16:24]) == (0, 4)
    assert struct.unpack("<IIQ", b[24:40]) == (200, 100, 5)
    assert struct.unpack("<IIQQQ", b[40:72]) == (5000, 4000, 7, 8, 9)
    assert struct.unpack("<IIQ", b[72:88]) == (4096, 0, 20)
    assert struct.unpack("<IIQ", b[88:104]) == (0, 8, 30)    # ceil((8 + 0)/4096) = 1 PFN
    assert b[hdr:hdr + 40] == payload.tobytes()
    R.ring_write_commit(mem, r.base, DS, start, end)
    p = read_one(mem, r)
    assert p.payload == payload.tobytes()
    n, pieces = parse_gpa(mem, r, p.desc)
    assert pieces == [(5 * 4096 + 100, 200, 0), (7 * 4096 + 4000, 5000, 1), (20 * 4096, 4096, 2)]
    assert guards_ok(mem, r)


def test_gpa_direct_non_contiguous_pfns_split():
    mem, r = make()
    r.write_raw(gpa_body([(6000, 96, [10, 3]), (4096, 0, [11])]))
    n, pieces = parse_gpa(mem, r, read_one(mem, r).desc)
    # range 0: 4000 bytes in page 10, 2000 in page 3; range 1 does not merge with page 10
    assert pieces == [(10 * 4096 + 96, 4000, 0), (3 * 4096, 2000, 0), (11 * 4096, 4096, 1)]


def test_gpa_direct_old_linux_one_pfn_per_range():
    mem, r = make()
    # vmbus_sendpacket_pagebuffer: one PFN per range, offset8 = (24 + 16n) / 8
    body = gpa_body([(96, 4000, [8]), (4096, 0, [9]), (50, 0, [10])])
    assert struct.unpack("<H", body[2:4])[0] == (24 + 16 * 3) // 8
    r.write_raw(body)
    n, pieces = parse_gpa(mem, r, read_one(mem, r).desc)
    # ranges 0 and 1 are physically adjacent but stay separate pieces
    assert pieces == [(8 * 4096 + 4000, 96, 0), (9 * 4096, 4096, 1), (10 * 4096, 50, 2)]


def test_gpa_direct_range_crossing_page_in_one_pfn_is_truncated_to_its_pfns():
    # byte_offset + byte_count > 4096 needs 2 PFNs; only 1 present before the payload
    mem, r = make()
    r.write_raw(gpa_body([(100, 4000, [8])], payload=b"p" * 8))
    assert parse_gpa(mem, r, read_one(mem, r).desc)[0] == E_RANGE_BOUNDS


@pytest.mark.parametrize("body,code", [
    (gpa_body([(10, 0, [8])], range_cnt=0), E_RANGE_COUNT),            # b.6: OpenVMM rejects 0
    (gpa_body([(10, 0, [8])] * 5), E_RANGE_COUNT),                     # > max_ranges 4
    (gpa_body([(10, 0, [8])], range_cnt=0xFFFFFFFF), E_RANGE_COUNT),
    (gpa_body([(10, 0, [8])], range_cnt=3), E_RANGE_BOUNDS),           # only one present
    (gpa_body([(10, 4096, [8])]), E_RANGE_OFFSET),                     # byte_offset < 4096
    (gpa_body([(10, 0xFFFFFFFF, [8])]), E_RANGE_OFFSET),
    (gpa_body([(0xFFFFFFFF, 0, [8])]), E_RANGE_BOUNDS),                # 1M PFNs claimed
    (gpa_body([(8192, 0, [8])]), E_RANGE_BOUNDS),                      # 2 PFNs needed, 1 given
    (gpa_body([(10, 0, [8])], payload=b"x" * 8, offset8=4), E_RANGE_BOUNDS),  # PFN in payload
    (gpa_body([(10, 0, [PAGES])]), E_GPA),                             # past guest RAM
    (gpa_body([(10, 0, [(1 << 63) + 8])]), E_GPA),                     # sign bit
    (gpa_body([(10, 0, [1 << 52])]), E_GPA),                           # * 4096 overflows
    (gpa_body([(10, 0, [8, 9])], offset8=2), E_HEADER),                # no room for the header
    (gpa_body([], offset8=2, range_cnt=1), E_HEADER),
    (gpa_body([(10, 0, [8])], ptype=6), E_KIND),
    (gpa_body([(10, 0, [8])], ptype=7), E_KIND),
])
def test_parse_gpa_direct_hostile(body, code):
    mem, r = make()
    assert r.write_raw(body)[0]
    snap = mem.copy()
    n, _ = parse_gpa(mem, r, read_one(mem, r).desc, max_ranges=4)
    assert n == code
    assert (mem == snap).all()


def test_parse_gpa_direct_output_limits_and_bad_desc():
    mem, r = make()
    r.write_raw(gpa_body([(100, 0, [8]), (100, 0, [10]), (100, 0, [12])]))
    d = read_one(mem, r).desc
    assert parse_gpa(mem, r, d, cap=2)[0] == E_PIECES
    assert parse_gpa(mem, r, d, cap=3)[0] == 3
    assert parse_gpa(mem, r, d, max_ranges=2)[0] == E_RANGE_COUNT
    pieces = np.zeros((8, 2), dtype=np.int64)                   # no range column
    assert P.parse_gpa_direct(mem, r.base, DS, d, 8, pieces) == E_ARG
    for slot, v in [(R.D_START, 4), (R.D_START, DS), (R.D_OFFSET8, 1),
                    (R.D_OFFSET8, 100), (R.D_LEN8, DS // 8)]:
        bad = d.copy()
        bad[slot] = v
        assert parse_gpa(mem, r, bad)[0] == E_ARG
    assert parse_gpa(mem, r, d[:5])[0] == E_ARG
    assert P.parse_gpa_direct(mem, r.base, DS + 8, d, 8, np.zeros((8, 3), np.int64)) == \
        E_GEOMETRY


def test_gpa_direct_footprint_refusals():
    assert P.gpa_direct_footprint(np.array([[-1, 10]], dtype=np.int64), 1, 0) == E_ARG
    assert P.gpa_direct_footprint(np.array([[0, 1 << 32]], dtype=np.int64), 1, 0) == E_ARG
    assert P.gpa_direct_footprint(np.array([[0, 10]], dtype=np.int64), 2, 0) == E_ARG
    assert P.gpa_direct_footprint(np.array([[0, 10]], dtype=np.int64), 1, -1) == E_ARG


def test_fuzz_packet_headers():
    """~300 valid GPA-direct / transfer-page packets at random ring positions with
    random bytes of their descriptor and headers overwritten: the parsers return
    an error or pieces inside guest RAM, and write nothing outside their output."""
    rng = np.random.default_rng(7)
    mem, r = make()
    base = r.base
    pieces = np.zeros((32, 3), dtype=np.int64)
    xr = np.zeros((32, 2), dtype=np.int64)
    pl = rng.integers(0, 256, 64, dtype=np.uint8)
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    codes = set()
    for it in range(300):
        R.ring_init(mem, base, DS)
        pos = int(rng.integers(0, DS // 8)) * 8
        r.write_index = r.read_index = pos
        nb = int(rng.integers(1, 5))
        if it % 2:
            bufs = np.stack([rng.integers(0, (PAGES - 4) * 4096, nb),
                             rng.integers(0, 9000, nb)], axis=1).astype(np.int64)
            fp = P.gpa_direct_footprint(bufs, nb, 64)
            end = P.build_gpa_direct(mem, base, DS, pos, 1, it, bufs, nb, pl, 0, 64)
        else:
            bufs = rng.integers(0, 1 << 16, (nb, 2)).astype(np.int64)
            fp = P.xfer_footprint(nb, 64)
            end = P.build_xfer_page(mem, base, DS, pos, 0xCAFE, 1, it, bufs, nb, pl, 0, 64)
        assert end == (pos + fp) % DS
        R.ring_write_commit(mem, base, DS, pos, end)
        hdr = fp - 64 - 8
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(0, hdr)) if rng.integers(0, 4) else int(rng.integers(16, 24))
            v = int(rng.choice([0, 0xFF, 0x10, rng.integers(0, 256)]))
            mem[base + 4096 + (pos + k) % DS] = v
        rc = R.ring_read_packet(mem, base, DS, pos, d)
        codes.add(rc)
        if rc == 0:
            if d[R.D_TYPE] == 9:
                n = P.parse_gpa_direct(mem, base, DS, d, 8, pieces)
                if n >= 0:
                    g, ln = pieces[:n, 0], pieces[:n, 1]
                    assert (g >= 0).all() and (ln > 0).all() and (g + ln <= len(mem)).all()
                    assert (pieces[:n, 2] < 8).all()
            elif d[R.D_TYPE] == 7:
                n = P.parse_xfer_page(mem, base, DS, d, 0xCAFE, 1 << 16, 8, xr)
                if n >= 0:
                    assert (xr[:n, 0] + xr[:n, 1] <= 1 << 16).all()
            else:
                n = P.parse_gpa_direct(mem, base, DS, d, 8, pieces)
                assert n == E_KIND
            codes.add(int(n))
        assert guards_ok(mem, r), it
    assert {0, E_RANGE_OFFSET, E_RANGE_BOUNDS, E_RANGE_COUNT} <= codes
    assert len(codes & {R.E_TYPE, R.E_LEN8, R.E_TRUNCATED, R.E_FLAGS, R.E_OFFSET8}) >= 3
