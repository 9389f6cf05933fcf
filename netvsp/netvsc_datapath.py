"""NetVSC's compiled data path, guest to host: frames into RNDIS packets on the ring.

As Linux's netvsc_send chooses (vmbus_netvsp.md f.3): a frame whose RNDIS message
(header, per-packet info, frame) fits a send-buffer section is copied there and
announced by an in-band SEND_RNDIS_PKT naming the section; a bigger one (a GSO
super-packet) gets its RNDIS header written in the headroom just before it, and
the header and frame go as one GPA-direct range. Frames must therefore lie in
guest RAM (the batch arena is a window of it) with ``HEADROOM`` bytes free before
each. Per-packet info as Linux emits it (e.5): 802.1Q, then LSO v2 or checksum.

Transaction ids say what to release when the host completes: ``section + 1`` for
a send section, ``GPA_ID + slot`` for a GPA-direct frame (its batch slot).
"""
from __future__ import annotations

import numpy as np

from switch.byteorder import le32, put_le32
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_CSUM_VALID, F_VLAN, FLAGS,
                          GSO_SIZE, GSO_TCPV6, GSO_TYPE, LEN, OFF, ROW_PAD, TCI, copy_bytes,
                          init_packet)
from switch.checksum import sum16
from switch.kernel import helper, kernel
from switch.syscalls import writev

from . import nvsp as N
from . import rndis as R
from .vmbus import packet as P
from .vmbus import ring as RG

HEADROOM = 128            # RNDIS header + three PPIs (44 + 48 = 92), rounded up
GPA_ID = 1 << 32          # transaction ids of GPA-direct frames start here
CTL_ID = 1 << 48          # ... and the control path's (its completions are its own)
_HDR = R.PACKET.itemsize
_PPI = R.PPI_U32_SIZE


@helper
def _ppi(a, p, ptype, v):
    put_le32(a, p, _PPI)
    put_le32(a, p + 4, ptype)
    put_le32(a, p + 8, R.PPI_HEADER_SIZE)
    put_le32(a, p + 12, v)
    return p + _PPI


@helper
def _header(meta, i, out, p, v6):
    """The RNDIS_PACKET_MSG header and PPIs of frame i at out[p:]; returns its size.
    ``v6``: the frame is IPv6 (the checksum info says which IP version it is)."""
    fl = meta[FLAGS, i]
    q = p + _HDR
    if fl & F_VLAN:
        tci = meta[TCI, i]
        q = _ppi(out, q, R.PPI_IEEE_8021Q, ((tci & 0xFFF) << R.VLAN_ID_SHIFT)
                 | ((tci >> 13) & 7) | (R.VLAN_CFI if tci & 0x1000 else 0))
    if meta[GSO_TYPE, i] & 0x7F:
        v = (meta[GSO_SIZE, i] & R.LSO_MSS_MASK) | \
            ((meta[CSUM_START, i] & R.LSO_TCP_HEADER_OFFSET_MASK) << R.LSO_TCP_HEADER_OFFSET_SHIFT) \
            | R.LSO_TYPE_V2
        if (meta[GSO_TYPE, i] & 0x7F) == GSO_TCPV6:
            v |= R.LSO_IPV6
        q = _ppi(out, q, R.PPI_TCP_LARGESEND, v)
    elif fl & F_CSUM_PARTIAL:
        v = (meta[CSUM_START, i] & R.CSUM_TX_TCP_HEADER_OFFSET_MASK) << \
            R.CSUM_TX_TCP_HEADER_OFFSET_SHIFT
        v |= R.CSUM_TX_TCP if meta[CSUM_OFF, i] == 16 else R.CSUM_TX_UDP
        v |= R.CSUM_TX_IS_IPV6 if v6 else R.CSUM_TX_IS_IPV4
        q = _ppi(out, q, R.PPI_TCPIP_CHKSUM, v)
    hsize = q - p
    ppi_len = hsize - _HDR
    put_le32(out, p, R.MSG_PACKET)
    put_le32(out, p + 4, hsize + meta[LEN, i])
    put_le32(out, p + R.OFF_PKT_DATA_OFFSET, hsize - R.OFFSET_BASE)
    put_le32(out, p + R.OFF_PKT_DATA_LEN, meta[LEN, i])
    for k in range(R.OFF_PKT_DATA_LEN + 4, R.OFF_PKT_PPI_OFFSET):
        out[p + k] = 0
    put_le32(out, p + R.OFF_PKT_PPI_OFFSET, (_HDR - R.OFFSET_BASE) if ppi_len else 0)
    put_le32(out, p + R.OFF_PKT_PPI_LEN, ppi_len)
    put_le32(out, p + R.OFF_PKT_VC_HANDLE, 0)
    put_le32(out, p + R.OFF_PKT_RESERVED, 0)
    return hsize


@kernel
def netvsc_transmit(mem, wbase, wds, meta, data, data_gpa, n, start,
                    sbuf_gpa, section_size, free_secs, nfree, busy, bufs, nvsp, stats):
    """Send frames start..n-1 of the batch (its arena is guest RAM at ``data_gpa``).
    ``free_secs[:nfree[0]]`` is the stack of free send sections, ``busy`` marks the
    sections in flight (a uint8 per section). Returns
    (next frame not sent, signal the host): stops early when the ring is full."""
    i = start
    begin = -1
    pos = 0
    while i < n:
        ln = meta[LEN, i]
        off = meta[OFF, i]
        if off < 0 or ln < 14 or off > data.shape[0] or ln > data.shape[0] - off:
            stats[2] += 1                  # not a frame of this arena: dropped
            i += 1
            continue
        v6 = data[off + 12] == 0x86 and data[off + 13] == 0xDD
        small = _HDR + 3 * _PPI + ln <= section_size and nfree[0] > 0
        if small:
            need = P.inband_footprint(16)
        else:
            # the largest header the range can start with: its footprint bounds the real one
            bufs[0, 0] = data_gpa + off - (_HDR + 3 * _PPI)
            bufs[0, 1] = _HDR + 3 * _PPI + ln
            need = P.gpa_direct_footprint(bufs, 1, 16)
        if begin < 0:
            p = RG.ring_write_begin(mem, wbase, wds, need)
            if p < 0:
                break
            begin = p
            pos = p
        else:
            r = RG.load32(mem, wbase + RG.READ_INDEX)
            if not RG.index_ok(r, wds) or RG.to_write(pos, r, wds) <= need:
                break
        if small:
            nfree[0] -= 1
            s = free_secs[nfree[0]]
            busy[s] = 1
            at = sbuf_gpa + s * section_size
            h = _header(meta, i, mem, at, v6)
            copy_bytes(mem, at + h, data, off, ln)
            put_le32(nvsp, 0, N.MSG_SEND_RNDIS_PKT)
            put_le32(nvsp, 4, N.CHANNEL_TYPE_DATA)
            put_le32(nvsp, 8, s)
            put_le32(nvsp, 12, h + ln)
            pos = P.put_inband(mem, wbase, wds, pos, P.VM_PKT_DATA_INBAND,
                               P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, s + 1, nvsp, 0, 16)
            stats[0] += 1
        else:
            if off < HEADROOM:
                stats[2] += 1              # no headroom: the frame cannot go (dropped)
                i += 1
                continue
            h = _header(meta, i, data, off - HEADROOM, v6)
            # Slide the header to sit right before the frame, as in skb headroom.
            hstart = off - h
            if hstart != off - HEADROOM:
                for k in range(h):
                    data[hstart + k] = data[off - HEADROOM + k]
            bufs[0, 0] = data_gpa + hstart
            bufs[0, 1] = h + ln
            put_le32(nvsp, 0, N.MSG_SEND_RNDIS_PKT)
            put_le32(nvsp, 4, N.CHANNEL_TYPE_DATA)
            put_le32(nvsp, 8, N.SECTION_INDEX_NONE)
            put_le32(nvsp, 12, 0)
            pos = P.build_gpa_direct(mem, wbase, wds, pos,
                                     P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, GPA_ID + i,
                                     bufs, 1, nvsp, 0, 16)
            stats[1] += 1
        if pos < 0:
            stats[3] += 1
            break
        i += 1
    if begin < 0:
        return i, 0
    return i, 1 if RG.ring_write_commit(mem, wbase, wds, begin, pos) == 1 else 0


@kernel
def netvsc_reclaim(mem, rbase, rds, rstate, desc, free_secs, nfree, busy, gpa_done):
    """Read the host's completions of our sends from the host-to-guest ring: a send
    section goes back on the free stack, a GPA-direct frame counts in
    ``gpa_done[row]`` (its transaction id is GPA_ID + its batch row). Stops at
    anything else (a receive: the receive path's).
    ``rstate[0]`` is the private read position. Returns the packets consumed, or a
    negative ring error. The caller commits the read index."""
    got = 0
    while True:
        rc = RG.read_packet(mem, rbase, rds, rstate[0], desc)
        if rc == RG.E_EMPTY:
            return got
        if rc < 0:
            return rc
        if desc[RG.D_TYPE] != P.VM_PKT_COMP:
            return got
        tid = desc[RG.D_TRANS_ID]
        if tid >= CTL_ID:
            return got                             # a control request's: not ours
        if 1 <= tid <= busy.shape[0]:
            if busy[tid - 1]:                      # a host completing twice is ignored
                busy[tid - 1] = 0
                free_secs[nfree[0]] = tid - 1
                nfree[0] += 1
        elif tid >= GPA_ID and tid - GPA_ID < gpa_done.shape[0]:
            gpa_done[tid - GPA_ID] += 1
        rstate[0] = desc[RG.D_NEXT]
        got += 1


# ---------------------------------------------------------------- host -> guest
RX_OK, RX_CONTROL, RX_COMPLETION = 0, 1, 2
_PKTINFO = R.PPI_RNDIS_PKTINFO_ID
_SUBALLOC, _FIRST, _LAST = R.PKTINFO_SUBALLOC, R.PKTINFO_1ST_FRAG, R.PKTINFO_LAST_FRAG


MAX_FRAGS = 600           # pieces of one frame: a transfer-page packet's every range (b.5)
_VNET = 10                # virtio_net_hdr (switch.tap): flags, gso type, lengths, csum


def rx_scratch():
    """The arrays netvsc_receive's direct-to-tap mode works in: (pieces, iov, hdr)."""
    return (np.zeros((MAX_FRAGS, 2), dtype=np.int64), np.zeros(2 * (MAX_FRAGS + 3), np.int64),
            np.zeros(32, dtype=np.uint8))


@helper
def _to_tap(mem, pieces, np_, flen, fl, tci, tapfd, iov, hdr):
    """One received frame, in ``np_`` pieces of guest RAM, written to the tap with
    one writev(): virtio header (a verified checksum made partial, see
    _partial_csum), then the pieces, an 802.1Q tag put back after the MACs.
    Returns whether the tap took it."""
    for k in range(_VNET):
        hdr[k] = 0
    p0 = pieces[0, 0]
    l0 = pieces[0, 1]
    shift = 0
    tagged = (fl & F_VLAN) != 0 and l0 >= 12
    if tagged:
        shift = 4
    if fl & F_CSUM_VALID:
        cs, co = _partial_csum(mem, p0, l0, flen)
        if cs >= 0:
            hdr[0] = 1                            # VIRTIO_NET_HDR_F_NEEDS_CSUM
            hdr[6] = (cs + shift) & 0xFF
            hdr[7] = ((cs + shift) >> 8) & 0xFF
            hdr[8] = co
    base = mem.ctypes.data
    iov[0] = hdr.ctypes.data
    iov[1] = _VNET
    c = 1
    if tagged:
        hdr[16] = 0x81
        hdr[17] = 0x00
        hdr[18] = (tci >> 8) & 0xFF
        hdr[19] = tci & 0xFF
        iov[2] = base + p0
        iov[3] = 12
        iov[4] = hdr.ctypes.data + 16
        iov[5] = 4
        iov[6] = base + p0 + 12
        iov[7] = l0 - 12
        c = 4
    else:
        iov[2] = base + p0
        iov[3] = l0
        c = 2
    for k in range(1, np_):
        iov[2 * c] = base + pieces[k, 0]
        iov[2 * c + 1] = pieces[k, 1]
        c += 1
    return writev(tapfd, iov.ctypes.data, c) >= 0


@kernel
def netvsc_receive(mem, rbase, rds, rstate, desc, ranges, rbuf_gpa, rbuf_size,
                   meta, data, n, cursor, comp, ncomp, stats, nvsp8, tapfd, pieces, iov, hdr):
    """Frames the host put in the receive buffer: with ``tapfd`` < 0 copied into a
    batch (so the sub-allocations go back at once), else written straight from
    the buffer to the tap ``tapfd`` (one writev() per frame, its pieces in place;
    ``pieces``, ``iov``, ``hdr`` from rx_scratch()) before the packet is
    completed: what the guest's stack gets either way.

    For each transfer-page packet: its ranges checked as Linux's netvsc_receive
    checks them (parse_xfer_page), each range one RNDIS_PACKET_MSG validated like
    on the host side (lengths, offsets, per-packet info), RSC fragments (e.5)
    joined, the 802.1Q info back as the out-of-band tag (inline for the tap), the
    receive checksum info as F_CSUM_VALID (for the tap a partial checksum, see
    _partial_csum); then the packet's completion is queued (``comp``, NVSP status
    SUCCESS or FAIL if any message was bad, e.2). A completion of our sends stops
    the walk with RX_COMPLETION (netvsc_reclaim takes it), anything else with
    RX_CONTROL (the control path's). Returns (n, cursor, ncomp, why) or a
    negative ring error as why; n counts frames (batched or written).
    ``nvsp8``: 8 bytes of scratch."""
    direct = tapfd >= 0
    cap = meta.shape[1] - ROW_PAD
    while (direct or n < cap) and ncomp < comp.shape[0]:
        rc = RG.read_packet(mem, rbase, rds, rstate[0], desc)
        if rc == RG.E_EMPTY:
            return n, cursor, ncomp, RX_OK
        if rc < 0:
            return n, cursor, ncomp, rc
        if desc[RG.D_TYPE] == P.VM_PKT_COMP:
            if desc[RG.D_TRANS_ID] >= CTL_ID:
                return n, cursor, ncomp, RX_CONTROL     # a control request's
            return n, cursor, ncomp, RX_COMPLETION      # netvsc_reclaim's
        if desc[RG.D_TYPE] != P.VM_PKT_DATA_USING_XFER_PAGES:
            return n, cursor, ncomp, RX_CONTROL
        # RNDIS control replies and indications come the same way, channel type 1
        # in the NVSP message after the ranges (e.2): the control path's.
        if desc[RG.D_PAYLOAD_LEN] < 8:
            return n, cursor, ncomp, RX_CONTROL
        RG.get_bytes(mem, rbase + RG.CONTROL, rds, desc[RG.D_PAYLOAD], nvsp8, 0, 8)
        if le32(nvsp8, 0) != N.MSG_SEND_RNDIS_PKT or le32(nvsp8, 4) != N.CHANNEL_TYPE_DATA:
            return n, cursor, ncomp, RX_CONTROL
        nr = P.parse_xfer_page(mem, rbase, rds, desc, N.RECEIVE_BUFFER_ID, rbuf_size,
                               ranges.shape[0], ranges)
        status = N.STATUS_SUCCESS
        if nr < 0:
            stats[4] += 1
            status = N.STATUS_FAIL
            nr = 0
        if not direct:
            need = 0
            for k in range(nr):
                need += ranges[k, 0] + 64
            if n > 0 and (nr > cap - n or cursor + need > data.shape[0]):
                return n, cursor, ncomp, RX_OK         # next batch, empty
            if cursor + need > data.shape[0]:
                stats[5] += 1          # never fits an empty batch: complete it as failed
                status = N.STATUS_FAIL
                nr = 0
        frag = False              # inside an RSC chain (e.5): its data goes on at flen
        flen = 0
        ffl = 0
        ftci = 0
        np_ = 0
        for k in range(nr):
            ok, ds, dl, fl, tci, pflag = _rx_parse(mem, rbuf_gpa + ranges[k, 1], ranges[k, 0])
            if not ok or (not (pflag & _SUBALLOC) and dl < 14):
                stats[6] += 1
                status = N.STATUS_FAIL
                frag = False
                continue
            if pflag & _SUBALLOC and not (pflag & _FIRST):
                if not frag or np_ >= pieces.shape[0] or \
                        (not direct and cursor + flen + dl > data.shape[0]):
                    stats[6] += 1             # a fragment out of its chain
                    status = N.STATUS_FAIL
                    frag = False
                    continue
                if direct:
                    pieces[np_, 0] = ds
                    pieces[np_, 1] = dl
                    np_ += 1
                else:
                    copy_bytes(data, cursor + flen, mem, ds, dl)
                flen += dl
            else:
                if frag:
                    stats[6] += 1             # a chain left without its last fragment
                    status = N.STATUS_FAIL
                if direct:
                    pieces[0, 0] = ds
                    pieces[0, 1] = dl
                    np_ = 1
                else:
                    copy_bytes(data, cursor, mem, ds, dl)
                flen = dl
                ffl = fl
                ftci = tci
                frag = (pflag & _SUBALLOC) != 0
            if frag and not (pflag & _LAST):
                continue
            frag = False
            if flen < 14 or (direct and pieces[0, 1] < 14):
                stats[6] += 1
                status = N.STATUS_FAIL
                continue
            if direct:
                if _to_tap(mem, pieces, np_, flen, ffl, ftci, tapfd, iov, hdr):
                    n += 1
                else:
                    stats[7] += 1             # the tap refused it (queue full, down)
                continue
            if n >= cap:
                stats[7] += 1                 # more frames than the batch has slots
                status = N.STATUS_FAIL
                continue
            init_packet(meta, n, cursor, flen, 0, 0)
            meta[FLAGS, n] |= ffl
            meta[TCI, n] = ftci
            if ffl & F_CSUM_VALID:
                _verified_to_partial(meta, data, n)
            n += 1
            cursor = (cursor + flen + 63) & ~63
        if frag:
            stats[6] += 1                     # RSC fragments straddling packets: dropped
            status = N.STATUS_FAIL
        if desc[RG.D_FLAGS] & P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED:
            comp[ncomp, 0] = desc[RG.D_TRANS_ID]
            comp[ncomp, 1] = status
            ncomp += 1
        rstate[0] = desc[RG.D_NEXT]
    return n, cursor, ncomp, RX_OK


@helper
def _partial_csum(buf, off, avail, ln):
    """The host said "checksum succeeded" (e.5), which Linux's netvsc turns into
    CHECKSUM_UNNECESSARY; a tap cannot be told that (tun ignores
    VIRTIO_NET_HDR_F_DATA_VALID on writes), so the frame goes to the tap as a
    partial checksum instead: the field gets the pseudo-header sum and the
    virtio header says where the sum goes. Linux's stack takes a partial
    checksum on receive unverified, like CHECKSUM_UNNECESSARY, and finishes it
    right if the guest forwards the frame.

    The frame is ``ln`` bytes at buf[off:], its first ``avail`` contiguous.
    Returns (csum_start, csum_offset) with the field written, or (-1, 0) for a
    frame it cannot place (no plain IPv4/IPv6 TCP or UDP right after the
    Ethernet header, or headers beyond ``avail``), left as it is."""
    if avail < 42 or avail > ln:
        return -1, 0
    et = (np.int64(buf[off + 12]) << 8) | np.int64(buf[off + 13])
    if et == 0x0800:
        ihl = np.int64(buf[off + 14] & 15) * 4
        tot = (np.int64(buf[off + 16]) << 8) | np.int64(buf[off + 17])
        frag = ((np.int64(buf[off + 20]) << 8) | np.int64(buf[off + 21])) & 0x3FFF
        if ihl < 20 or frag != 0 or tot < ihl or 14 + tot > ln:
            return -1, 0
        proto = np.int64(buf[off + 23])
        l4 = 14 + ihl
        l4len = tot - ihl
        s = sum16(buf, off + 26, 8)
    elif et == 0x86DD:
        if avail < 54:
            return -1, 0
        proto = np.int64(buf[off + 20])
        l4 = 54
        l4len = (np.int64(buf[off + 18]) << 8) | np.int64(buf[off + 19])
        if 54 + l4len > ln:
            return -1, 0
        s = sum16(buf, off + 22, 32)
    else:
        return -1, 0
    if proto == 6:
        co = 16
        if l4len < 20:
            return -1, 0
    elif proto == 17:
        co = 6
        if l4len < 8:
            return -1, 0
    else:
        return -1, 0
    if l4 + co + 2 > avail:
        return -1, 0
    if proto == 17 and et == 0x0800 and buf[off + l4 + 6] == 0 and buf[off + l4 + 7] == 0:
        return -1, 0               # an IPv4 UDP datagram without checksum: nothing to do
    s += proto + l4len
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    buf[off + l4 + co] = (s >> 8) & 0xFF
    buf[off + l4 + co + 1] = s & 0xFF
    return l4, co


@helper
def _verified_to_partial(meta, data, i):
    """_partial_csum for batch frame ``i``: on success its flags say partial."""
    cs, co = _partial_csum(data, meta[OFF, i], meta[LEN, i], meta[LEN, i])
    if cs >= 0:
        meta[FLAGS, i] = (meta[FLAGS, i] & ~F_CSUM_VALID) | F_CSUM_PARTIAL
        meta[CSUM_START, i] = cs
        meta[CSUM_OFF, i] = co


@helper
def _rx_parse(mem, s, L):
    """One RNDIS_PACKET_MSG from the host at mem[s:s+L], validated in place.
    Returns (ok, data start, data length, flags, tci, RSC fragment flags)."""
    if L < _HDR or s < 0 or s > mem.shape[0] - L:
        return False, 0, 0, 0, 0, 0
    mlen = le32(mem, s + 4)
    if le32(mem, s) != R.MSG_PACKET or mlen < _HDR or mlen > L:
        return False, 0, 0, 0, 0, 0
    doff = le32(mem, s + R.OFF_PKT_DATA_OFFSET)
    dlen = le32(mem, s + R.OFF_PKT_DATA_LEN)
    poff = le32(mem, s + R.OFF_PKT_PPI_OFFSET)
    plen = le32(mem, s + R.OFF_PKT_PPI_LEN)
    body = mlen - R.OFFSET_BASE
    if doff < _HDR - R.OFFSET_BASE or dlen < 1 or doff > body or dlen > body - doff:
        return False, 0, 0, 0, 0, 0
    fl = 0
    tci = 0
    pflag = 0
    if plen > 0:
        if poff < _HDR - R.OFFSET_BASE or poff > body or plen > body - poff:
            return False, 0, 0, 0, 0, 0
        q = 0
        while q < plen:
            e = s + R.OFFSET_BASE + poff + q
            if plen - q < R.PPI_HEADER_SIZE:
                return False, 0, 0, 0, 0, 0
            size = le32(mem, e)
            ptype = le32(mem, e + 4)
            pofs = le32(mem, e + 8)
            if size < R.PPI_HEADER_SIZE or size > plen - q or pofs < R.PPI_HEADER_SIZE \
                    or pofs > size - 4:
                return False, 0, 0, 0, 0, 0
            v = le32(mem, e + pofs)
            if ptype == R.PPI_TCPIP_CHKSUM:
                if v & (R.CSUM_RX_TCP_SUCCEEDED | R.CSUM_RX_UDP_SUCCEEDED):
                    fl |= F_CSUM_VALID
            elif ptype == R.PPI_IEEE_8021Q:
                vid = (v >> R.VLAN_ID_SHIFT) & R.VLAN_ID_MASK
                tci = ((v & R.VLAN_PRIORITY_MASK) << 13) | \
                    ((1 if v & R.VLAN_CFI else 0) << 12) | vid
                fl |= F_VLAN
            elif ptype == _PKTINFO:
                pflag = (v >> 8) & 0xFF
            q += size
    return True, s + R.OFFSET_BASE + doff, dlen, fl, tci, pflag
