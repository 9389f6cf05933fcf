"""VMBus ring buffer (netvsp/vmbus/ring.py) against vmbus_netvsp.md (a).

Expected numbers are transcribed from the reference tables, not taken from the
module. Every ring sits between guard bytes inside ``mem``; each test that
writes checks them.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from netvsp.vmbus import ring as R
from netvsp.vmbus.ring import (E_ARG, E_EMPTY, E_FLAGS, E_FULL, E_GEOMETRY, E_INDEX, E_LEN8,
                               E_OFFSET8, E_TOO_BIG, E_TRUNCATED, E_TYPE, Ring, RingError)

GUARD = 4096
FILL = 0xA5
NO_RESPONSE = 0xFFFFFFFFFFFFFFFD


def make(datasize=8192, guard=GUARD):
    """mem = guard | control page | data | guard, ring initialised."""
    mem = np.full(guard + 4096 + datasize + guard, FILL, dtype=np.uint8)
    r = Ring(mem, guard, datasize)
    r.init()
    return mem, r


def guards_ok(mem, r):
    end = r.base + 4096 + r.datasize
    return bool((mem[:r.base] == FILL).all() and (mem[end:] == FILL).all())


def desc_bytes(ptype, offset8, len8, flags=0, trans_id=0):
    # b.1: type u16 @0, offset8 u16 @2, len8 u16 @4, flags u16 @6, trans_id u64 @8
    return struct.pack("<HHHHQ", ptype, offset8, len8, flags, trans_id)


def u64_at(mem, r, pos):
    p = r.base + 4096 + pos
    return int.from_bytes(mem[p:p + 8].tobytes(), "little")


def set_indices(r, w, rd):
    r.write_index, r.read_index = w, rd


# ---- a.2 layout -------------------------------------------------------------------

def test_control_page_layout():
    dt = R.hv_ring_buffer
    assert dt.itemsize == 4096                      # a.2: 4096 bytes, packed
    f = {n: (dt.fields[n][1], dt.fields[n][0].itemsize) for n in dt.names}
    assert f["write_index"] == (0x00, 4)            # a.2 table
    assert f["read_index"] == (0x04, 4)
    assert f["interrupt_mask"] == (0x08, 4)
    assert f["pending_send_sz"] == (0x0C, 4)
    assert f["reserved1"] == (0x10, 48)
    assert f["feature_bits"] == (0x40, 4)
    assert f["reserved2"] == (0x44, 4028)
    assert R.CONTROL == 4096 and R.TRAILER == 8     # a.1, a.4.4


def test_init_zeroes_control_page_and_sets_feature_bit():
    mem = np.full(GUARD * 2 + 4096 + 8192, FILL, dtype=np.uint8)
    assert R.ring_init(mem, GUARD, 8192) == 0
    ctl = mem[GUARD:GUARD + 4096]
    assert int.from_bytes(ctl[0x40:0x44].tobytes(), "little") == 1   # a.2 feature_bits
    ctl[0x40] = 0
    assert not ctl.any()                                              # indices 0, reserved 0
    assert (mem[GUARD + 4096:] == FILL).all() and (mem[:GUARD] == FILL).all()


# ---- round trips ------------------------------------------------------------------

def test_round_trip_many_sizes_with_wrap():
    mem, r = make(8192)
    rng = np.random.default_rng(1)
    straddled = 0
    for i in range(600):
        n = int(rng.integers(0, 700))
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        tid = int(rng.integers(0, 1 << 63)) * 2 + 1
        flags = i & 1
        ptype = 6 if i % 3 else 0xB
        start = r.write_index
        ok, _ = r.write_packet(ptype, payload, tid, flags)
        assert ok
        fp = 16 + (n + 7) // 8 * 8 + 8
        if start + fp > r.datasize:
            straddled += 1
        # a.4.4: trailer after len8*8 bytes holds the start offset in the high half
        assert u64_at(mem, r, (start + fp - 8) % r.datasize) == start << 32
        assert r.write_index == (start + fp) % r.datasize
        p = r.read_packet()
        assert (p.type, p.flags, p.trans_id) == (ptype, flags, tid)
        assert p.offset8 == 2 and p.len8 == 2 + (n + 7) // 8
        assert p.payload == payload + bytes(-n % 8)
        assert r.read_packet() is None
        r.commit_read()
        assert r.read_index == r.write_index
    assert straddled > 10
    assert guards_ok(mem, r)


def test_batch_of_packets_read_in_order_then_committed():
    mem, r = make(4096)
    sent = [bytes([k]) * (k * 13 % 200) for k in range(12)]
    for k, s in enumerate(sent):
        assert r.write_packet(6, s, k + 1)[0]
    got = []
    while (p := r.read_packet()) is not None:
        got.append((p.trans_id, p.payload[:len(sent[p.trans_id - 1])]))
    assert got == [(k + 1, s) for k, s in enumerate(sent)]
    assert r.read_index == 0            # nothing published until the commit (a.5.3)
    r.commit_read()
    assert r.read_index == r.write_index
    assert guards_ok(mem, r)


def test_ring_put_get_wrap_at_datasize():
    mem, r = make(4096)
    src = np.arange(100, dtype=np.uint8)
    pos = R.ring_put(mem, r.base, 4096, 4096 - 40, src, 0, 100)
    assert pos == 60
    data = mem[r.base + 4096:r.base + 8192]
    assert (data[4096 - 40:] == src[:40]).all() and (data[:60] == src[40:]).all()
    dst = np.zeros(110, dtype=np.uint8)
    assert R.ring_get(mem, r.base, 4096, 4096 - 40, dst, 10, 100) == 60
    assert (dst[10:] == src).all() and not dst[:10].any()
    assert guards_ok(mem, r)


def test_bytes_to_read_and_write():
    mem, r = make(8192)
    for w, rd in [(0, 0), (800, 0), (0, 800), (8000, 16), (16, 8000)]:
        set_indices(r, w, rd)
        # a.3 formulas
        exp_read = w - rd if w >= rd else 8192 - rd + w
        exp_write = 8192 - (w - rd) if w >= rd else rd - w
        assert r.bytes_to_read() == exp_read
        assert r.bytes_to_write() == exp_write


# ---- a.3 never completely full --------------------------------------------------------

def test_never_completely_full_at_exact_boundary():
    mem, r = make(8192)
    # free == need: refused; free == need + 8: accepted
    set_indices(r, 1000, 1000 + 64)            # bytes writable = 64
    assert R.ring_write_begin(mem, r.base, 8192, 64) == E_FULL
    assert R.ring_write_begin(mem, r.base, 8192, 56) == 1000
    set_indices(r, 8192 - 8, 8)                # wraps: writable 16
    assert R.ring_write_begin(mem, r.base, 8192, 16) == E_FULL
    assert R.ring_write_begin(mem, r.base, 8192, 8) == 8192 - 8


def test_filling_stops_one_slot_short():
    mem, r = make(4096)
    n = 0
    while r.write_packet(6, b"x" * 40)[0]:         # footprint 16 + 40 + 8 = 64
        n += 1
    assert n == 4096 // 64 - 1                     # 63 fit: the 64th would fill it
    assert r.bytes_to_write() == 64 and r.bytes_to_read() == 4096 - 64
    r.read_packet()
    r.commit_read()
    assert r.write_packet(6, b"x" * 40)[0]         # room again
    assert guards_ok(mem, r)


def test_too_big_and_bad_need():
    mem, r = make(4096)
    assert R.ring_write_begin(mem, r.base, 4096, 4096) == E_TOO_BIG
    assert R.ring_write_begin(mem, r.base, 4096, 4096 - 8) >= 0   # a.3 maximum: size - 8
    assert R.ring_write_begin(mem, r.base, 4096, 0) == E_ARG
    assert R.ring_write_begin(mem, r.base, 4096, 20) == E_ARG      # footprints are 8-multiples
    with pytest.raises(RingError):
        r.write_packet(6, b"y" * 4096)


# ---- a.4.6 writer's signal -----------------------------------------------------------------

def test_signal_on_empty_to_nonempty_only():
    mem, r = make()
    assert r.write_packet(6, b"a") == (True, True)      # empty before, mask 0
    assert r.write_packet(6, b"b") == (True, False)     # not empty before
    r.read_packet()
    r.commit_read()                                     # one left: still non-empty
    assert r.write_packet(6, b"c") == (True, False)
    r.read_packet(), r.read_packet()
    r.commit_read()
    assert r.write_packet(6, b"d") == (True, True)      # drained: empty again


def test_signal_suppressed_by_interrupt_mask():
    mem, r = make()
    r.interrupt_mask = 1
    assert r.write_packet(6, b"a") == (True, False)     # empty before, but masked
    r.read_packet()
    r.commit_read()
    r.interrupt_mask = 0
    assert r.write_packet(6, b"b") == (True, True)
    r.read_packet()
    r.commit_read()
    r.interrupt_mask = 0x80000000                       # any non-zero value masks
    assert r.write_packet(6, b"c") == (True, False)


def test_signal_evaluated_once_per_batch():
    mem, r = make()
    base, ds = r.base, r.datasize
    from netvsp.vmbus.packet import build_inband
    src = np.zeros(8, dtype=np.uint8)
    start = R.ring_write_begin(mem, base, ds, 32)
    pos = start
    for k in range(5):
        pos = build_inband(mem, base, ds, pos, 6, 0, k, src, 0, 8)
    assert R.ring_write_commit(mem, base, ds, start, pos) == 1    # empty before the batch
    assert r.write_index == pos
    # a second batch while the first is unread: no signal
    start2 = R.ring_write_begin(mem, base, ds, 32)
    pos2 = build_inband(mem, base, ds, start2, 6, 0, 9, src, 0, 8)
    assert R.ring_write_commit(mem, base, ds, start2, pos2) == 0
    assert [r.read_packet().trans_id for _ in range(6)] == [0, 1, 2, 3, 4, 9]
    r.commit_read()
    # an empty batch on an empty ring publishes nothing new and does not signal
    w = r.write_index
    assert R.ring_write_commit(mem, base, ds, w, w) == 0


# ---- a.5.4 reader's signal -------------------------------------------------------------------

def _reader_signal(feature, pending, w, old_r, new_r, ds=8192):
    mem, r = make(ds)
    r.feature_bits = feature
    r.pending_send_sz = pending
    set_indices(r, w, old_r)
    sig = R.ring_read_commit(mem, r.base, ds, new_r, old_r)
    assert r.read_index == new_r
    return sig


@pytest.mark.parametrize("feature,pending,w,old_r,new_r,expect", [
    # free = bytes writable (a.3); w=8000, old_r=0: before 192; new_r=800: after 992
    (1, 512, 8000, 0, 800, 1),         # before 192 <= 512 < after 992: crossing
    (1, 1024, 8000, 0, 1600, 1),       # after 1792
    (1, 0, 8000, 0, 1600, 0),          # pending 0: writer not blocked
    (0, 512, 8000, 0, 800, 0),         # feature bit off: never signal for space
    (2, 512, 8000, 0, 800, 0),         # only bit 0 is feat_pending_send_sz
    (3, 512, 8000, 0, 800, 1),         # other bits ignored
    (1, 100, 8000, 0, 800, 0),         # before 192 > 100: had enough already
    (1, 2000, 8000, 0, 800, 0),        # after 992 <= 2000: still not enough
    (1, 992, 8000, 0, 800, 0),         # after == pending: exactly full is not enough
    (1, 984, 8000, 0, 800, 1),         # after 992 > 984
    (1, 192, 8000, 0, 800, 1),         # before == pending counts as "not enough"
    (1, 999, 8000, 0, 800, 0),         # low bits masked: 999 -> 992 == after
    (1, 991, 8000, 0, 800, 1),         # 991 -> 984 < 992
    (1, 7, 8000, 0, 800, 0),           # 7 -> 0: nothing pending
    (1, 0xFFFFFFFF, 8000, 0, 800, 0),  # absurd pending: never reached
    (1, 800, 8000, 0, 0, 0),           # nothing read: before == after
    (1, 4000, 800, 1600, 8000, 1),     # w < r: before 800, after 7200
    (1, 2000, 6000, 7000, 200, 1),     # read across the end: before 1000, after 2392
    (1, 500, 6000, 7000, 200, 0),      # before 1000 > 500
])
def test_read_commit_signal(feature, pending, w, old_r, new_r, expect):
    # the a.5.4 rule as a model, to catch a slip in the table itself
    before = 8192 - ((w - old_r) % 8192)
    after = 8192 - ((w - new_r) % 8192)
    p = pending & ~7
    assert int(bool(feature & 1) and p != 0 and before <= p < after) == expect
    assert _reader_signal(feature, pending, w, old_r, new_r) == expect


def test_read_commit_ignores_interrupt_mask():
    mem, r = make()
    r.pending_send_sz = 512
    r.interrupt_mask = 1
    set_indices(r, 8000, 0)
    assert R.ring_read_commit(mem, r.base, 8192, 800, 0) == 1


def test_writer_pending_flow_control():
    mem, r = make(4096)
    while r.write_packet(6, b"z" * 100)[0]:
        pass
    need = 16 + 104 + 8
    assert R.ring_write_begin(mem, r.base, 4096, need) == E_FULL
    assert r.set_pending(need - 3) is False            # a.4.2: rounded up to 8
    assert r.pending_send_sz == need
    signals = []
    while r.read_packet() is not None:
        signals.append(r.commit_read())
    assert signals.count(True) == 1 and signals[0] is True   # first crossing only
    assert r.set_pending(need) is True                 # room now: nothing left pending
    assert r.pending_send_sz == 0
    r.pending_send_sz = need
    r.clear_pending()
    assert r.pending_send_sz == 0
    assert R.ring_set_pending(mem, r.base, 4096, 4096) == E_TOO_BIG


def test_reader_interrupt_masking_race():
    mem, r = make()
    r.begin_read()
    assert r.interrupt_mask == 1
    assert r.write_packet(6, b"late") == (True, False)     # masked: writer stays silent
    assert r.end_read() > 0                                # a.5.5 re-check finds it
    assert r.interrupt_mask == 0
    r.read_packet()
    r.commit_read()
    assert r.end_read() == 0


# ---- hostile memory ------------------------------------------------------------------------

BAD_INDICES = [8192, 8200, 0xFFFFFFF8, 4, 12, 8191, 0xFFFFFFFF]


@pytest.mark.parametrize("bad", BAD_INDICES)
def test_corrupt_write_index(bad):
    mem, r = make()
    r.write_packet(6, b"ok")
    snapshot = mem.copy()
    r.write_index = bad
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    b, ds = r.base, r.datasize
    assert R.ring_read_packet(mem, b, ds, 0, d) == E_INDEX
    assert R.ring_write_begin(mem, b, ds, 32) == E_INDEX
    assert R.ring_bytes_to_read(mem, b, ds) == E_INDEX
    assert R.ring_bytes_to_write(mem, b, ds) == E_INDEX
    assert R.ring_set_pending(mem, b, ds, 64) == E_INDEX
    assert R.ring_end_read(mem, b, ds) == E_INDEX
    r.pending_send_sz = 64
    assert R.ring_read_commit(mem, b, ds, 0, 0) == E_INDEX
    assert not d.any()
    assert guards_ok(mem, r)
    changed = np.nonzero(mem != snapshot)[0] - r.base
    assert set(changed) <= set(range(0, 16))             # only control words


@pytest.mark.parametrize("bad", BAD_INDICES)
def test_corrupt_read_index(bad):
    mem, r = make()
    r.write_packet(6, b"ok")
    r.read_index = bad
    b, ds = r.base, r.datasize
    assert R.ring_write_begin(mem, b, ds, 32) == E_INDEX
    assert R.ring_read_pos(mem, b, ds) == E_INDEX
    assert R.ring_write_commit(mem, b, ds, 0, 32) == E_INDEX
    with pytest.raises(RingError) as e:
        Ring(mem, b, ds).read_packet()
    assert e.value.code == E_INDEX
    assert guards_ok(mem, r)


def _hostile(body, w=None):
    """A ring whose writer put ``body`` (descriptor included) at 0."""
    mem, r = make(4096)
    assert r.write_raw(body)[0]
    if w is not None:
        r.write_index = w
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    return R.ring_read_packet(mem, r.base, 4096, 0, d), d, mem, r


@pytest.mark.parametrize("body,code", [
    (desc_bytes(6, 1, 3) + bytes(8), E_OFFSET8),         # offset8 < 2
    (desc_bytes(6, 0, 2), E_OFFSET8),
    (desc_bytes(6, 3, 2), E_LEN8),                       # len8 < offset8
    (desc_bytes(6, 0xFFFF, 0x10), E_LEN8),
    (desc_bytes(6, 2, 3), E_TRUNCATED),                  # claims 24 bytes, 16 published
    (desc_bytes(6, 2, 0xFFFF), E_TRUNCATED),             # len8 beyond the ring
    (desc_bytes(6, 2, 2, flags=2), E_FLAGS),
    (desc_bytes(6, 2, 2, flags=0x8001), E_FLAGS),
    (desc_bytes(0, 2, 2), E_TYPE),
    (desc_bytes(1, 2, 2), E_TYPE),
    (desc_bytes(8, 2, 2), E_TYPE),                       # GPADL: defined, not accepted
    (desc_bytes(0xA, 2, 2), E_TYPE),
    (desc_bytes(0xC, 2, 2), E_TYPE),
    (desc_bytes(0xFFFF, 2, 2), E_TYPE),
])
def test_bad_descriptor(body, code):
    rc, d, mem, r = _hostile(body)
    assert rc == code
    assert not d.any()                     # nothing described
    assert guards_ok(mem, r)


def test_len8_larger_than_available_by_trailer():
    # len8*8 fits the published bytes but its trailer does not (brief: >= len8*8 + 8)
    rc, *_ = _hostile(desc_bytes(6, 2, 3) + bytes(8), w=24)
    assert rc == E_TRUNCATED
    rc, *_ = _hostile(desc_bytes(6, 2, 3) + bytes(8), w=32)
    assert rc == 0


def test_fewer_bytes_than_a_descriptor():
    rc, *_ = _hostile(desc_bytes(6, 2, 2), w=8)
    assert rc == E_TRUNCATED
    rc, *_ = _hostile(desc_bytes(6, 2, 2), w=16)
    assert rc == E_TRUNCATED
    rc, *_ = _hostile(desc_bytes(6, 2, 2), w=0)
    assert rc == E_EMPTY


def test_all_accepted_types():
    for t in (6, 7, 9, 0xB):
        rc, d, *_ = _hostile(desc_bytes(t, 2, 2, flags=1, trans_id=NO_RESPONSE))
        assert rc == 0 and d[R.D_TYPE] == t
        assert d[R.D_TRANS_ID] == NO_RESPONSE - (1 << 64)
        assert d[R.D_FOOTPRINT] == 24 and d[R.D_NEXT] == 24 and d[R.D_PAYLOAD_LEN] == 0


def test_descriptor_straddling_the_end():
    mem, r = make(4096)
    set_indices(r, 4096 - 8, 4096 - 8)
    assert r.write_packet(6, b"straddle", 77)[0]          # desc words split across the wrap
    p = Ring(mem, r.base, 4096).read_packet()
    assert (p.type, p.trans_id, p.payload) == (6, 77, b"straddle")
    assert guards_ok(mem, r)


@pytest.mark.parametrize("base,datasize", [
    (GUARD, 8192 * 2),              # runs past mem
    (GUARD + 4096 + 8, 8192),       # past mem by 8 bytes
    (-8, 4096),
    (GUARD, 0),
    (GUARD, 4095),
    (GUARD, 6000),                  # not a page multiple
    (GUARD + 4, 4096),              # not 8-aligned
    (1 << 62, 4096),                # overflow bait
    (GUARD, 1 << 62),
    (GUARD, -4096),
])
def test_geometry_refused(base, datasize):
    mem, r = make(8192)
    snapshot = mem.copy()
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    buf = np.zeros(64, dtype=np.uint8)
    calls = [
        R.ring_init(mem, base, datasize),
        R.ring_check(mem, base, datasize),
        R.ring_bytes_to_read(mem, base, datasize),
        R.ring_bytes_to_write(mem, base, datasize),
        R.ring_write_begin(mem, base, datasize, 32),
        R.ring_put(mem, base, datasize, 0, buf, 0, 8),
        R.ring_put_zeros(mem, base, datasize, 0, 8),
        R.ring_put_trailer(mem, base, datasize, 0, 0),
        R.ring_write_commit(mem, base, datasize, 0, 8),
        R.ring_set_pending(mem, base, datasize, 32),
        R.ring_clear_pending(mem, base, datasize),
        R.ring_read_pos(mem, base, datasize),
        R.ring_read_packet(mem, base, datasize, 0, d),
        R.ring_get(mem, base, datasize, 0, buf, 0, 8),
        R.ring_read_commit(mem, base, datasize, 0, 0),
        R.ring_begin_read(mem, base, datasize),
        R.ring_end_read(mem, base, datasize),
    ]
    assert calls == [E_GEOMETRY] * len(calls)
    assert (mem == snapshot).all()
    with pytest.raises(RingError):
        Ring(mem, base, datasize)


def test_ring_exactly_at_the_end_of_mem_and_misaligned_mem():
    mem = np.zeros(4096 + 4096, dtype=np.uint8)
    assert R.ring_check(mem, 0, 4096) == 0
    assert R.ring_check(mem, 8, 4096) == E_GEOMETRY
    assert R.ring_check(mem[1:], 0, 4096 - 8) == E_GEOMETRY    # address not 8-aligned
    assert R.ring_check(mem[1:], 7, 4096) == E_GEOMETRY        # 7 + 8192 > 8191
    with pytest.raises(TypeError):
        Ring(mem.view(np.int8), 0, 4096)


@pytest.mark.parametrize("call", [
    lambda m, b, ds, buf, d: R.ring_read_packet(m, b, ds, 4, d),          # rpos not 8-aligned
    lambda m, b, ds, buf, d: R.ring_read_packet(m, b, ds, ds, d),         # rpos >= datasize
    lambda m, b, ds, buf, d: R.ring_read_packet(m, b, ds, 0, d[:5]),      # out_desc too short
    lambda m, b, ds, buf, d: R.ring_get(m, b, ds, 0, buf, 60, 8),         # dst too short
    lambda m, b, ds, buf, d: R.ring_get(m, b, ds, -1, buf, 0, 8),
    lambda m, b, ds, buf, d: R.ring_get(m, b, ds, 0, buf, 0, ds),         # n >= datasize
    lambda m, b, ds, buf, d: R.ring_put(m, b, ds, 0, buf, -1, 8),
    lambda m, b, ds, buf, d: R.ring_put(m, b, ds, 0, buf, 1 << 62, 1 << 62),
    lambda m, b, ds, buf, d: R.ring_put(m, b, ds, ds, buf, 0, 8),
    lambda m, b, ds, buf, d: R.ring_put_trailer(m, b, ds, 4, 0),
    lambda m, b, ds, buf, d: R.ring_write_commit(m, b, ds, 0, ds),
    lambda m, b, ds, buf, d: R.ring_read_commit(m, b, ds, 12, 0),
    lambda m, b, ds, buf, d: R.ring_put_zeros(m, b, ds, 0, -1),
])
def test_bad_arguments(call):
    mem, r = make(4096)
    snapshot = mem.copy()
    buf = np.zeros(64, dtype=np.uint8)
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    assert call(mem, r.base, 4096, buf, d) == E_ARG
    assert (mem == snapshot).all()


def test_fuzz_corrupted_rings():
    """~300 rings with random corruption of indices, control words and packet
    bytes: every answer is a valid description or an error code, and nothing
    outside the ring region changes."""
    from netvsp.vmbus.packet import build_inband
    rng = np.random.default_rng(20240601)
    ds = 4096
    mem = np.full(GUARD + 4096 + ds + GUARD, FILL, dtype=np.uint8)
    base = GUARD
    d = np.zeros(R.DESC_FIELDS, dtype=np.int64)
    dst = np.zeros(ds, dtype=np.uint8)
    src = rng.integers(0, 256, ds, dtype=np.uint8)
    codes = set()
    for it in range(300):
        R.ring_init(mem, base, ds)
        r = Ring(mem, base, ds)
        start = int(rng.integers(0, ds // 8)) * 8
        set_indices(r, start, start)
        for _ in range(int(rng.integers(1, 12))):
            r.write_packet(int(rng.choice([6, 0xB])), src[:int(rng.integers(0, 300))].tobytes(),
                           int(rng.integers(0, 1 << 62)), int(rng.integers(0, 2)))
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(0, 4)
            if kind == 0:        # an index word
                off = int(rng.choice([0, 4]))
                v = int(rng.choice([rng.integers(0, 1 << 32), rng.integers(0, ds + 64),
                                    int(rng.integers(0, ds // 8)) * 8]))
                mem[base + off:base + off + 4] = np.frombuffer(struct.pack("<I", v), np.uint8)
            elif kind == 1:      # pending / mask / feature words
                off = int(rng.choice([8, 12, 0x40]))
                mem[base + off:base + off + 4] = rng.integers(0, 256, 4, dtype=np.uint8)
            else:                # bytes of the packets
                p = base + 4096 + int(rng.integers(0, ds))
                mem[p] = rng.integers(0, 256)
        rpos = R.ring_read_pos(mem, base, ds)
        old = rpos
        for _ in range(40):
            if rpos < 0:
                codes.add(rpos)
                break
            rc = R.ring_read_packet(mem, base, ds, rpos, d)
            codes.add(rc)
            if rc != 0:
                assert rc < 0 and not (rc == E_ARG or rc == E_GEOMETRY)
                break
            avail = (r.write_index - rpos) % ds
            assert 24 <= d[R.D_FOOTPRINT] <= avail and d[R.D_FOOTPRINT] % 8 == 0
            assert d[R.D_NEXT] == (rpos + d[R.D_FOOTPRINT]) % ds
            assert 0 <= d[R.D_PAYLOAD] < ds and 0 <= d[R.D_PAYLOAD_LEN] < d[R.D_FOOTPRINT]
            assert d[R.D_TYPE] in (6, 7, 9, 0xB) and d[R.D_FLAGS] in (0, 1)
            assert R.ring_get(mem, base, ds, d[R.D_PAYLOAD], dst, 0, d[R.D_PAYLOAD_LEN]) >= 0
            rpos = int(d[R.D_NEXT])
        if rpos >= 0 and old >= 0:
            assert R.ring_read_commit(mem, base, ds, rpos, old) in (0, 1, E_INDEX)
        wpos = R.ring_write_begin(mem, base, ds, 64)
        codes.add(wpos if wpos < 0 else 0)
        if wpos >= 0:
            end = build_inband(mem, base, ds, wpos, 6, 0, 1, src, 0, 40)
            assert end >= 0
            assert R.ring_write_commit(mem, base, ds, wpos, end) in (0, 1, E_INDEX)
        assert (mem[:base] == FILL).all() and (mem[base + 4096 + ds:] == FILL).all(), it
    # the corruptions reached the interesting checks
    assert {E_INDEX, E_TYPE, 0} <= codes
    assert len(codes & {E_OFFSET8, E_LEN8, E_TRUNCATED, E_FLAGS}) >= 2
