"""The VMBus ring buffer (vmbus_netvsp.md a), as compiled kernels over guest RAM.

Guest RAM is one uint8 array ``mem`` (GPA = offset). A ring is one 4096-byte
control page (``hv_ring_buffer``, a.2) at GPA ``base`` followed by ``datasize``
data bytes (a.1). Host (NetVSP) and guest (NetVSC) use the same kernels: the
producer side is ``ring_write_begin`` / ``ring_put`` / ``ring_put_trailer`` /
``ring_write_commit``, the consumer side ``ring_read_packet`` / ``ring_get`` /
``ring_read_commit``. Packet builders and parsers are in ``packet.py``.
Batches: reserve once, write several packets (each with its trailer), commit
once; the per-packet steps also exist as inlined helpers (``read_packet``,
``put_bytes``/``get_bytes``, packet.py's ``put_inband``/``put_xfer_page``) for
compiled loops.

Trust. The other side can rewrite any byte of the ring at any moment. Every
kernel therefore
- checks ``base``/``datasize`` against ``mem`` before touching it,
- validates every index it reads from the control page (< datasize, multiple of
  8, a.2) and every position the caller passes, and addresses data only as
  ``base + 4096 + (pos mod datasize)``: nothing outside
  [base, base + 4096 + datasize) is ever read or written,
- reads each shared field exactly once, with an atomic load, into a local and
  uses only the local afterwards. A plain load would let LLVM re-load a value
  after it was checked (a double fetch the guest could win).

Index stores are atomic 32-bit stores so the other side never sees a torn
index; barriers are the full fences a.4.5, a.4.6, a.5.3 and a.5.4 ask for.

Errors are negative ints (``E_*``); positions and counts are >= 0. Arguments
are int64 (numba mixes uint64 with int64 into float64).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from switch.batch import copy_bytes
from switch.kernel import helper, kernel

from ..layout import U32, array, layout, offsets

CONTROL = 4096                  # control page size; data starts at base + CONTROL (a.1)
TRAILER = 8                     # u64 after every packet (a.4.4)
MAX_DATASIZE = 1 << 32          # indices are u32 (a.2)
FEAT_PENDING_SEND_SZ = 1        # feature_bits bit 0 (a.2)

# a.2: struct hv_ring_buffer, 4096 bytes, packed.
hv_ring_buffer = layout("hv_ring_buffer", 4096, [
    ("write_index", U32, 0x00),
    ("read_index", U32, 0x04),
    ("interrupt_mask", U32, 0x08),
    ("pending_send_sz", U32, 0x0C),
    ("reserved1", array(U32, 12), 0x10),
    ("feature_bits", U32, 0x40),
    ("reserved2", array(np.dtype("u1"), 4028), 0x44),
])
OFF = offsets(hv_ring_buffer)
WRITE_INDEX = OFF["write_index"]
READ_INDEX = OFF["read_index"]
INTERRUPT_MASK = OFF["interrupt_mask"]
PENDING_SEND_SZ = OFF["pending_send_sz"]
FEATURE_BITS = OFF["feature_bits"]

# Packet types the reader accepts (b.2; OpenVMM parse_packet): in-band, transfer
# page, GPA direct, completion. Duplicated from packet.py, which imports us.
_T_INBAND, _T_XFER, _T_GPA, _T_COMP = 0x6, 0x7, 0x9, 0xB
_FLAGS_KNOWN = 0x1              # b.1: only COMPLETION_REQUESTED
DESC_SIZE = 16                  # b.1

# ---- error codes ------------------------------------------------------------
E_GEOMETRY = -1     # base/datasize do not describe a ring inside mem (or misaligned)
E_ARG = -2          # a caller argument (position, length, array) is out of range
E_INDEX = -3        # write_index/read_index in the control page is corrupt (a.2)
E_FULL = -4         # not enough room now (a.3); not corruption
E_TOO_BIG = -5      # the packet can never fit this ring (a.3 maximum)
E_EMPTY = -6        # nothing to read; not corruption
E_TRUNCATED = -7    # fewer bytes published than the descriptor claims (a.5.2)
E_OFFSET8 = -8      # offset8 < 2 (a.5.2)
E_LEN8 = -9         # len8 < offset8 (a.5.2)
E_FLAGS = -10       # unknown flag bits (a.5.2, b.1)
E_TYPE = -11        # packet type not in {6, 7, 9, 0xb} (a.5.2, b.2)

ERRORS = {E_GEOMETRY: "geometry", E_ARG: "argument", E_INDEX: "corrupt index",
          E_FULL: "full", E_TOO_BIG: "too big", E_EMPTY: "empty",
          E_TRUNCATED: "truncated", E_OFFSET8: "offset8 < 2", E_LEN8: "len8 < offset8",
          E_FLAGS: "unknown flags", E_TYPE: "unknown type"}
# Codes after which the channel must be treated as broken (the peer is hostile
# or buggy); E_FULL/E_EMPTY are flow control, E_ARG/E_GEOMETRY our own bugs.
CORRUPT = frozenset({E_INDEX, E_TRUNCATED, E_OFFSET8, E_LEN8, E_FLAGS, E_TYPE})

# ---- out_desc of ring_read_packet (int64 array of DESC_FIELDS) ----------------
D_TYPE = 0          # b.1 type
D_OFFSET8 = 1
D_LEN8 = 2
D_FLAGS = 3
D_TRANS_ID = 4      # the u64 as its int64 bit pattern
D_PAYLOAD = 5       # ring position of the payload (offset8*8 past the start, wrapped)
D_PAYLOAD_LEN = 6   # (len8 - offset8) * 8
D_FOOTPRINT = 7     # len8*8 + 8 (b.1)
D_START = 8         # ring position of the descriptor
D_NEXT = 9          # ring position of the next packet
DESC_FIELDS = 10


# ---- memory access primitives ---------------------------------------------------

@intrinsic
def _mem_addr(typingctx, arr):
    """The address of arr[0], for the alignment check of atomic accesses."""
    sig = types.int64(arr)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(a.data, ir.IntType(64))
    return sig, codegen


def _atomic_load(bits, ordering):
    def impl(typingctx, arr, pos):
        sig = types.int64(arr, types.intp)

        def codegen(context, builder, signature, args):
            a = context.make_array(signature.args[0])(context, builder, args[0])
            p = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(bits).as_pointer())
            v = builder.load_atomic(p, ordering, bits // 8)
            return builder.zext(v, ir.IntType(64)) if bits < 64 else v
        return sig, codegen
    return intrinsic(impl)


def _atomic_store(bits, ordering):
    def impl(typingctx, arr, pos, val):
        sig = types.void(arr, types.intp, types.int64)

        def codegen(context, builder, signature, args):
            a = context.make_array(signature.args[0])(context, builder, args[0])
            p = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(bits).as_pointer())
            v = builder.trunc(args[2], ir.IntType(bits)) if bits < 64 else args[2]
            builder.store_atomic(v, p, ordering, bits // 8)
            return context.get_dummy_value()
        return sig, codegen
    return intrinsic(impl)


# Control-page fields: acquire loads / release stores, never torn (aligned u32).
load32 = _atomic_load(32, "acquire")
store32 = _atomic_store(32, "release")
# Ring data words: relaxed, but single loads the compiler may not repeat (see top).
load64 = _atomic_load(64, "monotonic")
store64 = _atomic_store(64, "monotonic")


@intrinsic
def fence(typingctx):
    """A full (seq_cst) memory barrier: mfence on x86, and a compiler barrier."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return sig, codegen


# ---- checks and arithmetic ----------------------------------------------------------

@helper
def geometry_ok(mem, base, datasize):
    """base/datasize describe a ring wholly inside mem (a.1), 8-aligned so index
    and descriptor words are single aligned accesses."""
    n = mem.shape[0]
    if base < 0 or datasize <= 0 or datasize > MAX_DATASIZE:
        return False
    if (base & 7) != 0 or (datasize & 4095) != 0:
        return False
    if base > n or datasize > n or base + CONTROL + datasize > n:
        return False
    return ((_mem_addr(mem) + base) & 7) == 0


@helper
def index_ok(x, datasize):
    """a.2: an index must be < datasize and a multiple of 8."""
    return x >= 0 and x < datasize and (x & 7) == 0


@helper
def wrap(p, datasize):
    """p mod datasize for 0 <= p < 2 * datasize."""
    return p - datasize if p >= datasize else p


@helper
def to_read(w, r, datasize):
    """a.3 bytes to read."""
    return w - r if w >= r else datasize - r + w


@helper
def to_write(w, r, datasize):
    """a.3 bytes writable (includes the 8 bytes that must stay free)."""
    return datasize - (w - r) if w >= r else r - w


@helper
def pad8(n):
    return (n + 7) & ~7


@helper
def put_bytes(mem, data, datasize, pos, src, so, n):
    """Copy n <= datasize bytes into the ring at pos (< datasize), wrapping."""
    first = datasize - pos
    if n <= first:
        copy_bytes(mem, data + pos, src, so, n)
    else:
        copy_bytes(mem, data + pos, src, so, first)
        copy_bytes(mem, data, src, so + first, n - first)
    return wrap(pos + n, datasize)


@helper
def get_bytes(mem, data, datasize, pos, dst, do, n):
    first = datasize - pos
    if n <= first:
        copy_bytes(dst, do, mem, data + pos, n)
    else:
        copy_bytes(dst, do, mem, data + pos, first)
        copy_bytes(dst, do + first, mem, data, n - first)
    return wrap(pos + n, datasize)


@helper
def zero_bytes(mem, data, datasize, pos, n):
    for _ in range(n):
        mem[data + pos] = 0
        pos = wrap(pos + 1, datasize)
    return pos


@helper
def span_ok(arr, off, n):
    """arr[off:off+n] exists (no overflow: each term is checked first)."""
    return off >= 0 and n >= 0 and off <= arr.shape[0] and n <= arr.shape[0] - off


# ---- setup and accounting -------------------------------------------------------------

@kernel
def ring_init(mem, base, datasize):
    """Guest side, a.2: zero the control page, indices 0, feature_bits = 1."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    for i in range(CONTROL):
        mem[base + i] = 0
    store32(mem, base + FEATURE_BITS, FEAT_PENDING_SEND_SZ)
    fence()
    return 0


@kernel
def ring_check(mem, base, datasize):
    """0 if base/datasize describe a ring inside mem, else E_GEOMETRY."""
    return 0 if geometry_ok(mem, base, datasize) else E_GEOMETRY


@kernel
def ring_bytes_to_read(mem, base, datasize):
    """a.3 from the published indices, or E_GEOMETRY / E_INDEX."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    w = load32(mem, base + WRITE_INDEX)
    r = load32(mem, base + READ_INDEX)
    if not index_ok(w, datasize) or not index_ok(r, datasize):
        return E_INDEX
    return to_read(w, r, datasize)


@kernel
def ring_bytes_to_write(mem, base, datasize):
    """a.3 from the published indices, or E_GEOMETRY / E_INDEX. A packet of
    footprint t fits only if this is > t (never completely full)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    w = load32(mem, base + WRITE_INDEX)
    r = load32(mem, base + READ_INDEX)
    if not index_ok(w, datasize) or not index_ok(r, datasize):
        return E_INDEX
    return to_write(w, r, datasize)


# ---- producer (a.4) --------------------------------------------------------------------

@kernel
def ring_write_begin(mem, base, datasize, need):
    """The position to write a packet of footprint ``need`` (descriptor + padded
    payload + trailer, a multiple of 8) at: the published write_index.

    a.3: refuses when bytes writable <= need, so the ring never becomes completely
    full. Returns the position, E_FULL (retry later, or ring_set_pending, a.4.2),
    E_TOO_BIG (need >= datasize: never fits), E_ARG, E_INDEX or E_GEOMETRY.
    For a batch, call once and track the remaining room from ring_bytes_to_write
    (the reader can only free more)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if need <= 0 or (need & 7) != 0:
        return E_ARG
    if need >= datasize:
        return E_TOO_BIG
    w = load32(mem, base + WRITE_INDEX)
    r = load32(mem, base + READ_INDEX)
    if not index_ok(w, datasize) or not index_ok(r, datasize):
        return E_INDEX
    if to_write(w, r, datasize) <= need:
        return E_FULL
    return w


@kernel
def ring_put(mem, base, datasize, pos, src, src_off, n):
    """Copy src[src_off:src_off+n] into the ring at pos, wrapping at datasize
    (a.4.3). Returns the new position or E_GEOMETRY / E_ARG. Does not check the
    reader's position: the caller reserved the room with ring_write_begin."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if pos < 0 or pos >= datasize or n >= datasize or not span_ok(src, src_off, n):
        return E_ARG
    return put_bytes(mem, base + CONTROL, datasize, pos, src, src_off, n)


@kernel
def ring_put_zeros(mem, base, datasize, pos, n):
    """n zero bytes at pos (payload padding to 8, b.1). Returns the new position."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if pos < 0 or pos >= datasize or n < 0 or n >= datasize:
        return E_ARG
    return zero_bytes(mem, base + CONTROL, datasize, pos, n)


@helper
def put_trailer(mem, data, datasize, pos, start):
    """a.4.4: u64 with the packet's start offset in the high 32 bits, low 32 zero."""
    store64(mem, data + pos, start << 32)
    return wrap(pos + TRAILER, datasize)


@kernel
def ring_put_trailer(mem, base, datasize, pos, start):
    """Write the trailer of the packet that began at ``start``, at ``pos`` (the
    8-aligned end of its padded payload). Returns the position after it: the
    next packet's start, and the index to publish with ring_write_commit."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(pos, datasize) or not index_ok(start, datasize):
        return E_ARG
    return put_trailer(mem, base + CONTROL, datasize, pos, start)


@kernel
def ring_write_commit(mem, base, datasize, start, end):
    """Publish ``end`` as write_index (a.4.5) and decide whether to signal the
    reader (a.4.6). ``start`` is the write index before the batch (for a single
    packet, its start): signal only if interrupt_mask is 0 and the ring was empty
    before the batch (read_index == start), evaluated once per batch as OpenVMM
    does. Every packet of the batch must already carry its trailer.
    Returns 1 (signal), 0 (don't), or E_GEOMETRY / E_ARG / E_INDEX (read_index
    corrupt; write_index was still published)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(start, datasize) or not index_ok(end, datasize):
        return E_ARG
    fence()                     # a.4.5: packet bytes before the index
    store32(mem, base + WRITE_INDEX, end)
    fence()                     # a.4.6: index store before the mask load
    if end == start or load32(mem, base + INTERRUPT_MASK) != 0:
        return 0                # an empty batch changes nothing to signal
    r = load32(mem, base + READ_INDEX)
    if not index_ok(r, datasize):
        return E_INDEX
    return 1 if r == start else 0


@kernel
def ring_set_pending(mem, base, datasize, need):
    """a.4.2: the writer blocks for ``need`` bytes: pending_send_sz = need rounded
    up to 8, then (full barrier) re-check the room so a reader that freed space
    before seeing the request is not missed. Returns 0 (wait for the signal),
    1 (room appeared: pending cleared again, retry ring_write_begin), or E_*."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    need = pad8(need)
    if need <= 0:
        return E_ARG
    if need >= datasize:        # a.3: at most ring_size - 8 may be requested
        return E_TOO_BIG
    store32(mem, base + PENDING_SEND_SZ, need)
    fence()
    w = load32(mem, base + WRITE_INDEX)
    r = load32(mem, base + READ_INDEX)
    if not index_ok(w, datasize) or not index_ok(r, datasize):
        return E_INDEX
    if to_write(w, r, datasize) > need:
        store32(mem, base + PENDING_SEND_SZ, 0)
        return 1
    return 0


@kernel
def ring_clear_pending(mem, base, datasize):
    """The writer is no longer blocked (after the reader's signal)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    store32(mem, base + PENDING_SEND_SZ, 0)
    return 0


# ---- consumer (a.5) --------------------------------------------------------------------

@kernel
def ring_read_pos(mem, base, datasize):
    """The published read_index, validated: where a reader's private position
    starts (a.5.1). Returns it or E_GEOMETRY / E_INDEX."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    r = load32(mem, base + READ_INDEX)
    return r if index_ok(r, datasize) else E_INDEX


@helper
def read_packet(mem, base, datasize, rpos, out_desc):
    """Validate the packet at the private read position ``rpos`` and describe it
    in out_desc (D_* slots). Returns 0, E_EMPTY, or an error.

    a.5.2 checks, each field read once: at least descriptor + trailer published
    (else E_TRUNCATED), offset8 >= 2 (E_OFFSET8), len8 >= offset8 (E_LEN8),
    len8*8 + 8 <= bytes published (E_TRUNCATED), flags only bit 0 (E_FLAGS),
    type in {6, 7, 9, 0xb} (E_TYPE). The trailer's value is not checked (neither
    Linux nor OpenVMM does). Nothing is consumed: advance to out_desc[D_NEXT] and
    publish with ring_read_commit."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if out_desc.shape[0] < DESC_FIELDS or not index_ok(rpos, datasize):
        return E_ARG
    data = base + CONTROL
    w = load32(mem, base + WRITE_INDEX)
    if not index_ok(w, datasize):
        return E_INDEX
    avail = to_read(w, rpos, datasize)
    if avail == 0:
        return E_EMPTY
    if avail < DESC_SIZE + TRAILER:
        return E_TRUNCATED
    # rpos is 8-aligned and datasize a multiple of 8: neither word straddles the wrap.
    word = load64(mem, data + rpos)
    trans_id = load64(mem, data + wrap(rpos + 8, datasize))
    ptype = word & 0xFFFF
    offset8 = (word >> 16) & 0xFFFF
    len8 = (word >> 32) & 0xFFFF
    flags = (word >> 48) & 0xFFFF
    if offset8 < 2:
        return E_OFFSET8
    if len8 < offset8:
        return E_LEN8
    footprint = len8 * 8 + TRAILER
    if footprint > avail:
        return E_TRUNCATED
    if (flags & ~_FLAGS_KNOWN) != 0:
        return E_FLAGS
    if ptype != _T_INBAND and ptype != _T_XFER and ptype != _T_GPA and ptype != _T_COMP:
        return E_TYPE
    out_desc[D_TYPE] = ptype
    out_desc[D_OFFSET8] = offset8
    out_desc[D_LEN8] = len8
    out_desc[D_FLAGS] = flags
    out_desc[D_TRANS_ID] = trans_id
    out_desc[D_PAYLOAD] = wrap(rpos + offset8 * 8, datasize)
    out_desc[D_PAYLOAD_LEN] = (len8 - offset8) * 8
    out_desc[D_FOOTPRINT] = footprint
    out_desc[D_START] = rpos
    out_desc[D_NEXT] = wrap(rpos + footprint, datasize)
    return 0


@kernel
def ring_read_packet(mem, base, datasize, rpos, out_desc):
    """read_packet as a kernel (for Python callers); compiled per-packet loops call
    the inlined read_packet itself. (A second dispatcher over the same function
    would share its cache entry, nogil flag included.)"""
    return read_packet(mem, base, datasize, rpos, out_desc)


@kernel
def ring_get(mem, base, datasize, pos, dst, dst_off, n):
    """Copy n bytes from the ring at pos into dst[dst_off:], wrapping at datasize.
    Returns the new position or E_GEOMETRY / E_ARG. Bounds come from the caller
    (a descriptor validated by ring_read_packet)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if pos < 0 or pos >= datasize or n >= datasize or not span_ok(dst, dst_off, n):
        return E_ARG
    return get_bytes(mem, base + CONTROL, datasize, pos, dst, dst_off, n)


@kernel
def ring_read_commit(mem, base, datasize, new_rpos, old_rpos):
    """Publish read_index = new_rpos (a.5.3) and decide whether to signal the
    writer (a.5.4). ``old_rpos`` is the read_index before this batch.

    Signal only if the writer set feat_pending_send_sz in feature_bits and
    pending_send_sz (low 3 bits masked, as OpenVMM) is non-zero, and the free
    space went from "not enough" (<= pending: exactly full is not enough) to
    "enough" (> pending). interrupt_mask plays no part (newer Linux).
    Returns 1, 0, or E_GEOMETRY / E_ARG / E_INDEX (write_index corrupt; the
    read index was still published)."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(new_rpos, datasize) or not index_ok(old_rpos, datasize):
        return E_ARG
    fence()                     # a.5.3: packet reads before the slot is released
    store32(mem, base + READ_INDEX, new_rpos)
    fence()                     # a.5.4: index store before the pending load
    if (load32(mem, base + FEATURE_BITS) & FEAT_PENDING_SEND_SZ) == 0:
        return 0
    pending = load32(mem, base + PENDING_SEND_SZ) & ~7
    if pending == 0:
        return 0
    w = load32(mem, base + WRITE_INDEX)
    if not index_ok(w, datasize):
        return E_INDEX
    after = to_write(w, new_rpos, datasize)
    before = after - to_read(new_rpos, old_rpos, datasize)
    return 1 if before <= pending and after > pending else 0


@kernel
def ring_begin_read(mem, base, datasize):
    """a.5.5: mask the writer's empty->non-empty signal while draining."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    store32(mem, base + INTERRUPT_MASK, 1)
    fence()
    return 0


@kernel
def ring_end_read(mem, base, datasize):
    """a.5.5: unmask, barrier, then re-check: returns the bytes to read that
    arrived meanwhile (> 0: drain again, the writer did not signal), or E_*."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    store32(mem, base + INTERRUPT_MASK, 0)
    fence()
    w = load32(mem, base + WRITE_INDEX)
    r = load32(mem, base + READ_INDEX)
    if not index_ok(w, datasize) or not index_ok(r, datasize):
        return E_INDEX
    return to_read(w, r, datasize)


# ---- control-path wrapper -----------------------------------------------------------------

class RingError(Exception):
    def __init__(self, code: int, what: str = ""):
        self.code = code
        super().__init__(f"{what or 'ring'}: {ERRORS.get(code, code)} ({code})")


class Packet(NamedTuple):
    type: int
    offset8: int
    len8: int
    flags: int
    trans_id: int       # unsigned
    payload: bytes
    desc: np.ndarray    # the D_* array, for packet.py parsers


def _i64(v: int) -> int:
    """A u64 as the int64 with the same bits (kernels take int64)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


class Ring:
    """One ring in guest RAM, for control-path code and tests (Python per packet).

    Writing: ``write_packet`` (in-band or completion), ``write_raw`` (a body that
    already holds its descriptor). Reading keeps a private position:
    ``read_packet`` returns the next packet or None, ``commit_read`` publishes.
    Corruption raises RingError."""

    def __init__(self, mem: np.ndarray, base: int, datasize: int):
        if not isinstance(mem, np.ndarray) or mem.dtype != np.uint8 or mem.ndim != 1 \
                or not mem.flags.c_contiguous:
            raise TypeError("mem must be a contiguous 1-D uint8 array")
        self.mem, self.base, self.datasize = mem, int(base), int(datasize)
        if ring_check(mem, self.base, self.datasize) != 0:
            raise RingError(E_GEOMETRY, f"ring at {base:#x}+{datasize:#x}")
        self._ctl = mem[self.base:self.base + CONTROL].view(hv_ring_buffer)
        self._desc = np.zeros(DESC_FIELDS, dtype=np.int64)
        self.rpos: int | None = None      # private read position
        self._rstart: int | None = None   # read_index at the last commit

    def init(self) -> None:
        ring_init(self.mem, self.base, self.datasize)

    # control page fields (tests corrupt them through these)
    def _field(name):  # noqa: N805 - a property factory used in the class body
        return property(lambda self: int(self._ctl[name][0]),
                        lambda self, v: self._ctl[name].__setitem__(0, v & 0xFFFFFFFF))
    write_index = _field("write_index")
    read_index = _field("read_index")
    interrupt_mask = _field("interrupt_mask")
    pending_send_sz = _field("pending_send_sz")
    feature_bits = _field("feature_bits")
    del _field

    def _check(self, code: int, what: str) -> int:
        if code < 0:
            raise RingError(code, what)
        return code

    def bytes_to_read(self) -> int:
        return self._check(ring_bytes_to_read(self.mem, self.base, self.datasize), "bytes_to_read")

    def bytes_to_write(self) -> int:
        return self._check(ring_bytes_to_write(self.mem, self.base, self.datasize),
                           "bytes_to_write")

    def write_packet(self, ptype: int, payload: bytes = b"", trans_id: int = 0,
                     flags: int = 0) -> tuple[bool, bool]:
        """One in-band (6) or completion (0xb) packet, committed. Returns
        (written, signal); (False, False) when the ring has no room."""
        from .packet import build_inband, inband_footprint
        src = np.frombuffer(bytes(payload), dtype=np.uint8)
        start = ring_write_begin(self.mem, self.base, self.datasize,
                                 inband_footprint(len(src)))
        if start == E_FULL:
            return False, False
        self._check(start, "write_begin")
        end = self._check(build_inband(self.mem, self.base, self.datasize, start, ptype, flags,
                                       _i64(trans_id), src, 0, len(src)), "build_inband")
        sig = self._check(ring_write_commit(self.mem, self.base, self.datasize, start, end),
                          "write_commit")
        return True, bool(sig)

    def write_raw(self, body: bytes) -> tuple[bool, bool]:
        """A packet whose bytes (descriptor included, a multiple of 8) are given
        as is, plus its trailer: for hand-made and deliberately bad packets."""
        if len(body) % 8:
            raise ValueError("a packet body is a multiple of 8 bytes")
        src = np.frombuffer(bytes(body), dtype=np.uint8)
        start = ring_write_begin(self.mem, self.base, self.datasize, len(src) + TRAILER)
        if start == E_FULL:
            return False, False
        self._check(start, "write_begin")
        pos = self._check(ring_put(self.mem, self.base, self.datasize, start, src, 0, len(src)),
                          "put")
        end = ring_put_trailer(self.mem, self.base, self.datasize, pos, start)
        sig = self._check(ring_write_commit(self.mem, self.base, self.datasize, start, end),
                          "write_commit")
        return True, bool(sig)

    def read_packet(self) -> Packet | None:
        """The next packet at the private position, which advances past it."""
        if self.rpos is None:
            self.rpos = self._check(ring_read_pos(self.mem, self.base, self.datasize), "read_pos")
            self._rstart = self.rpos
        d = self._desc
        rc = ring_read_packet(self.mem, self.base, self.datasize, self.rpos, d)
        if rc == E_EMPTY:
            return None
        self._check(rc, "read_packet")
        buf = np.zeros(int(d[D_PAYLOAD_LEN]), dtype=np.uint8)
        self._check(ring_get(self.mem, self.base, self.datasize, int(d[D_PAYLOAD]), buf, 0,
                             len(buf)), "get")
        self.rpos = int(d[D_NEXT])
        return Packet(int(d[D_TYPE]), int(d[D_OFFSET8]), int(d[D_LEN8]), int(d[D_FLAGS]),
                      int(d[D_TRANS_ID]) & ((1 << 64) - 1), buf.tobytes(), d.copy())

    def commit_read(self) -> bool:
        """Publish the private position; returns whether to signal the writer."""
        if self.rpos is None:
            return False
        sig = self._check(ring_read_commit(self.mem, self.base, self.datasize, self.rpos,
                                           self._rstart), "read_commit")
        self._rstart = self.rpos
        return bool(sig)

    def begin_read(self) -> None:
        ring_begin_read(self.mem, self.base, self.datasize)

    def end_read(self) -> int:
        return self._check(ring_end_read(self.mem, self.base, self.datasize), "end_read")

    def set_pending(self, need: int) -> bool:
        """a.4.2; True when room appeared meanwhile (nothing left pending)."""
        return bool(self._check(ring_set_pending(self.mem, self.base, self.datasize, need),
                                "set_pending"))

    def clear_pending(self) -> None:
        ring_clear_pending(self.mem, self.base, self.datasize)
