"""VMBus packet formats (vmbus_netvsp.md b): dtypes, builders and parsers.

Builders write a whole packet straight into a ring at a position obtained from
``ring_write_begin`` (descriptor, headers, payload zero-padded to 8, trailer)
and return the position after it; publish with ``ring_write_commit`` (once per
batch). Parsers take the D_* array ``ring_read_packet`` filled: its len8/offset8
are the validated local copies, so nothing checked there is fetched again from
guest memory. Headers are read with single atomic loads per word (see ring.py).

Kernel errors are negative: ring.py's E_* plus the E_* below.
"""
from __future__ import annotations


from switch.kernel import helper, kernel

from ..layout import U8, U16, U32, U64, layout, offsets
from .ring import (CONTROL, D_LEN8, D_OFFSET8, D_START, D_TYPE, DESC_FIELDS, E_ARG,
                   E_GEOMETRY, E_TOO_BIG, ERRORS as RING_ERRORS, TRAILER, geometry_ok,
                   index_ok, load64, pad8, put_bytes, put_trailer, span_ok, store64, wrap,
                   zero_bytes)

# ---- b.2 packet types ----------------------------------------------------------------
VM_PKT_INVALID = 0x0
VM_PKT_SYNCH = 0x1
VM_PKT_ADD_XFER_PAGESET = 0x2
VM_PKT_RM_XFER_PAGESET = 0x3
VM_PKT_ESTABLISH_GPADL = 0x4
VM_PKT_TEARDOWN_GPADL = 0x5
VM_PKT_DATA_INBAND = 0x6
VM_PKT_DATA_USING_XFER_PAGES = 0x7
VM_PKT_DATA_USING_GPADL = 0x8
VM_PKT_DATA_USING_GPA_DIRECT = 0x9
VM_PKT_CANCEL_REQUEST = 0xA
VM_PKT_COMP = 0xB
VM_PKT_DATA_USING_ADDITIONAL_PKT = 0xC
VM_PKT_ADDITIONAL_DATA = 0xD

# b.1 flags; b.3 the trans_id of a request that wants no reply
VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED = 0x1
VMBUS_RQST_ID_NO_RESPONSE = 0xFFFFFFFFFFFFFFFD
RQST_ID_NO_RESPONSE_I64 = VMBUS_RQST_ID_NO_RESPONSE - (1 << 64)   # as kernels pass it

HV_PAGE = 4096                  # b.6: PFNs are 4 KiB Hyper-V pages
NETVSC_MAX_PKT_SIZE = 4624      # a.5.2: largest packet a Linux guest reads
NVSP_RSC_MAX = 562              # b.5: Linux's limit on transfer-page ranges

# ---- b.1 / b.5 / b.6 structures ------------------------------------------------------
vmpacket_descriptor = layout("vmpacket_descriptor", 16, [
    ("type", U16, 0), ("offset8", U16, 2), ("len8", U16, 4), ("flags", U16, 6),
    ("trans_id", U64, 8),
])
vmtransfer_page_packet_header = layout("vmtransfer_page_packet_header", 24, [
    ("d", vmpacket_descriptor, 0), ("xfer_pageset_id", U16, 16),
    ("sender_owns_set", U8, 18), ("reserved", U8, 19), ("range_cnt", U32, 20),
])  # then range_cnt vmtransfer_page_range
vmtransfer_page_range = layout("vmtransfer_page_range", 8, [
    ("byte_count", U32, 0), ("byte_offset", U32, 4),
])
vmdata_gpa_direct = layout("vmdata_gpa_direct", 24, [
    ("d", vmpacket_descriptor, 0), ("reserved", U32, 16), ("range_cnt", U32, 20),
])  # then range_cnt variable-size gpa_range
gpa_range = layout("gpa_range", 8, [
    ("byte_count", U32, 0), ("byte_offset", U32, 4),
])  # then ceil((byte_offset + byte_count) / 4096) u64 pfn_array entries
GPA_RANGE_PFN = 8               # offset of pfn_array[0] in gpa_range

DESC_OFF = offsets(vmpacket_descriptor)
XFER_OFF = offsets(vmtransfer_page_packet_header)
GPA_OFF = offsets(vmdata_gpa_direct)
XFER_HDR = vmtransfer_page_packet_header.itemsize      # 24: ranges start here
GPA_HDR = vmdata_gpa_direct.itemsize                   # 24
RANGE_SIZE = vmtransfer_page_range.itemsize            # 8
# The first 8 bytes of the descriptor are read and written as one u64 word:
_W_TYPE, _W_OFFSET8, _W_LEN8, _W_FLAGS = (8 * DESC_OFF[k] for k in ("type", "offset8", "len8",
                                                                    "flags"))
_TRANS_ID = DESC_OFF["trans_id"]
_XFER_WORD = XFER_OFF["xfer_pageset_id"]               # pageset id .. range_cnt: one u64
_XFER_RANGE_CNT = 8 * (XFER_OFF["range_cnt"] - _XFER_WORD)
_GPA_WORD = GPA_OFF["reserved"]
_GPA_RANGE_CNT = 8 * (GPA_OFF["range_cnt"] - _GPA_WORD)
_R_OFFSET = 8 * offsets(gpa_range)["byte_offset"]       # byte_count is the low half

# ---- error codes (continue ring.py's) -------------------------------------------------
E_KIND = -20            # the packet is not of the type this parser reads
E_HEADER = -21          # offset8*8 leaves no room for the type's fixed header (b.5/b.6)
E_RANGE_COUNT = -22     # range_cnt is 0 (GPA direct) or above the caller's maximum
E_RANGE_BOUNDS = -23    # a range (or its PFN array) runs past offset8*8 (b.5/b.6)
E_RANGE_OFFSET = -24    # gpa_range byte_offset >= 4096 (b.6)
E_GPA = -25             # a PFN outside guest RAM
E_PIECES = -26          # more (gpa, length) pieces than the output array holds
E_PAGESET = -27         # transfer-page set id is not the expected one (b.5)
E_BUFFER = -28          # a transfer-page range runs past the transfer-page set

ERRORS = {**RING_ERRORS, E_KIND: "wrong packet type", E_HEADER: "header does not fit",
          E_RANGE_COUNT: "range count", E_RANGE_BOUNDS: "range outside the header",
          E_RANGE_OFFSET: "byte_offset >= 4096", E_GPA: "PFN outside guest RAM",
          E_PIECES: "too many pieces", E_PAGESET: "wrong transfer-page set",
          E_BUFFER: "range outside the transfer-page set"}

# Columns of range and piece arrays.
XR_COUNT, XR_OFFSET = 0, 1          # transfer-page ranges: byte_count, byte_offset (wire order)
B_GPA, B_LEN = 0, 1                 # buffers given to build_gpa_direct
P_GPA, P_LEN, P_RANGE = 0, 1, 2     # parse_gpa_direct pieces: address, length, range index

_U32_MAX = 0xFFFFFFFF
_LEN8_MAX = 0xFFFF


@helper
def _desc_word(ptype, offset8, len8, flags):
    return (ptype << _W_TYPE) | (offset8 << _W_OFFSET8) | (len8 << _W_LEN8) | (flags << _W_FLAGS)


@helper
def _finish(mem, data, datasize, pos, start, src, so, n):
    """Payload, zero padding to 8 and trailer of a packet whose headers end at pos."""
    pos = put_bytes(mem, data, datasize, pos, src, so, n)
    pos = zero_bytes(mem, data, datasize, pos, pad8(n) - n)
    return put_trailer(mem, data, datasize, pos, start)


@helper
def _ld(mem, data, datasize, start, off):
    """The u64 word at packet offset off (8-aligned, < datasize), as int64."""
    return load64(mem, data + wrap(start + off, datasize))


# ---- sizes ---------------------------------------------------------------------------

@helper
def inband_footprint(n):
    """Ring bytes of an in-band/completion packet with an n-byte payload (b.3)."""
    return 16 + pad8(n) + TRAILER


@helper
def xfer_footprint(nranges, n):
    """Ring bytes of a transfer-page packet (b.5)."""
    return XFER_HDR + RANGE_SIZE * nranges + pad8(n) + TRAILER


@helper
def _pfn_count(off, ln):
    return (off + ln + HV_PAGE - 1) >> 12


@kernel
def gpa_direct_footprint(bufs, nbufs, n):
    """Ring bytes of a GPA-direct packet over bufs[:nbufs] (b.6), or E_ARG."""
    if nbufs < 0 or nbufs > bufs.shape[0] or bufs.shape[1] < 2 or n < 0:
        return E_ARG
    total = GPA_HDR
    for i in range(nbufs):
        g, ln = bufs[i, B_GPA], bufs[i, B_LEN]
        if g < 0 or ln < 0 or ln > _U32_MAX:
            return E_ARG
        total += GPA_RANGE_PFN + 8 * _pfn_count(g & (HV_PAGE - 1), ln)
    return total + pad8(n) + TRAILER


# ---- builders --------------------------------------------------------------------------

@helper
def put_inband(mem, base, datasize, pos, ptype, flags, trans_id, src, src_off, n):
    """An in-band (6) or completion (0xb) packet at pos (b.3, b.4): descriptor with
    offset8 = 2, len8 = 2 + ceil(n/8), src[src_off:src_off+n] zero-padded to 8,
    trailer. Room is the caller's (ring_write_begin with inband_footprint(n)).
    Returns the position after the packet, or E_GEOMETRY / E_ARG / E_TOO_BIG."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(pos, datasize) or not span_ok(src, src_off, n):
        return E_ARG
    if (ptype != VM_PKT_DATA_INBAND and ptype != VM_PKT_COMP) or flags < 0 or flags > 1:
        return E_ARG
    len8 = 2 + pad8(n) // 8
    if len8 > _LEN8_MAX or len8 * 8 + TRAILER >= datasize:
        return E_TOO_BIG
    data = base + CONTROL
    store64(mem, data + pos, _desc_word(ptype, 2, len8, flags))
    store64(mem, data + wrap(pos + _TRANS_ID, datasize), trans_id)
    return _finish(mem, data, datasize, wrap(pos + 16, datasize), pos, src, src_off, n)


@helper
def put_xfer_page(mem, base, datasize, pos, pageset_id, flags, trans_id, ranges, nranges,
                  src, src_off, n):
    """A transfer-page packet (type 7, b.5) at pos: descriptor, pageset id,
    range_cnt = nranges, ranges[:nranges] ({XR_COUNT, XR_OFFSET} rows, u32 each),
    offset8 = 3 + nranges, then the payload. Returns the position after it, or
    E_GEOMETRY / E_ARG / E_TOO_BIG. Nothing is written when an argument is bad."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(pos, datasize) or not span_ok(src, src_off, n):
        return E_ARG
    if nranges < 0 or nranges > ranges.shape[0] or ranges.shape[1] < 2:
        return E_ARG
    if pageset_id < 0 or pageset_id > 0xFFFF or flags < 0 or flags > 1:
        return E_ARG
    for i in range(nranges):
        c, o = ranges[i, XR_COUNT], ranges[i, XR_OFFSET]
        if c < 0 or c > _U32_MAX or o < 0 or o > _U32_MAX:
            return E_ARG
    if nranges > _LEN8_MAX:
        return E_TOO_BIG
    offset8 = 3 + nranges
    len8 = offset8 + pad8(n) // 8
    if len8 > _LEN8_MAX or len8 * 8 + TRAILER >= datasize:
        return E_TOO_BIG
    data = base + CONTROL
    store64(mem, data + pos, _desc_word(VM_PKT_DATA_USING_XFER_PAGES, offset8, len8, flags))
    store64(mem, data + wrap(pos + _TRANS_ID, datasize), trans_id)
    store64(mem, data + wrap(pos + _XFER_WORD, datasize),
            pageset_id | (nranges << _XFER_RANGE_CNT))
    p = wrap(pos + XFER_HDR, datasize)
    for i in range(nranges):
        store64(mem, data + p, ranges[i, XR_COUNT] | (ranges[i, XR_OFFSET] << 32))
        p = wrap(p + RANGE_SIZE, datasize)
    return _finish(mem, data, datasize, p, pos, src, src_off, n)


@kernel
def build_inband(mem, base, datasize, pos, ptype, flags, trans_id, src, src_off, n):
    """put_inband as a kernel; compiled per-packet loops call put_inband (inlined)."""
    return put_inband(mem, base, datasize, pos, ptype, flags, trans_id, src, src_off, n)


@kernel
def build_xfer_page(mem, base, datasize, pos, pageset_id, flags, trans_id, ranges, nranges,
                    src, src_off, n):
    """put_xfer_page as a kernel; compiled per-packet loops call put_xfer_page."""
    return put_xfer_page(mem, base, datasize, pos, pageset_id, flags, trans_id, ranges,
                         nranges, src, src_off, n)


@kernel
def build_gpa_direct(mem, base, datasize, pos, flags, trans_id, bufs, nbufs, src, src_off, n):
    """A GPA-direct packet (type 9, b.6) at pos: the guest side (hosts do not send
    them). Each buffer bufs[i] = (gpa, length) becomes one gpa_range over
    physically contiguous pages (byte_offset = gpa mod 4096, PFNs gpa>>12 ...),
    as Linux's vmbus_sendpacket_mpb_desc does. Returns the next position or E_*."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not index_ok(pos, datasize) or not span_ok(src, src_off, n):
        return E_ARG
    if flags < 0 or flags > 1:
        return E_ARG
    fp = gpa_direct_footprint(bufs, nbufs, n)
    if fp < 0:
        return fp
    hdr = fp - pad8(n) - TRAILER
    if hdr // 8 + pad8(n) // 8 > _LEN8_MAX or fp >= datasize:
        return E_TOO_BIG
    offset8 = hdr // 8
    len8 = offset8 + pad8(n) // 8
    data = base + CONTROL
    store64(mem, data + pos, _desc_word(VM_PKT_DATA_USING_GPA_DIRECT, offset8, len8, flags))
    store64(mem, data + wrap(pos + _TRANS_ID, datasize), trans_id)
    store64(mem, data + wrap(pos + _GPA_WORD, datasize), nbufs << _GPA_RANGE_CNT)
    p = wrap(pos + GPA_HDR, datasize)
    for i in range(nbufs):
        g, ln = bufs[i, B_GPA], bufs[i, B_LEN]
        off = g & (HV_PAGE - 1)
        store64(mem, data + p, ln | (off << _R_OFFSET))
        p = wrap(p + GPA_RANGE_PFN, datasize)
        for k in range(_pfn_count(off, ln)):
            store64(mem, data + p, (g >> 12) + k)
            p = wrap(p + 8, datasize)
    return _finish(mem, data, datasize, p, pos, src, src_off, n)


# ---- parsers -----------------------------------------------------------------------------

@helper
def _desc_ok(desc, datasize):
    """The D_* array is one ring_read_packet produced (a caller's array is not
    trusted either: every position derived from it stays in the ring)."""
    if desc.shape[0] < DESC_FIELDS or not index_ok(desc[D_START], datasize):
        return False
    o8, l8 = desc[D_OFFSET8], desc[D_LEN8]
    return o8 >= 2 and l8 >= o8 and l8 * 8 + TRAILER < datasize


@kernel
def parse_gpa_direct(mem, base, datasize, desc, max_ranges, pieces):
    """The buffers of the GPA-direct packet described by desc (b.6) as pieces:
    rows (P_GPA, P_LEN, P_RANGE) of guest-physically contiguous bytes, in order;
    consecutive PFNs of one range merge into one piece, ranges never merge (the
    RNDIS header must lie in range 0). Returns the number of pieces, or

    E_KIND (not type 9), E_HEADER (offset8*8 < 24), E_RANGE_COUNT (range_cnt 0 or
    > max_ranges), E_RANGE_BOUNDS (a range header or its PFN array,
    ceil((byte_offset + byte_count) / 4096) entries, runs past offset8*8, where the
    payload begins), E_RANGE_OFFSET (byte_offset >= 4096), E_GPA (a page outside
    mem), E_PIECES (pieces too short), E_GEOMETRY / E_ARG. A zero-byte range adds
    no piece."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not _desc_ok(desc, datasize) or pieces.shape[1] < 3 or max_ranges < 0:
        return E_ARG
    if desc[D_TYPE] != VM_PKT_DATA_USING_GPA_DIRECT:
        return E_KIND
    data = base + CONTROL
    start = desc[D_START]
    hdr_end = desc[D_OFFSET8] * 8
    if hdr_end < GPA_HDR:
        return E_HEADER
    nr = (_ld(mem, data, datasize, start, _GPA_WORD) >> _GPA_RANGE_CNT) & _U32_MAX
    if nr == 0 or nr > max_ranges:
        return E_RANGE_COUNT
    pages = mem.shape[0] >> 12
    cap = pieces.shape[0]
    np_ = 0
    cur = GPA_HDR
    for r in range(nr):
        if cur + GPA_RANGE_PFN > hdr_end:
            return E_RANGE_BOUNDS
        w = _ld(mem, data, datasize, start, cur)
        left = w & _U32_MAX
        off = (w >> _R_OFFSET) & _U32_MAX
        if off >= HV_PAGE:
            return E_RANGE_OFFSET
        npfn = _pfn_count(off, left)
        cur += GPA_RANGE_PFN
        if npfn > (hdr_end - cur) // 8:
            return E_RANGE_BOUNDS
        for _ in range(npfn):
            pfn = _ld(mem, data, datasize, start, cur)
            cur += 8
            if pfn < 0 or pfn >= pages:     # a u64 >= 2**63 reads as negative
                return E_GPA
            ln = min(HV_PAGE - off, left)
            if ln > 0:
                gpa = pfn * HV_PAGE + off
                if np_ > 0 and pieces[np_ - 1, P_RANGE] == r and \
                        pieces[np_ - 1, P_GPA] + pieces[np_ - 1, P_LEN] == gpa:
                    pieces[np_ - 1, P_LEN] += ln
                else:
                    if np_ >= cap:
                        return E_PIECES
                    pieces[np_, P_GPA] = gpa
                    pieces[np_, P_LEN] = ln
                    pieces[np_, P_RANGE] = r
                    np_ += 1
            left -= ln
            off = 0
    return np_


@kernel
def parse_xfer_page(mem, base, datasize, desc, pageset_id, buf_len, max_ranges, out):
    """The ranges of the transfer-page packet described by desc (b.5), the guest
    side's view of host receive packets: rows (XR_COUNT, XR_OFFSET) into out.
    Checks as Linux netvsc_receive: offset8*8 >= 24 (E_HEADER), the pageset id
    (E_PAGESET), range_cnt <= max_ranges and out's rows (E_RANGE_COUNT),
    24 + 8*range_cnt <= offset8*8 (E_RANGE_BOUNDS), every range inside the
    buf_len-byte transfer-page set (E_BUFFER). Returns the range count or E_*."""
    if not geometry_ok(mem, base, datasize):
        return E_GEOMETRY
    if not _desc_ok(desc, datasize) or out.shape[1] < 2 or max_ranges < 0 or buf_len < 0:
        return E_ARG
    if desc[D_TYPE] != VM_PKT_DATA_USING_XFER_PAGES:
        return E_KIND
    data = base + CONTROL
    start = desc[D_START]
    hdr_end = desc[D_OFFSET8] * 8
    if hdr_end < XFER_HDR:
        return E_HEADER
    w = _ld(mem, data, datasize, start, _XFER_WORD)
    if (w & 0xFFFF) != pageset_id:
        return E_PAGESET
    nr = (w >> _XFER_RANGE_CNT) & _U32_MAX
    if nr > max_ranges or nr > out.shape[0]:
        return E_RANGE_COUNT
    if XFER_HDR + RANGE_SIZE * nr > hdr_end:
        return E_RANGE_BOUNDS
    for i in range(nr):
        r = _ld(mem, data, datasize, start, XFER_HDR + RANGE_SIZE * i)
        c = r & _U32_MAX
        o = (r >> 32) & _U32_MAX
        if o > buf_len or c > buf_len - o:
            return E_BUFFER
        out[i, XR_COUNT] = c
        out[i, XR_OFFSET] = o
    return nr
